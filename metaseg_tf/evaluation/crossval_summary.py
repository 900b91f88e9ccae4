"""A cross-validation's out-of-fold results, written from its state alone (``crossval.json``).

:func:`write_summary` reads what :func:`~metaseg_tf.evaluation.crossval.crossval` recorded, fold by fold and
model by model (the run folder and the evaluation folder of each), checks that each model scored every
patient at most once, only patients of the cross-validation, and all of them once every fold is done
(:func:`check_out_of_fold`; that no fold's model trained on its test patients follows from the split,
:func:`~metaseg_tf.data.split.kfold_patients`), and writes
``per_patient.csv``, ``summary.csv``, ``per_fold.csv``, ``wilcoxon.csv`` and ``summary.md`` (the columns:
:mod:`metaseg_tf.evaluation.crossval`). It trains and scores nothing, so it runs after every fold, on a
partial cross-validation (saying which folds are missing) and from ``metaseg crossval --collect``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metaseg_tf import paths
from metaseg_tf.data.discover import DataError
from metaseg_tf.evaluation.compare import worst_patients
from metaseg_tf.evaluation.scores import bootstrap_ci
from metaseg_tf.evaluation.stats import WILCOXON_NOTE, paired_wilcoxon
from metaseg_tf.runs.folders import load_run_split, read_json
from metaseg_tf.runs.records import CROSSVAL_STATE_FILE, current_summary

__all__ = ["ENSEMBLE", "CrossValidation", "check_out_of_fold", "write_summary"]

ENSEMBLE = "ensemble"  # the label of the models' ensemble in the state and the tables


@dataclass
class CrossValidation:
    """A cross-validation's folder, its state (``crossval.json``) and its out-of-fold results: one row per
    patient and model (``per_patient``), one per model and the ensemble (``summary``), one per fold and model
    (``per_fold``), the paired tests (``tests``) and ``summary.md``'s text (``markdown``)."""

    out_dir: Path
    state: dict[str, Any]
    per_patient: pd.DataFrame
    summary: pd.DataFrame
    per_fold: pd.DataFrame
    tests: pd.DataFrame
    markdown: str

    @property
    def complete(self) -> bool:
        """Every fold done for every model, and for the ensemble where it was scored."""
        if self.summary.empty or not set(self.state["models"]) <= set(self.summary["model"]):
            return False
        return bool((self.summary["folds_done"] == self.summary["n_folds"]).all())


def _fold_results(state: dict[str, Any]) -> tuple[pd.DataFrame, dict[tuple[int, str], dict], list[str]]:
    """Every recorded evaluation's per-patient rows (with ``model`` and ``fold``) and summaries, and the
    recorded evaluations left out because they are gone or were scored by an older release."""
    labels = [*state["models"], ENSEMBLE]
    frames, summaries, stale = [], {}, []
    for fold in range(state["n_folds"]):
        for label in labels:
            evaluation = state["folds"].get(str(fold), {}).get(label, {}).get("evaluation")
            if evaluation is None:
                continue
            summary = current_summary(evaluation)
            if summary is None:
                stale.append(f"fold {fold} {label}")
                continue
            frame = pd.read_csv(paths.resolve(evaluation) / "per_patient.csv", dtype={"case_id": str})
            frames.append(frame.assign(model=label, fold=fold))
            summaries[(fold, label)] = summary
    if not frames:
        return pd.DataFrame(columns=["model", "fold", "case_id", "dice"]), summaries, stale
    per_patient = pd.concat(frames, ignore_index=True)
    first = ["model", "fold"]
    return per_patient[first + [c for c in per_patient.columns if c not in first]], summaries, stale


def _all_patients(state: dict[str, Any]) -> set[str] | None:
    """Every patient of the cross-validation (train, val and test of a recorded run's split), or None."""
    for fold_state in state["folds"].values():
        for label in state["models"]:
            if "run" in fold_state.get(label, {}):
                split = load_run_split(fold_state[label]["run"])
                return {case for part in split.to_dict().values() for case in part}
    return None


