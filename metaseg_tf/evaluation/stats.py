"""Statistics over patients: the paired Wilcoxon signed-rank test and Holm's adjustment for several tests.

Bootstrap confidence intervals of a mean are :func:`~metaseg_tf.evaluation.scores.bootstrap_ci` (pure NumPy,
with the scores).
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats

WILCOXON_NOTE = ("Difference a - b; `pairs_nonzero`: the patients whose scores differ (the test ranks only those); "
                 "`p_holm`: p adjusted for the table's several tests (Holm), which are not independent when a "
                 "run is tested against several others or an ensemble against its own members.")


def holm_adjusted(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values (Holm 1979, "A simple sequentially rejective multiple test
    procedure"), in the order given: the i-th smallest of m p-values is multiplied by ``m - i + 1`` (i from
    1), made non-decreasing along that order, and capped at 1. Controls the family-wise error rate for any
    dependence between the tests (e.g. an ensemble tested against its own members)."""
    p = np.asarray(p_values, float)
    order = np.argsort(p, kind="stable")
    stepped = np.maximum.accumulate(p[order] * (len(p) - np.arange(len(p))))
    adjusted = np.empty_like(p)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted

def paired_wilcoxon(per_patient: dict[str, pd.DataFrame], score: str = "dice") -> pd.DataFrame:
    """Wilcoxon signed-rank test (Wilcoxon 1945; pairs with no difference are left out, as SciPy's
    ``zero_method="wilcox"``; SciPy's ``method="auto"``: the exact p under 50 pairs without tied differences,
    else the normal approximation) on per-patient ``score`` for each pair of runs, over their shared
    patients. ``patients``: the pairs; ``pairs_nonzero``: those the test ranks; ``p_holm``: the p-values
    adjusted for the table's several tests (:func:`holm_adjusted`)."""
    rows = []
    for a, b in itertools.combinations(per_patient, 2):
        merged = per_patient[a][["case_id", score]].merge(per_patient[b][["case_id", score]], on="case_id")
        diff = (merged[f"{score}_x"] - merged[f"{score}_y"]).to_numpy(float)
        if len(diff) and np.any(diff != 0):
            result = stats.wilcoxon(diff[diff != 0])  # zeros left out by hand: the same p in every SciPy release
            statistic, p_value = float(result.statistic), float(result.pvalue)
        else:
            statistic, p_value = float("nan"), 1.0
        rows.append({"a": a, "b": b, "score": score, "patients": len(diff),
                     "pairs_nonzero": int(np.count_nonzero(diff)),
                     "mean_difference": float(diff.mean()) if len(diff) else float("nan"),
                     "median_difference": float(np.median(diff)) if len(diff) else float("nan"),
                     "statistic": statistic, "p_value": p_value})
    tests = pd.DataFrame(rows, columns=["a", "b", "score", "patients", "pairs_nonzero", "mean_difference",
                                        "median_difference", "statistic", "p_value"])
    return tests.assign(p_holm=holm_adjusted(tests["p_value"]))
