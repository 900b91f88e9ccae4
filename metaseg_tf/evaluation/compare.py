"""Comparing evaluated runs: :func:`compare_runs` puts several evaluations side by side in one table (per-patient
scores with CIs, lesion detection, complexity, training time) with paired Wilcoxon signed-rank tests on
per-patient Dice (:mod:`metaseg_tf.evaluation.stats`), and writes ``comparison.md``, ``comparison.csv``,
``regions.csv``, ``wilcoxon.csv``, ``conclusion.md`` (:func:`conclusion`, generated from the numbers) and
``per_patient_dice.png``. :func:`worst_patients` and :func:`patient_error` say, in numbers and words, where a
model fails.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from metaseg_tf import plots
from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.evaluation.stats import WILCOXON_NOTE, paired_wilcoxon
from metaseg_tf.paths import resolve
from metaseg_tf.runs.folders import new_dir, read_json
from metaseg_tf.runs.records import newest_evaluation

logger = logging.getLogger(__name__)


def _mean_ci(score: dict) -> str:
    low, high = score["ci95"]
    return f"{score['mean']:.3f} ± {score['sd']:.3f} [{low:.3f}, {high:.3f}]"

@dataclass
class Comparison:
    """The comparison table (one row per run), the paired tests, and where they were written."""

    table: pd.DataFrame
    tests: pd.DataFrame
    out_dir: Path
    markdown: str
    summaries: dict[str, dict]
    regions: pd.DataFrame | None = None

def patient_error(row: dict[str, Any] | pd.Series) -> str:
    """What went wrong for one patient, in words, from its ``per_patient.csv`` row (numbers only), checked in
    this order: a prediction where the truth is empty (``false positive``; ``good`` if nothing is predicted);
    ``good`` at Dice 0.8 or more; nothing, or under 10 % of the truth, predicted (``missed``); recall under 0.5
    at precision 0.8 or more (``under-segmented``: found, covered in part); precision under 0.5 at recall 0.8 or
    more (``over-segmented``); fewer truth lesions detected than present (``lesions missed``); else
    ``partial overlap``."""
    truth, predicted = row["truth_voxels"], row["pred_voxels"]
    if truth == 0:
        return "false positive" if predicted else "good"
    if row["dice"] >= 0.8:
        return "good"
    if predicted == 0 or row["recall"] < 0.1:
        return "missed"
    if row["recall"] < 0.5 and row["precision"] >= 0.8:
        return "under-segmented"
    if row["precision"] < 0.5 and row["recall"] >= 0.8:
        return "over-segmented"
    if row["detected_lesions"] < row["truth_lesions"]:
        return "lesions missed"
    return "partial overlap"

def worst_patients(per_patient: pd.DataFrame, n: int = 5) -> pd.DataFrame:
    """The ``n`` patients with the lowest Dice of a ``per_patient.csv`` table (per ``model`` where it has one),
    with their volumes, precision, recall, lesion counts and :func:`patient_error`."""
    columns = ["case_id", "dice", "truth_voxels", "pred_voxels", "precision", "recall", "truth_lesions",
               "detected_lesions", "false_positive_lesions"]
    grouped = per_patient.groupby("model", sort=False) if "model" in per_patient else [(None, per_patient)]
    tables = []
    for _, frame in grouped:
        worst = frame.nsmallest(n, "dice").copy()
        worst["error"] = [patient_error(row) for _, row in worst.iterrows()]
        tables.append(worst)
    table = pd.concat(tables, ignore_index=True)
    return table[[c for c in ["model", "fold", *columns, "error"] if c in table]]

def region_table(summaries: dict[str, dict]) -> pd.DataFrame:
    """One row per run and region: the region's labels, per-patient Dice [CI], HD95 and the BraTS-MET 2023
    lesion-wise Dice, HD95 and sensitivity (from each evaluation's ``summary.json``)."""
    rows = []
    for label, summary in summaries.items():
        unit = summary.get("distance_unit", "px")
        for region, scores in summary.get("regions", {}).items():
            scores = scores["per_patient"]
            rows.append({"model": label, "region": region, "labels": str(summary["regions"][region]["labels"]),
                         "dice": _mean_ci(scores["dice"]), f"hd95_{unit}": f"{scores['hd95']['mean']:.1f}",
                         "lesion_dice": f"{scores['lesion_dice']['mean']:.3f}",
                         f"lesion_hd95_{unit}": f"{scores['lesion_hd95']['mean']:.1f}",
                         "lesion_sensitivity": f"{scores['lesion_sensitivity']['mean']:.3f}"})
    return pd.DataFrame(rows)

def compare_runs(run_dirs: Sequence[Path | str], out_dir: Path | str, split: str = "test",
                 labels: Sequence[str] | None = None, progress: bool = True, which: str = "best",
                 threshold: float | None = None, native_resolution: bool = True,
                 allow_different_patients: bool = False) -> Comparison:
    """One table of per-patient (mean ± sd [95 % CI]) and global scores, lesion detection, complexity and
    training time for ``run_dirs``, plus paired Wilcoxon tests on per-patient Dice; written as markdown, CSV
    and a PNG into a new folder under ``out_dir``.

    Each run's newest evaluation with exactly these settings (:func:`newest_evaluation`; ``threshold`` None:
    each run's own) is used, made first where there is none. Runs evaluated on different patients are
    refused (``ValueError``) unless ``allow_different_patients``: then the table says so and the paired
    tests use the shared patients only.
    """
    if len(run_dirs) < 1:
        raise ValueError("compare needs at least one run")
    labels = list(labels) if labels else [Path(r).name for r in run_dirs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"labels must be distinct, got {labels}")
    rows, per_patient, summaries = [], {}, {}
    for label, run_dir in zip(labels, run_dirs):
        evaluation_dir = newest_evaluation(run_dir, split, which, threshold, native_resolution)
        if evaluation_dir is None:
            evaluation_dir = evaluate_run(run_dir, split, which, threshold, native_resolution,
                                          progress=progress).out_dir
        summary = summaries[label] = read_json(evaluation_dir / "summary.json")
        per_patient[label] = pd.read_csv(evaluation_dir / "per_patient.csv")
        scores, complexity = summary["per_patient"], summary["complexity"]
        rows.append({
            "model": label, "architecture": summary["model"], "patients": summary["patients"],
            "dice": _mean_ci(scores["dice"]), "iou": _mean_ci(scores["iou"]),
            "precision": _mean_ci(scores["precision"]), "recall": _mean_ci(scores["recall"]),
            f"hd95_{summary.get('distance_unit', 'px')}": f"{scores['hd95']['mean']:.1f} ± {scores['hd95']['sd']:.1f}",
            "lesion_sensitivity": f"{scores['lesion_sensitivity']['mean']:.3f}",
            "fp_lesions_per_patient": f"{summary['lesions']['false_positives_per_patient']:.2f}",
            "lesion_dice": f"{scores['lesion_dice']['mean']:.3f}",
            "global_dice": f"{summary['global']['dice']:.3f}",
            "parameters_M": f"{complexity['parameters'] / 1e6:.2f}",
            "gflops_per_image": (f"{complexity['flops_per_image'] / 1e9:.2f}"
                                 if complexity["flops_per_image"] else "n/a"),
            "latency_ms": f"{complexity['latency_ms']:.1f}",
            "train_minutes": f"{(summary['training']['train_seconds'] or 0) / 60:.1f}",
            "epochs": summary["training"]["epochs"],
            "resolution": summary["resolution"],
        })
    patient_sets = {label: frozenset(frame["case_id"].astype(str)) for label, frame in per_patient.items()}
    if len(set(patient_sets.values())) > 1:
        sizes = ", ".join(f"{label}: {len(cases)}" for label, cases in patient_sets.items())
        if not allow_different_patients:
            raise ValueError(f"the runs were evaluated on different {split} patients ({sizes}); compare runs of "
                             "one patient split, or pass --allow-different-patients to test the shared ones only")
        logger.warning("comparing runs evaluated on different patients (%s): paired tests use the shared ones",
                       sizes)
    table = pd.DataFrame(rows)
    regions = region_table(summaries)
    tests = paired_wilcoxon(per_patient)
    out_dir = new_dir(resolve(out_dir), f"comparison-{split}")
    table.to_csv(out_dir / "comparison.csv", index=False)
    regions.to_csv(out_dir / "regions.csv", index=False)
    tests.to_csv(out_dir / "wilcoxon.csv", index=False)
    plots.distribution({label: frame["dice"] for label, frame in per_patient.items()}, out_dir / "per_patient_dice.png")
    markdown = "\n".join([
        f"# Comparison on the {split} split", "",
        "Per-patient scores: mean ± sd [95 % bootstrap CI of the mean] over patients (3D, all slices of a "
        "case). HD95 in mm where the voxel spacing is known, else in pixels, surfel-weighted as the BraTS 2023 "
        "scripts compute it; a case whose prediction or truth is empty scores 374 (BraTS's convention). "
        "Lesion-wise scores after BraTS-MET 2023. Latency: one image, batch 1.", "",
        table.to_markdown(index=False), "",
        "## Per region and lesion-wise (BraTS-MET 2023)", "",
        "Per-patient means [95 % bootstrap CI] of each region the models were trained on; lesion-wise Dice and "
        "HD95 after the BraTS 2023 metastasis rules (misses and false positives score 0 and 374).", "",
        regions.to_markdown(index=False), "",
        "## Paired Wilcoxon signed-rank test, per-patient Dice", "", WILCOXON_NOTE, "",
        tests.to_markdown(index=False, floatfmt=".4g") if len(tests) else "(one run: nothing to test)", "",
        "![per-patient Dice](per_patient_dice.png)", "",
    ])
    comparison = Comparison(table, tests, out_dir, markdown, summaries, regions)
    (out_dir / "conclusion.md").write_text(conclusion(comparison) + "\n")
    (out_dir / "comparison.md").write_text(markdown)
    return comparison

def _better(values: dict[str, float], lower_is_better: bool = False) -> str:
    return (min if lower_is_better else max)(values, key=values.get)

def conclusion(comparison: Comparison) -> str:
    """A short markdown conclusion generated from the comparison's numbers: which model wins on what,
    with the per-patient Dice CIs and the paired test, and what the numbers do not show."""
    summaries = comparison.summaries
    labels = list(summaries)
    dice = {label: summaries[label]["per_patient"]["dice"] for label in labels}
    best = _better({label: dice[label]["mean"] for label in labels})
    split, patients = summaries[best]["split"], summaries[best]["patients"]
    lines = [f"On the {split} split ({patients} patients), per-patient Dice (mean [95 % bootstrap CI]): "
             + "; ".join(f"**{label}** {dice[label]['mean']:.3f} [{dice[label]['ci95'][0]:.3f}, "
                         f"{dice[label]['ci95'][1]:.3f}]" for label in labels) + "."]
    several = len(comparison.tests) > 1
    for _, test in comparison.tests.iterrows():
        significant = test["p_holm"] < 0.05
        smallest_p = 2.0 / 2 ** test["pairs_nonzero"] if test["pairs_nonzero"] else 1.0
        if smallest_p >= 0.05:
            lines.append(f"With {test['pairs_nonzero']} paired patients that differ, the exact two-sided Wilcoxon "
                         "test cannot go below "
                         f"p = {smallest_p:.3g}: this split is too small to show a difference at the 5 % level.")
        lines.append(f"{test['a']} − {test['b']}: mean paired difference {test['mean_difference']:+.3f} over "
                     f"{test['patients']} patients, Wilcoxon p = {test['p_value']:.3g}"
                     + (f" (Holm-adjusted for the {len(comparison.tests)} tests: {test['p_holm']:.3g})" if several else "")
                     + " — "
                     + ("a significant difference at the 5 % level." if significant else
                        "not significant at the 5 % level: the data do not separate these models on Dice."))
    criteria = {
        "per-patient Dice": ({label: dice[label]["mean"] for label in labels}, False),
        f"HD95 ({summaries[best].get('distance_unit', 'px')})": ({label: summaries[label]["per_patient"]["hd95"]["mean"] for label in labels}, True),
        "lesion sensitivity": ({label: summaries[label]["per_patient"]["lesion_sensitivity"]["mean"]
                                for label in labels}, False),
        "false-positive lesions per patient": ({label: summaries[label]["lesions"]["false_positives_per_patient"]
                                                for label in labels}, True),
        "parameters": ({label: summaries[label]["complexity"]["parameters"] for label in labels}, True),
        "latency (ms, batch 1)": ({label: summaries[label]["complexity"]["latency_ms"] for label in labels}, True),
    }
    lines.append("")
    lines.append("| criterion | " + " | ".join(labels) + " | better |")
    lines.append("|---|" + "---|" * (len(labels) + 1))
    for criterion, (values, lower) in criteria.items():
        shown = " | ".join(f"{values[label]:.4g}" for label in labels)
        winner = "tie" if len(set(values.values())) == 1 else _better(values, lower)
        lines.append(f"| {criterion} | {shown} | {winner} |")
    lines.append("")
    lines.append(f"Scores are at {summaries[best]['resolution']}; latency was measured on this machine. A model "
                 "that wins on the mean but not in the paired test has not been shown to be better.")
    return "\n".join(lines)