def check_out_of_fold(per_patient: pd.DataFrame, all_patients: set[str] | None, n_folds: int) -> None:
    """Raise :class:`DataError` unless every model scored each patient at most once, only patients of the
    cross-validation, and, with all ``n_folds`` folds done, every one of them exactly once."""
    for label, frame in per_patient.groupby("model", sort=False):
        cases = frame["case_id"].astype(str)
        repeated = sorted(set(cases[cases.duplicated()]))
        if repeated:
            raise DataError(f"{label}: patients scored in more than one fold ({', '.join(repeated[:5])}); the "
                               "folds' test parts must partition the patients")
        if all_patients is None:
            continue
        unknown = sorted(set(cases) - all_patients)
        if unknown:
            raise DataError(f"{label}: patients scored that the cross-validation's split does not hold "
                               f"({', '.join(unknown[:5])}): did the data change between folds?")
        if frame["fold"].nunique() == n_folds and set(cases) != all_patients:
            never = sorted(all_patients - set(cases))
            raise DataError(f"{label}: all {n_folds} folds done but {len(never)} patient(s) never scored "
                               f"({', '.join(never[:5])}): did the data change between folds?")


def _pooled_dice(frame: pd.DataFrame) -> float:
    """Global Dice over every out-of-fold voxel of ``frame``'s patients together: ``2 sum TP / sum (|T| + |P|)``
    with each patient's ``TP = dice (|T| + |P|) / 2``; 1 when truth and prediction are empty everywhere."""
    volume = (frame["truth_voxels"] + frame["pred_voxels"]).to_numpy(float)
    return float((frame["dice"].to_numpy(float) * volume).sum() / volume.sum()) if volume.sum() else 1.0


def _summary_rows(per_patient: pd.DataFrame, summaries: dict[tuple[int, str], dict], labels: list[str],
                  n_folds: int, unit: str) -> pd.DataFrame:
    rows = []
    for label in labels:
        frame = per_patient[per_patient["model"] == label]
        if frame.empty:
            continue
        folds = sorted(frame["fold"].unique())
        dice = frame["dice"].to_numpy(float)
        mean_ci, median_ci = bootstrap_ci(dice), bootstrap_ci(dice, statistic="median")
        train_seconds = [summaries[(fold, label)]["training"]["train_seconds"] or 0.0 for fold in folds]
        rows.append({
            "model": label, "folds_done": len(folds), "n_folds": n_folds,
            "missing_folds": ", ".join(str(fold) for fold in range(n_folds) if fold not in folds),
            "patients": len(frame),
            "dice_mean": float(dice.mean()), "dice_mean_ci_low": mean_ci[0], "dice_mean_ci_high": mean_ci[1],
            "dice_median": float(np.median(dice)), "dice_median_ci_low": median_ci[0],
            "dice_median_ci_high": median_ci[1],
            "dice_sd": float(dice.std(ddof=1)) if len(dice) > 1 else float("nan"),
            "global_dice_pooled": _pooled_dice(frame),
            f"hd95_{unit}": float(frame["hd95"].mean()),
            "lesion_dice": float(frame["lesion_dice"].mean()),
            "lesion_sensitivity": float(frame["lesion_sensitivity"].mean()),
            "fp_lesions_per_patient": float(frame["false_positive_lesions"].mean()),
            "train_minutes_per_fold": float(np.mean(train_seconds)) / 60,
        })
    return pd.DataFrame(rows)


def _per_fold_rows(summaries: dict[tuple[int, str], dict], unit: str) -> pd.DataFrame:
    rows = []
    for (fold, label), summary in sorted(summaries.items(), key=lambda item: item[0][0]):
        scores = summary["per_patient"]
        rows.append({
            "fold": fold, "model": label, "patients": summary["patients"], "dice_mean": scores["dice"]["mean"],
            "global_dice": summary["global"]["dice"], f"hd95_{unit}": scores["hd95"]["mean"],
            "lesion_dice": scores["lesion_dice"]["mean"],
            "fp_lesions_per_patient": summary["lesions"]["false_positives_per_patient"],
            "train_minutes": (summary["training"]["train_seconds"] or 0.0) / 60,
        })
    return pd.DataFrame(rows)


