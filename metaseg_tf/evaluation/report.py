"""Evaluate a trained run on a split, and compare runs: the evaluation report.

:func:`evaluate_run` predicts the slices of one split of the run's own patient split, scores them with
:mod:`metaseg_tf.evaluation.scores` and writes a new folder ``<run>/evaluation-<split>/`` with

* ``per_image.csv`` and ``per_patient.csv``;
* ``summary.json``: mean, sd and 95 % bootstrap CI over patients of every per-patient score, the
  pooled-pixel global scores, lesion totals, a threshold sweep and the model's complexity;
* ``learning_curves.png``, ``per_patient_dice.png``, ``threshold_sweep.png`` and ``overlays.png`` (best,
  median and worst patients: the slice with most lesion of each).

Scores are computed at the masks' **native resolution** by default: the probabilities are resized
(bilinear) to each slice's original size before thresholding, so resizing to the model's input does not
erase small lesions from the truth. If the slices differ in size the model's resolution is used and the
summary says so. :func:`write_evaluation` is that scoring-and-writing part, for probabilities from anywhere.

:func:`evaluate_ensemble` does the same for the mean of several runs' probabilities on their shared recorded
split (:func:`ensemble_probabilities`), into a new ``ensemble-<split>/`` folder.

:func:`compare_runs` puts several evaluations side by side in one table with a paired Wilcoxon
signed-rank test on per-patient Dice, and writes ``comparison.md``, ``comparison.csv`` and
``per_patient_dice.png``.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd
from scipy import stats

from metaseg_tf import plots
from metaseg_tf.config import INFERENCE_FIELDS, ConfigError, ExperimentConfig
from metaseg_tf.data.batches import ExperimentData, load_experiment_data, load_recorded_data
from metaseg_tf.data.io import read_mask_labels
from metaseg_tf.data.volumes import VolumeReport, read_case_labels
from metaseg_tf.evaluation.complexity import model_complexity
from metaseg_tf.evaluation.scores import Evaluation, dice_per_case, evaluate_masks, overlap_scores
from metaseg_tf.models.nested_unet import average_heads, head_names, prune_nested_unet
from metaseg_tf.paths import resolve
from metaseg_tf.predict import load_model, predict_probabilities, remove_small_lesions
from metaseg_tf.training.runs import load_run_config, load_run_split, new_dir, read_json, write_json

logger = logging.getLogger(__name__)

SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


# what summary.json's scores mean; evaluations of another version are never reused (3: per-region scores of
# the run's target, HD95 and lesion volumes in mm where the voxel spacing is known; 2: BraTS-MET 2023
# lesion-wise scores, slices placed by number, masks read as any non-zero label, the run's recorded split)
EVALUATION_VERSION = 3


def _native_truth(data: ExperimentData, indices: np.ndarray) -> np.ndarray | None:
    """The labels ``(n, H, W)`` of the slices at ``indices`` at their native size (re-read from the files;
    volumes in canonical orientation), or None when slices of the split differ in size."""
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    if isinstance(data.report, VolumeReport):
        cases = {case.case_id: case for case in data.report.cases}
        volumes = {case: read_case_labels(cases[case]) for case in dict.fromkeys(case_ids.tolist())}
        labels = [volumes[case][int(k)] for case, k in zip(case_ids, slice_indices)]
    else:
        pairs = {(pair.case_id, pair.slice_index): pair for pair in data.report.pairs}
        labels = [read_mask_labels(pairs[(case, int(k))].mask_path).labels for case, k in zip(case_ids, slice_indices)]
    if len({m.shape for m in labels}) != 1:
        return None
    return np.minimum(np.stack(labels), 255).astype(np.uint8)


def _spacing(data: ExperimentData, size: int | None) -> dict[str, tuple[float, float, float] | None]:
    """Voxel spacing in mm per case of a volume layout (None: unknown), at the native grid or, with ``size``,
    at the model's ``size x size`` slices."""
    spacing = {}
    for case, geometry in data.dataset.geometry.items():
        native = geometry.get("spacing")
        if native is None or size is None:
            spacing[case] = None if native is None else tuple(native)
        else:
            rows, columns = geometry["shape"][1:]
            spacing[case] = (native[0], native[1] * rows / size, native[2] * columns / size)
    return spacing