def _inference_line(summaries: dict[tuple[int, str], dict]) -> str:
    """How the folds' probabilities became masks, from their evaluations' ``summary.json``: checkpoint, flip
    TTA, threshold and where it came from, small-lesion removal, which lesions are kept, scoring resolution
    (each distinct combination of the evaluations, separated by ``|``)."""
    def described(summary: dict) -> str:
        inference = summary.get("inference", {})
        voxels = inference.get("min_lesion_voxels")
        return (f"checkpoint `{summary.get('which', 'best')}`; flip TTA {'on' if inference.get('flip_tta') else 'off'}; "
                f"threshold {summary['threshold']} ({summary.get('threshold_source', 'config')}); "
                + (f"predicted 3D lesions under {voxels} voxels removed" if voxels else "no small-lesion removal")
                + {"largest": ", the largest lesion kept alone", "persistent": ", lesions on a single slice removed"}.get(
                    inference.get("keep_lesions", "all"), "")
                + f"; scored at {'native' if summary.get('native_resolution', True) else 'input'} resolution")

    return "Inference: " + " | ".join(sorted({described(summary) for summary in summaries.values()})) + "."


def _markdown(state: dict[str, Any], summary: pd.DataFrame, per_fold: pd.DataFrame, tests: pd.DataFrame,
              unit: str, summaries: dict[tuple[int, str], dict], stale: list[str], worst: pd.DataFrame) -> str:
    n_folds, settings = state["n_folds"], state["config"]
    labels = [*state["models"], ENSEMBLE]
    lines = [f"# {n_folds}-fold patient-level cross-validation", "",
             f"Data `{paths.shown(settings['data_dir'])}` (target {settings['target']}, {settings['image_size']} px, "
             f"{settings['epochs']} epochs, split seed {settings['split_seed']}); models "
             f"{', '.join(state['models'])}" + (f"; {ENSEMBLE}: the mean of their probabilities" if
                                                 any(ENSEMBLE in fold for fold in state["folds"].values()) else "")
             + ". Folds are numbered from 0.", ""] + ([_inference_line(summaries), ""] if summaries else [])
    missing = {row["model"]: row["missing_folds"] for _, row in summary.iterrows() if row["missing_folds"]}
    not_started = [label for label in labels[:-1] if label not in set(summary.get("model", []))]
    if stale:
        lines += [f"**Left out, gone or scored by an older release**: {', '.join(stale)}. Run the cross-validation "
                  "again to score them anew.", ""]
    if summary.empty:
        lines += ["**No fold is done yet.**", ""]
    elif missing or not_started:
        lines += ["**Partial cross-validation**: the numbers cover only the patients of the folds done. Missing: "
                  + "; ".join([f"{label} fold{'s' if ',' in folds else ''} {folds}" for label, folds in missing.items()]
                              + [f"{label} all folds" for label in not_started]) + ".", ""]
    else:
        lines += [f"All {n_folds} folds done: every patient scored exactly once per model, out of fold.", ""]
    if not summary.empty:
        def with_ci(value: float, low: float, high: float) -> str:
            return f"{value:.3f} [{low:.3f}, {high:.3f}]"

        shown = pd.DataFrame({
            "model": summary["model"], "folds": summary["folds_done"].astype(str) + f"/{n_folds}",
            "patients": summary["patients"],
            "Dice mean [95 % CI]": [with_ci(r.dice_mean, r.dice_mean_ci_low, r.dice_mean_ci_high)
                                    for r in summary.itertuples()],
            "Dice median [95 % CI]": [with_ci(r.dice_median, r.dice_median_ci_low, r.dice_median_ci_high)
                                      for r in summary.itertuples()],
            "Dice sd": summary["dice_sd"].map("{:.3f}".format),
            "global Dice (pooled)": summary["global_dice_pooled"].map("{:.3f}".format),
            f"HD95 ({unit})": summary[f"hd95_{unit}"].map("{:.1f}".format),
            "lesion Dice": summary["lesion_dice"].map("{:.3f}".format),
            "FP lesions / patient": summary["fp_lesions_per_patient"].map("{:.2f}".format),
            "train min / fold": summary["train_minutes_per_fold"].map("{:.1f}".format),
        })
        lines += ["## Out-of-fold scores", "",
                  "Per-patient Dice (3D, all slices of a case) over every out-of-fold patient: mean [95 % bootstrap "
                  "CI of the mean], median [95 % bootstrap CI of the median] and sd. Global Dice is pooled over all "
                  "out-of-fold voxels of all folds together (not the mean of the folds' global Dice, which the "
                  f"per-fold table gives). HD95 in {unit}"
                  + (" (px where the images carry no spacing: an in-plane pixel and a slice step each count 1)"
                     if "px" in unit.split("/") else "")
                  + " (surfel-weighted, as the BraTS 2023 scripts; an empty prediction or truth scores 374)"
                  + ", lesion-wise Dice and false-positive lesions after BraTS-MET 2023, means over patients. The "
                  "bootstrap resamples patients of all folds together: it does not include the variation between "
                  "the folds' trainings. Training minutes: wall-clock mean per fold as recorded, whatever else ran "
                  "on the machine meanwhile (the ensemble: its members together).", "",
                  shown.to_markdown(index=False), "",
                  "## Where the mean is pulled down", "",
                  "Each model's five lowest out-of-fold per-patient Dice, numbers only; `error` in words "
                  "(`report.patient_error`: under-segmented = recall < 0.5 at precision >= 0.8, and so on).", "",
                  worst.to_markdown(index=False, floatfmt=".3f"), "",
                  "## Per fold", "",
                  per_fold.to_markdown(index=False, floatfmt=".3f"), "",
                  "## Paired Wilcoxon signed-rank tests, out-of-fold per-patient Dice", "", WILCOXON_NOTE, "",
                  tests.to_markdown(index=False, floatfmt=".4g") if len(tests) else "(one model: nothing to test)",
                  ""]
    return "\n".join(lines)


def write_summary(out_dir: Path | str, state: dict[str, Any] | None = None) -> CrossValidation:
    """Collect the out-of-fold results recorded in ``<out_dir>/crossval.json`` (or ``state``), check that no
    patient is scored twice (:func:`check_out_of_fold`) and write ``per_patient.csv``, ``summary.csv``,
    ``per_fold.csv``, ``wilcoxon.csv`` and ``summary.md``, saying which folds are missing while partial
    (not done yet, or left out: their evaluation is gone or was scored by an older release)."""
    out_dir = Path(out_dir)
    state = state if state is not None else read_json(out_dir / CROSSVAL_STATE_FILE)
    per_patient, summaries, stale = _fold_results(state)
    check_out_of_fold(per_patient, _all_patients(state), state["n_folds"])
    units = sorted({summary.get("distance_unit", "px") for summary in summaries.values()}) or ["px"]
    unit = "/".join(units)
    labels = [*state["models"], ENSEMBLE]
    summary = _summary_rows(per_patient, summaries, labels, state["n_folds"], unit)
    per_fold = _per_fold_rows(summaries, unit)
    present = [label for label in labels if label in set(per_patient["model"])]
    tests = paired_wilcoxon({label: per_patient[per_patient["model"] == label] for label in present})
    markdown = _markdown(state, summary, per_fold, tests, unit, summaries, stale,
                         worst_patients(per_patient) if len(per_patient) else per_patient)
    per_patient.to_csv(out_dir / "per_patient.csv", index=False)
    summary.to_csv(out_dir / "summary.csv", index=False)
    per_fold.to_csv(out_dir / "per_fold.csv", index=False)
    tests.to_csv(out_dir / "wilcoxon.csv", index=False)
    (out_dir / "summary.md").write_text(markdown)
    return CrossValidation(out_dir, state, per_patient, summary, per_fold, tests, markdown)