def _to_size(probabilities: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """``(n, S, S, R)`` -> ``(n, H, W, R)``, bilinear."""
    if probabilities.shape[1:3] == shape:
        return probabilities
    return np.stack([cv2.resize(p, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR).reshape(*shape, -1)
                     for p in probabilities])


def _mean_dice(truth: np.ndarray, pred: np.ndarray, case_ids: np.ndarray) -> dict[str, float]:
    """Mean per-patient (3D) Dice and pooled-pixel global Dice of binary ``(N, H, W)`` masks."""
    return {"patient_dice": float(np.mean(list(dice_per_case(truth, pred, case_ids).values()))),
            "global_dice": overlap_scores(truth, pred)["dice"]}


def _threshold_sweep(truth: np.ndarray, probabilities: np.ndarray, case_ids: np.ndarray, slice_indices: np.ndarray,
                     config: ExperimentConfig) -> pd.DataFrame:
    """Mean per-patient and global Dice of the first region at each of :data:`SWEEP_THRESHOLDS`: ``truth``
    ``(n, H, W)``, ``probabilities`` ``(n, H, W, R)``, masks made as the evaluation makes them (``config``'s
    small-lesion removal included)."""
    truth = truth > 0
    return pd.DataFrame([{"threshold": threshold, **_mean_dice(
        truth, _masks(probabilities, threshold, case_ids, slice_indices, config)[..., 0], case_ids)}
        for threshold in SWEEP_THRESHOLDS])


def _example_slices(ranked_cases: Sequence[str], truth: np.ndarray, case_ids: np.ndarray) -> tuple[list[int], list[str]]:
    """The best, median and worst of ``ranked_cases`` (best first); of each the slice with most true lesion."""
    chosen = {"best": ranked_cases[0], "median": ranked_cases[len(ranked_cases) // 2], "worst": ranked_cases[-1]}
    rows, titles = [], []
    for rank, case in chosen.items():
        members = np.flatnonzero(case_ids == case)
        rows.append(int(members[np.argmax(truth[members].reshape(len(members), -1).sum(axis=1))]))
        titles.append(f"{rank}: {case}")
    return rows, titles


def _resized_masks(masks: np.ndarray, rows: Sequence[int], shape: tuple[int, int]) -> list[np.ndarray]:
    return [cv2.resize(masks[k].astype(np.uint8), shape, interpolation=cv2.INTER_NEAREST) for k in rows]


def _overlay_examples(evaluation: Evaluation, images: np.ndarray, truth: np.ndarray, pred: np.ndarray,
                      case_ids: np.ndarray, label: str, path: Path) -> Path:
    """Best, median and worst patient by Dice; of each the slice with the largest true lesion."""
    ranked = evaluation.per_patient.sort_values("dice", ascending=False)["case_id"].tolist()
    rows, titles = _example_slices(ranked, truth, case_ids)
    shape = images.shape[1:3]
    return plots.overlay_grid([images[k] for k in rows], _resized_masks(truth, rows, shape),
                              {label: _resized_masks(pred, rows, shape)}, titles, path)


@dataclass
class RunEvaluation:
    """Where an evaluation was written, its scores and its summary (the content of ``summary.json``)."""

    out_dir: Path
    evaluation: Evaluation
    summary: dict


def evaluate_run(
    run_dir: Path | str,
    split: str = "test",
    which: str = "best",
    threshold: float | None = None,
    native_resolution: bool = True,
    data: ExperimentData | None = None,
    data_dir: Path | str | None = None,
    progress: bool = True,
    allow_missing_patients: bool = False,
    inference: dict[str, Any] | None = None,
) -> RunEvaluation:
    """Score the run's ``which`` model on ``split`` of the patient split recorded when the run started (its
    ``data.json``; the folder is never split again); write a new evaluation folder.

    How probabilities become masks follows the run's config (``flip_tta``, ``min_lesion_voxels``,
    ``threshold_from_validation``; :data:`~metaseg_tf.config.INFERENCE_FIELDS`), overridden by ``inference``
    (e.g. ``{"flip_tta": True}``: an inference ablation without retraining). With ``threshold_from_validation``
    and no ``threshold`` given, the threshold is the one of :data:`SWEEP_THRESHOLDS` with the best mean
    per-patient Dice on the run's validation patients (:func:`validation_threshold`), whatever ``split`` is
    scored; ``summary.json`` says where the threshold came from (``threshold_source``: config, given, validation).

    If the data no longer holds some of those patients the evaluation stops with a :class:`DataError` naming
    them; with ``allow_missing_patients`` it scores the ones still there and lists the missing ones in
    ``summary.json``. With ``data_dir`` every slice of that other folder is scored instead (an external test
    set, e.g. a different modality, never split), preprocessed with the run's settings; the folder is
    ``evaluation-external-<its name>``. Folders of other settings than the defaults (best model, the run's
    threshold and inference settings, native resolution) carry them in their name, e.g.
    ``evaluation-test-last-t0.3`` or ``evaluation-test-tta-min50-tval``.
    """
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    config = _with_inference(run_config, inference)
    choose_threshold = threshold is None and config.threshold_from_validation
    missing: list[str] = []
    if data_dir is not None:
        config = config.replace(data_dir=str(data_dir))
        split = f"external-{Path(data_dir).name}"
        data = data or load_experiment_data(config, progress=progress, external=True)
    else:
        parts = (split, "val") if choose_threshold and split != "val" else (split,)
        data, missing = load_recorded_data(config, load_run_split(run_dir), parts, allow_missing_patients,
                                           data, progress)
    indices = data.split.indices(data.dataset.case_ids, "test" if data_dir is not None else split)
    if len(indices) == 0:
        raise ValueError(f"the {split} part of {run_dir} has no slices")
    model = load_model(run_dir, which)
    if choose_threshold:
        validation = data if data_dir is None else load_recorded_data(
            config.replace(data_dir=run_config.data_dir), load_run_split(run_dir), ("val",), progress=progress)[0]
        threshold = validation_threshold(model, validation, config, progress)
    source = "validation" if choose_threshold else "config" if threshold is None else "given"
    threshold = config.threshold if threshold is None else threshold
    probabilities = predict_probabilities(model, data.model_inputs(config, indices), config.normalisation,
                                          config.batch_size, progress, config.flip_tta)
    state, timings = read_json(run_dir / "state.json"), read_json(run_dir / "timings.json")
    key = "".join([f"-{which}" if which != "best" else "",
                   f"-t{threshold:g}" if threshold != run_config.threshold and not choose_threshold else "",
                   "" if native_resolution else "-input_size", _inference_key(config, run_config)])
    result = write_evaluation(
        probabilities, data, indices, config, run_dir, f"evaluation-{split}{key}", threshold, native_resolution,
        label=config.model, identity={"run": str(run_dir), "model": config.model, "which": which, "split": split,
                                      "threshold_source": source},
        missing_patients=missing,
        details={"complexity": model_complexity(model, batch_size=1, repeats=10).to_dict(),
                 "training": {"epochs": state.get("epochs_done"), "best_epoch": state.get("best_epoch"),
                              "stop_reason": state.get("stop_reason"), "train_seconds": timings.get("train_seconds")}},
    )
    history = run_dir / "history.csv"
    if history.is_file():
        plots.learning_curves(pd.read_csv(history), result.out_dir / "learning_curves.png", config.model)
    return result


def _with_inference(config: ExperimentConfig, inference: dict[str, Any] | None) -> ExperimentConfig:
    """``config`` with the inference settings ``inference`` (only :data:`INFERENCE_FIELDS`) applied."""
    unknown = sorted(set(inference or {}) - set(INFERENCE_FIELDS))
    if unknown:
        raise ConfigError(f"not inference settings: {', '.join(unknown)}; choose from {', '.join(INFERENCE_FIELDS)}")
    return config.replace(**inference) if inference else config


def _inference_settings(config: ExperimentConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in INFERENCE_FIELDS}


def _inference_key(config: ExperimentConfig, run_config: ExperimentConfig) -> str:
    """The evaluation folder's suffix for inference settings other than the run's own."""
    if _inference_settings(config) == _inference_settings(run_config):
        return ""
    return "".join(["-tta" if config.flip_tta else "", f"-min{config.min_lesion_voxels}" if config.min_lesion_voxels
                    else "", "-tval" if config.threshold_from_validation else ""]) or "-plain"


def _masks(probabilities: np.ndarray, threshold: float, case_ids: np.ndarray, slice_indices: np.ndarray,
           config: ExperimentConfig) -> np.ndarray:
    """Thresholded ``(n, H, W, R)`` masks, without predicted lesions (3D components per case) smaller than
    ``config.min_lesion_voxels`` voxels of this grid."""
    masks = probabilities >= threshold
    if not config.min_lesion_voxels:
        return masks
    return np.stack([remove_small_lesions(masks[..., r], case_ids, slice_indices, config.min_lesion_voxels)
                     for r in range(masks.shape[-1])], axis=-1).astype(bool)


def validation_threshold(model, data: ExperimentData, config: ExperimentConfig, progress: bool = False) -> float:
    """The threshold of :data:`SWEEP_THRESHOLDS` whose masks (after ``config``'s flip TTA and small-lesion
    removal) give the best mean per-patient Dice of the target's first region on the validation patients of
    ``data`` (:func:`best_threshold`)."""
    indices = data.split.indices(data.dataset.case_ids, "val")
    if len(indices) == 0:
        raise ConfigError("threshold_from_validation needs validation patients; this run's split has none")
    probabilities = predict_probabilities(model, data.model_inputs(config, indices), config.normalisation,
                                          config.batch_size, progress, config.flip_tta)
    return best_threshold(probabilities, data, indices, config)


def best_threshold(probabilities: np.ndarray, data: ExperimentData, indices: np.ndarray,
                   config: ExperimentConfig) -> float:
    """The threshold of :data:`SWEEP_THRESHOLDS` with the best mean per-patient Dice of the target's first region
    for ``probabilities`` ``(n, S, S, R)`` of the slices ``indices`` of ``data``, after ``config``'s small-lesion
    removal, scored at the slices' native size where it is known; the lowest such threshold on a tie."""
    labels = _native_truth(data, indices)
    if labels is not None:
        probabilities = _to_size(probabilities, labels.shape[1:])
    else:
        labels = data.dataset.masks[indices]
    truth = data.target(config).masks(labels)[..., 0]
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    sweep = _threshold_sweep(truth, probabilities, case_ids, slice_indices, config)
    return float(sweep["threshold"].iloc[int(np.argmax(sweep["patient_dice"].to_numpy()))])


def write_evaluation(
    probabilities: np.ndarray,
    data: ExperimentData,
    indices: np.ndarray,
    config: ExperimentConfig,
    parent: Path,
    folder_name: str,
    threshold: float,
    native_resolution: bool,
    label: str,
    identity: dict,
    missing_patients: Sequence[str] = (),
    details: dict | None = None,
) -> RunEvaluation:
    """Score probabilities of known slices and write them into a new folder ``<parent>/<folder_name>``
    (``-2``, ``-3`` ... if it exists; :func:`~metaseg_tf.training.runs.new_dir`): the scoring and writing
    part of :func:`evaluate_run`, shared with :func:`evaluate_ensemble`.

    ``probabilities`` ``float32 (n, S, S, R)`` are those of the slices at ``indices`` of ``data`` (one
    channel per region of ``config.target``, at the model's ``S = config.image_size``). At
    ``native_resolution`` they are resized (bilinear) to the slices' native size before thresholding at
    ``threshold``. Writes ``per_image.csv``, ``per_patient.csv`` (and ``per_patient-<region>.csv`` for every
    further region), ``summary.json`` (``identity`` first, then the scores, then ``details``) and the plots
    ``per_patient_dice.png`` (labelled ``label``), ``threshold_sweep.png`` and ``overlays.png``.
    """
    target = data.target(config)
    labels = data.dataset.masks[indices]
    resolution = f"model input {config.image_size} px"
    native = _native_truth(data, indices) if native_resolution else None
    if native is not None:
        labels = native
        probabilities = _to_size(probabilities, labels.shape[1:])
        resolution = f"native {labels.shape[1]} x {labels.shape[2]} px"
    elif native_resolution:
        logger.warning("slices differ in size: scoring at the model's %d px instead of native size", config.image_size)
    spacing = _spacing(data, None if native is not None else config.image_size)
    distance_unit = "mm" if spacing and all(v is not None for v in spacing.values()) else "px"
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    truth, pred = target.masks(labels), _masks(probabilities, threshold, case_ids, slice_indices, config)
    evaluations = {region: evaluate_masks(truth[..., r], pred[..., r], case_ids, slice_indices, spacing or None)
                   for r, region in enumerate(target.names)}
    evaluation = evaluations[target.names[0]]
    sweep = _threshold_sweep(truth[..., 0], probabilities, case_ids, slice_indices, config)
    truth, probabilities, pred = truth[..., 0], probabilities[..., 0], pred[..., 0]
    images = data.dataset.images[indices]

    out_dir = new_dir(parent, folder_name)
    evaluation.per_image.to_csv(out_dir / "per_image.csv", index=False)
    evaluation.per_patient.to_csv(out_dir / "per_patient.csv", index=False)
    for region, region_evaluation in list(evaluations.items())[1:]:
        region_evaluation.per_patient.to_csv(out_dir / f"per_patient-{region}.csv", index=False)
    patients = evaluation.per_patient
    summary = {
        **identity, "threshold": threshold,
        "native_resolution": native_resolution, "resolution": resolution, "missing_patients": list(missing_patients),
        "evaluation_version": EVALUATION_VERSION, "patients": len(patients), "slices": len(indices),
        "target": config.target, "label_convention": data.dataset.convention, "distance_unit": distance_unit,
        "inference": _inference_settings(config),
        **evaluation.summary(),
        "regions": {region: {"labels": "any non-zero" if target.regions[region] is None else list(target.regions[region]),
                             **region_evaluation.summary()} for region, region_evaluation in evaluations.items()},
        "lesions": {"truth": int(patients["truth_lesions"].sum()), "detected": int(patients["detected_lesions"].sum()),
                    "false_positives": int(patients["false_positive_lesions"].sum()),
                    "false_positives_per_patient": float(patients["false_positive_lesions"].mean())},
        "threshold_sweep": sweep.to_dict(orient="records"),
        **(details or {}),
    }
    write_json(out_dir / "summary.json", summary)
    plots.distribution({label: patients["dice"]}, out_dir / "per_patient_dice.png")
    plots.threshold_sweep(sweep, out_dir / "threshold_sweep.png")
    _overlay_examples(evaluation, images, truth, pred, case_ids, label, out_dir / "overlays.png")
    return RunEvaluation(out_dir, evaluation, summary)


@dataclass
class SplitProbabilities:
    """Probabilities ``float32 (n, S, S, R)`` of the slices at ``indices`` (``n`` of them) of ``data``."""

    data: ExperimentData
    indices: np.ndarray
    probabilities: np.ndarray


def _check_ensemble_members(run_dirs: Sequence[Path], configs: Sequence[ExperimentConfig]) -> None:
    """Refuse (:class:`ConfigError`) runs that cannot be averaged slice by slice: other recorded patient
    splits, data folders, targets, model resolutions or thresholds than the first run's."""
    first, reference = run_dirs[0], configs[0]
    split = load_run_split(first)
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        if load_run_split(run_dir) != split:
            raise ConfigError(f"{run_dir} was trained on another patient split (its data.json) than {first}; "
                              "an ensemble averages runs of one split")
        for setting in ("data_dir", "target", "image_size", "threshold", *INFERENCE_FIELDS):
            mine, theirs = getattr(config, setting), getattr(reference, setting)
            if (resolve(mine) != resolve(theirs)) if setting == "data_dir" else mine != theirs:
                raise ConfigError(f"the ensemble's runs must share {setting}: {run_dir} has {mine!r}, "
                                  f"{first} {theirs!r}")


def ensemble_probabilities(run_dirs: Sequence[Path | str], split: str = "test", which: str = "best",
                           progress: bool = True) -> SplitProbabilities:
    """The mean of the runs' probabilities on ``split`` of their (shared) recorded patient split.

    Each run reads the slices with its own preprocessing and 2.5D context (``data.model_inputs(config,
    indices)``), so runs of different ``context_slices`` or CLAHE settings can be averaged, and its ``which``
    model's probabilities are read at Keras' last output (for U-Net++ with deep supervision the deepest head,
    as in :func:`evaluate_run`). The result is ``mean_k p_k``, ``float32 (n, S, S, R)`` for the ``n`` slices
    of ``split`` at the runs' ``S = image_size`` with ``R`` regions of their target; ``data`` is the first
    run's. One run gives its own probabilities. Runs that differ in split, data folder, target, image size
    or threshold are refused (:class:`ConfigError`), as are preprocessings that kept different slices.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise ValueError("an ensemble needs at least one run")
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    _check_ensemble_members(run_dirs, configs)
    recorded = load_run_split(run_dirs[0])
    loaded: dict[str, ExperimentData] = {}  # by preprocessing key: runs preprocessed alike share one load
    first: tuple[ExperimentData, np.ndarray] | None = None
    total = np.zeros(0)
    for run_dir, config in zip(run_dirs, configs):
        data, _ = load_recorded_data(config, recorded, (split,), data=loaded.get(config.preprocessing_key()),
                                     progress=progress)
        loaded[config.preprocessing_key()] = data
        indices = data.split.indices(data.dataset.case_ids, split)
        if len(indices) == 0:
            raise ValueError(f"the {split} part of {run_dir} has no slices")
        probabilities = predict_probabilities(load_model(run_dir, which), data.model_inputs(config, indices),
                                              config.normalisation, config.batch_size, progress, config.flip_tta)
        if first is None:
            first, total = (data, indices), probabilities.astype(np.float64)
            continue
        reference, reference_indices = first
        if not (np.array_equal(data.dataset.case_ids[indices], reference.dataset.case_ids[reference_indices])
                and np.array_equal(data.dataset.slice_indices[indices],
                                   reference.dataset.slice_indices[reference_indices])):
            raise ConfigError(f"the preprocessing of {run_dir} kept other {split} slices than that of {run_dirs[0]}; "
                              "their probabilities cannot be averaged slice by slice")
        total += probabilities
    return SplitProbabilities(*first, (total / len(run_dirs)).astype(np.float32))


def evaluate_ensemble(
    run_dirs: Sequence[Path | str],
    out_dir: Path | str,
    split: str = "test",
    which: str = "best",
    native_resolution: bool = True,
    progress: bool = True,
) -> RunEvaluation:
    """Score the ensemble of two or more runs on ``split`` of their shared recorded patient split; write the
    evaluation files of :func:`evaluate_run` (``per_image.csv``, ``per_patient.csv``, ``summary.json`` with
    ``"model": "ensemble"`` and the member runs, the plots) into a new folder ``<out_dir>/ensemble-<split>``
    (``-2``, ``-3`` ... if it exists; never overwritten).

    The ensemble's probability of a pixel is the mean of the members' probabilities
    (:func:`ensemble_probabilities`: each member with its own preprocessing, at Keras' last output, i.e.
    U-Net++'s deepest head), ``float32 (n, S, S, R)``, thresholded at the members' threshold, which must be
    the same (as must split, data folder, target, image size and inference settings; else
    :class:`ConfigError`); with ``threshold_from_validation`` at the ensemble's own best threshold on the
    validation patients (:func:`best_threshold`). A run may be
    listed twice (it then scores as itself). ``summary.json``'s ``training.train_seconds`` is the members'
    total, the ensemble's training cost.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    ensemble = ensemble_probabilities(run_dirs, split, which, progress)
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    threshold, source = configs[0].threshold, "config"
    if configs[0].threshold_from_validation:  # the ensemble's own best threshold on the validation patients
        validation = ensemble_probabilities(run_dirs, "val", which, progress)
        threshold, source = best_threshold(validation.probabilities, validation.data, validation.indices,
                                           configs[0]), "validation"
    members = [{"run": str(run_dir), "model": config.model} for run_dir, config in zip(run_dirs, configs)]
    train_seconds = sum(read_json(run_dir / "timings.json").get("train_seconds") or 0.0 for run_dir in run_dirs)
    return write_evaluation(
        ensemble.probabilities, ensemble.data, ensemble.indices, configs[0], resolve(out_dir), f"ensemble-{split}",
        threshold, native_resolution, label="ensemble",
        identity={"model": "ensemble", "members": members, "which": which, "split": split,
                  "threshold_source": source},
        details={"training": {"train_seconds": train_seconds}},
    )


def latest_evaluation(run_dir: Path | str, split: str = "test", which: str = "best", threshold: float | None = None,
                      native_resolution: bool = True, inference: dict[str, Any] | None = None) -> Path | None:
    """The newest evaluation folder of a run on ``split`` made with exactly these settings (model ``which``,
    ``threshold``, default the run's own or the one chosen on validation, resolution, and the run's inference
    settings overridden by ``inference``, as :func:`evaluate_run` takes them), read from each folder's
    ``summary.json``; None if there is none. Evaluations with other settings, or made by a release whose
    scores meant something else (:data:`EVALUATION_VERSION`), are never mixed in."""
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    config = _with_inference(run_config, inference)
    chosen_on_validation = threshold is None and config.threshold_from_validation
    threshold = run_config.threshold if threshold is None else threshold

    def same_threshold(summary: dict) -> bool:
        source = summary.get("threshold_source", "config")  # older summaries: never chosen on validation
        if chosen_on_validation:
            return source == "validation"
        return source != "validation" and bool(np.isclose(summary.get("threshold", float("nan")), threshold))

    settings = _inference_settings(config)
    before_inference_settings = _inference_settings(ExperimentConfig())
    found = []
    for folder in run_dir.glob("evaluation-*"):
        summary = current_summary(folder)
        if summary is not None and (summary.get("split"), summary.get("which"), summary.get("native_resolution")) \
                == (split, which, native_resolution) and \
                summary.get("inference", before_inference_settings) == settings and same_threshold(summary):
            found.append(folder)
    return max(found, key=lambda p: (p / "summary.json").stat().st_mtime) if found else None


def current_summary(evaluation_dir: Path | str) -> dict[str, Any] | None:
    """An evaluation folder's ``summary.json`` where it is there (the evaluation finished) and was scored by
    this release (:data:`EVALUATION_VERSION`); None otherwise."""
    path = resolve(evaluation_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path)
    return summary if summary.get("evaluation_version") == EVALUATION_VERSION else None


def chosen_threshold(run_dir: Path | str, which: str = "best") -> float | None:
    """The threshold that the run's newest test evaluation of model ``which``, with the run's own inference
    settings, chose on the validation patients (``threshold_from_validation``); None where the run does not
    choose its threshold on validation, or no evaluation has chosen it yet."""
    if not load_run_config(run_dir).threshold_from_validation:
        return None
    evaluation = latest_evaluation(run_dir, "test", which)
    return None if evaluation is None else float(read_json(evaluation / "summary.json")["threshold"])


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


WILCOXON_NOTE = ("Difference a - b; `pairs_nonzero`: the patients whose scores differ (the test ranks only those); "
                 "`p_holm`: p adjusted for the table's several tests (Holm), which are not independent when a "
                 "run is tested against several others or an ensemble against its own members.")


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

    Each run's newest evaluation with exactly these settings (:func:`latest_evaluation`; ``threshold`` None:
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
        evaluation_dir = latest_evaluation(run_dir, split, which, threshold, native_resolution)
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
        "case). HD95 in mm where the voxel spacing is known, else in pixels. Lesion-wise scores after BraTS-MET "
        "2023. Latency: one image, batch 1.", "",
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


def _split_images(run_dir: Path | str, config: ExperimentConfig, split: str, data: ExperimentData | None,
                  progress: bool) -> tuple[ExperimentData, np.ndarray]:
    """The run's data with its recorded split, and the slices of ``split``."""
    data, _ = load_recorded_data(config, load_run_split(run_dir), (split,), data=data, progress=progress)
    indices = data.split.indices(data.dataset.case_ids, split)
    if len(indices) == 0:
        raise ValueError(f"the {split} part of the split has no slices")
    return data, indices


def prune_level_scores(run_dir: Path | str, split: str = "val", data: ExperimentData | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Accuracy against cost of a trained U-Net++ pruned to each level L1..L<depth> (Zhou et al. 2019,
    section III-C) and of the mean of its heads, on ``split`` at the model's resolution.

    Returns one row per variant: ``label``, ``patient_dice`` (mean over patients), ``global_dice``,
    ``parameters``, ``gflops_per_image`` and ``latency_ms`` (batch 1). The pruned models reuse the trained
    weights; nothing is retrained.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    model = load_model(run_dir)
    levels = head_names(model)
    if not levels:
        raise ValueError(f"{run_dir} holds no U-Net++ with deep-supervision heads")
    data, indices = _split_images(run_dir, config, split, data, progress)
    images, truth = data.model_inputs(config, indices), data.truth(config, indices)
    case_ids = data.dataset.case_ids[indices]
    variants = {f"L{k}": prune_nested_unet(model, k) for k in range(1, len(levels) + 1)}
    variants["mean of heads"] = average_heads(model)
    rows = []
    for label, variant in variants.items():
        pred = predict_probabilities(variant, images, config.normalisation, config.batch_size, False) >= config.threshold
        pred, region_truth = pred[..., 0], truth[..., 0]
        complexity = model_complexity(variant, batch_size=1, repeats=10)
        rows.append({"label": label, **_mean_dice(region_truth, pred, case_ids), "parameters": complexity.parameters,
                     "gflops_per_image": (complexity.flops_per_image or float("nan")) / 1e9,
                     "latency_ms": complexity.latency_ms})
    return pd.DataFrame(rows)


def side_by_side_overlays(run_dirs: Sequence[Path | str], labels: Sequence[str], path: Path | str,
                          split: str = "test", data: ExperimentData | None = None, progress: bool = True) -> Path:
    """Best, median and worst patients (ranked by the models' mean per-patient Dice) with every model's
    prediction beside the truth, at the model's resolution. The runs must share one patient split."""
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    data, indices = _split_images(run_dirs[0], configs[0], split, data, progress)
    images, truth = data.dataset.images[indices], data.truth(configs[0], indices)[..., 0]
    case_ids = data.dataset.case_ids[indices]
    predictions, dice = {}, []
    for label, run_dir, config in zip(labels, run_dirs, configs):
        if (config.image_size, config.target) != (configs[0].image_size, configs[0].target) or \
                load_run_split(run_dir) != load_run_split(run_dirs[0]):
            raise ValueError(f"{run_dir} was trained at another size, on another target or on another patient "
                             f"split than {run_dirs[0]}")
        model = load_model(run_dir)
        probabilities = predict_probabilities(model, data.model_inputs(config, indices), config.normalisation,
                                              config.batch_size, False)
        predictions[label] = probabilities[..., 0] >= config.threshold
        dice.append(dice_per_case(truth, predictions[label], case_ids))
    mean_dice = {case: float(np.mean([scores[case] for scores in dice])) for case in dice[0]}
    ranked = sorted(mean_dice, key=mean_dice.get, reverse=True)
    rows, titles = _example_slices(ranked, truth, case_ids)
    return plots.overlay_grid([images[k] for k in rows], [truth[k] for k in rows],
                              {label: [pred[k] for k in rows] for label, pred in predictions.items()}, titles, path)


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
