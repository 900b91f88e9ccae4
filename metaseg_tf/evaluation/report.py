"""Evaluate a trained run on a split: the evaluation report.

:func:`evaluate_run` predicts the slices of one split of the run's own patient split through a
:class:`~metaseg_tf.inference.predictor.Predictor` (any engine: Keras, ONNX, OpenVINO; any U-Net++ level;
the masks ``metaseg predict`` writes), scores them with :mod:`metaseg_tf.evaluation.scores` and writes a new
folder ``<run>/evaluation-<split>/`` with

* ``per_image.csv`` and ``per_patient.csv``;
* ``summary.json``: how the masks were made (engine, level, flip TTA, threshold and where it came from,
  small-lesion removal), mean, sd and 95 % bootstrap CI over patients of every per-patient score, the
  pooled-pixel global scores, lesion totals, a threshold sweep and the model's complexity;
* ``learning_curves.png``, ``per_patient_dice.png``, ``threshold_sweep.png`` and ``overlays.png`` (best,
  median and worst patients: the slice with most lesion of each).

Scores are computed at the masks' **native resolution** by default: the probabilities are resized
(bilinear) to each slice's original size before thresholding, so resizing to the model's input does not
erase small lesions from the truth. If the slices differ in size the model's resolution is used and the
summary says so. :func:`write_evaluation` is that scoring-and-writing part, shared with the ensembles
(:mod:`metaseg_tf.evaluation.ensemble`); comparing evaluations is :mod:`metaseg_tf.evaluation.compare`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pandas as pd

from metaseg_tf import plots
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.batches import ExperimentData, load_experiment_data, load_recorded_data
from metaseg_tf.data.io import read_mask_labels
from metaseg_tf.data.volumes import read_case_labels, VolumeReport
from metaseg_tf.evaluation.complexity import model_complexity
from metaseg_tf.evaluation.scores import Evaluation, dice_per_case, evaluate_masks, overlap_scores
from metaseg_tf.inference.loading import inference_network
from metaseg_tf.inference.predictor import Predictor
from metaseg_tf.runs.folders import load_run_config, load_run_split, new_dir, read_json, write_json
from metaseg_tf.runs.records import EVALUATION_VERSION

logger = logging.getLogger(__name__)

SWEEP_THRESHOLDS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


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

def model_spacing(data: ExperimentData, size: int | None) -> dict[str, tuple[float, float, float] | None]:
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

def mean_dice(truth: np.ndarray, pred: np.ndarray, case_ids: np.ndarray) -> dict[str, float]:
    """Mean per-patient (3D) Dice and pooled-pixel global Dice of binary ``(N, H, W)`` masks."""
    return {"patient_dice": float(np.mean(list(dice_per_case(truth, pred, case_ids).values()))),
            "global_dice": overlap_scores(truth, pred)["dice"]}

def _threshold_sweep(truth: np.ndarray, probabilities: np.ndarray, case_ids: np.ndarray, slice_indices: np.ndarray,
                     predictor: Predictor) -> pd.DataFrame:
    """Mean per-patient and global Dice of the first region at each of :data:`SWEEP_THRESHOLDS`: ``truth``
    ``(n, H, W)``, ``probabilities`` ``(n, H, W, R)``, masks made by ``predictor`` as the evaluation makes them
    (its small-lesion removal included)."""
    truth = truth > 0
    return pd.DataFrame([{"threshold": threshold, **mean_dice(
        truth, predictor.masks(probabilities, case_ids, slice_indices, threshold)[..., 0] > 0, case_ids)}
        for threshold in SWEEP_THRESHOLDS])

def example_slices(ranked_cases: Sequence[str], truth: np.ndarray, case_ids: np.ndarray) -> tuple[list[int], list[str]]:
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
    rows, titles = example_slices(ranked, truth, case_ids)
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
    engine: str = "keras",
    level: int | None = None,
) -> RunEvaluation:
    """Score the run's ``which`` model on ``split`` of the patient split recorded when the run started (its
    ``data.json``; the folder is never split again); write a new evaluation folder.

    The masks are the :class:`~metaseg_tf.inference.predictor.Predictor`'s of the run
    (:meth:`~metaseg_tf.inference.predictor.Predictor.from_run`): run by ``engine`` (``keras``, ``onnx``,
    ``openvino``: the run's newest export, made first if needed), of U-Net++ pruned to ``level`` if given, with
    the run's inference settings (``flip_tta``, ``min_lesion_voxels``, ``keep_lesions``, ``threshold_from_validation``;
    :data:`~metaseg_tf.config.INFERENCE_FIELDS`) overridden by ``inference`` (e.g. ``{"flip_tta": True}``: an
    inference ablation without retraining). With ``threshold_from_validation`` and no ``threshold`` given, the
    threshold is the one of :data:`SWEEP_THRESHOLDS` with the best mean per-patient Dice on the run's
    validation patients (:func:`validation_threshold`), whatever ``split`` is scored; ``summary.json`` says
    where the threshold came from (``threshold_source``: config, given, validation) and which engine and level
    made the masks.

    If the data no longer holds some of those patients the evaluation stops with a :class:`DataError` naming
    them; with ``allow_missing_patients`` it scores the ones still there and lists the missing ones in
    ``summary.json``. With ``data_dir`` every slice of that other folder is scored instead (an external test
    set, e.g. a different modality, never split), preprocessed with the run's settings; the folder is
    ``evaluation-external-<its name>``. Folders of other settings than the defaults (best model, the run's
    threshold and inference settings, native resolution, Keras, the whole network) carry them in their name,
    e.g. ``evaluation-test-last-t0.3``, ``evaluation-test-tta-min50-largest-tval`` or ``evaluation-test-openvino-L2``.
    """
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    config = run_config.with_inference(inference)
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
    predictor = Predictor.from_run(run_dir, which, engine, level, threshold=config.threshold if threshold is None
                                   else threshold, flip_tta=config.flip_tta, min_lesion_voxels=config.min_lesion_voxels,
                                   keep_lesions=config.keep_lesions,
                                   batch_size=config.batch_size)
    if choose_threshold:
        validation = data if data_dir is None else load_recorded_data(
            config.replace(data_dir=run_config.data_dir), load_run_split(run_dir), ("val",), progress=progress)[0]
        predictor.threshold = validation_threshold(predictor, validation, progress)
    predictor.threshold_source = "validation" if choose_threshold else "config" if threshold is None else "given"
    probabilities = predictor.probabilities(data.model_inputs(config, indices), progress)
    state, timings = read_json(run_dir / "state.json"), read_json(run_dir / "timings.json")
    threshold = predictor.threshold
    key = "".join([f"-{which}" if which != "best" else "",
                   f"-t{threshold:g}" if threshold != run_config.threshold and not choose_threshold else "",
                   "" if native_resolution else "-input_size", _inference_key(config, run_config),
                   "" if engine == "keras" else f"-{engine}", "" if level is None else f"-L{level}"])
    result = write_evaluation(
        probabilities, data, indices, config, run_dir, f"evaluation-{split}{key}", predictor, native_resolution,
        label=config.model, identity={"run": str(run_dir), "model": config.model, "which": which, "split": split,
                                      "threshold_source": predictor.threshold_source, "engine": engine,
                                      "level": level},
        missing_patients=missing,
        details={"complexity": model_complexity(inference_network(predictor.model, level), batch_size=1,
                                                repeats=10).to_dict(),
                 "training": {"epochs": state.get("epochs_done"), "best_epoch": state.get("best_epoch"),
                              "stop_reason": state.get("stop_reason"), "train_seconds": timings.get("train_seconds")}},
    )
    history = run_dir / "history.csv"
    if history.is_file():
        plots.learning_curves(pd.read_csv(history), result.out_dir / "learning_curves.png", config.model)
    return result


def _inference_key(config: ExperimentConfig, run_config: ExperimentConfig) -> str:
    """The evaluation folder's suffix for inference settings other than the run's own."""
    if config.inference_settings() == run_config.inference_settings():
        return ""
    return "".join(["-tta" if config.flip_tta else "", f"-min{config.min_lesion_voxels}" if config.min_lesion_voxels
                    else "", "" if config.keep_lesions == "all" else f"-{config.keep_lesions}",
                    "-tval" if config.threshold_from_validation else ""]) or "-plain"


def validation_threshold(predictor: Predictor, data: ExperimentData, progress: bool = False) -> float:
    """The threshold of :data:`SWEEP_THRESHOLDS` whose masks (``predictor``'s, with its flip TTA and
    small-lesion removal) give the best mean per-patient Dice of the target's first region on the validation
    patients of ``data`` (:func:`best_threshold`)."""
    indices = data.split.indices(data.dataset.case_ids, "val")
    if len(indices) == 0:
        raise ConfigError("threshold_from_validation needs validation patients; this run's split has none")
    probabilities = predictor.probabilities(lambda config: data.model_inputs(config, indices), progress)
    return best_threshold(probabilities, data, indices, predictor)


def best_threshold(probabilities: np.ndarray, data: ExperimentData, indices: np.ndarray,
                   predictor: Predictor) -> float:
    """The threshold of :data:`SWEEP_THRESHOLDS` with the best mean per-patient Dice of the target's first region
    for ``probabilities`` ``(n, S, S, R)`` of the slices ``indices`` of ``data``, after ``predictor``'s
    small-lesion removal, scored at the slices' native size where it is known; the lowest such threshold on a
    tie."""
    labels = _native_truth(data, indices)
    if labels is not None:
        probabilities = _to_size(probabilities, labels.shape[1:])
    else:
        labels = data.dataset.masks[indices]
    truth = data.target(predictor.config).masks(labels)[..., 0]
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    sweep = _threshold_sweep(truth, probabilities, case_ids, slice_indices, predictor)
    return float(sweep["threshold"].iloc[int(np.argmax(sweep["patient_dice"].to_numpy()))])


def write_evaluation(
    probabilities: np.ndarray,
    data: ExperimentData,
    indices: np.ndarray,
    config: ExperimentConfig,
    parent: Path,
    folder_name: str,
    predictor: Predictor,
    native_resolution: bool,
    label: str,
    identity: dict,
    missing_patients: Sequence[str] = (),
    details: dict | None = None,
) -> RunEvaluation:
    """Score probabilities of known slices and write them into a new folder ``<parent>/<folder_name>``
    (``-2``, ``-3`` ... if it exists; :func:`~metaseg_tf.runs.folders.new_dir`): the scoring and writing
    part of :func:`evaluate_run`, shared with :func:`evaluate_ensemble`.

    ``probabilities`` ``float32 (n, S, S, R)`` are those of the slices at ``indices`` of ``data`` (one
    channel per region of ``config.target``, at the model's ``S = config.image_size``). At
    ``native_resolution`` they are resized (bilinear) to the slices' native size before ``predictor`` makes the
    masks (:meth:`~metaseg_tf.inference.predictor.Predictor.masks`: its threshold and small-lesion removal);
    each region is scored on the label map those masks are written as (innermost region wins, read back by
    region: what a challenge evaluator scores in a ``-seg`` file). Writes ``per_image.csv``, ``per_patient.csv`` (and ``per_patient-<region>.csv`` for every
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
    spacing = model_spacing(data, None if native is not None else config.image_size)
    distance_unit = "mm" if spacing and all(v is not None for v in spacing.values()) else "px"
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    # the regions of the label map that would be written (innermost region wins), as the BraTS scripts score a file
    truth = target.masks(labels)
    pred = target.masks(target.to_labels(predictor.masks(probabilities, case_ids, slice_indices))) > 0
    evaluations = {region: evaluate_masks(truth[..., r], pred[..., r], case_ids, slice_indices, spacing or None)
                   for r, region in enumerate(target.names)}
    evaluation = evaluations[target.names[0]]
    sweep = _threshold_sweep(truth[..., 0], probabilities, case_ids, slice_indices, predictor)
    truth, probabilities, pred = truth[..., 0], probabilities[..., 0], pred[..., 0]
    images = data.dataset.images[indices]

    out_dir = new_dir(parent, folder_name)
    evaluation.per_image.to_csv(out_dir / "per_image.csv", index=False)
    evaluation.per_patient.to_csv(out_dir / "per_patient.csv", index=False)
    for region, region_evaluation in list(evaluations.items())[1:]:
        region_evaluation.per_patient.to_csv(out_dir / f"per_patient-{region}.csv", index=False)
    patients = evaluation.per_patient
    summary = {
        **identity, "threshold": predictor.threshold,
        "native_resolution": native_resolution, "resolution": resolution, "missing_patients": list(missing_patients),
        "evaluation_version": EVALUATION_VERSION, "patients": len(patients), "slices": len(indices),
        "target": config.target, "label_convention": data.dataset.convention, "distance_unit": distance_unit,
        "inference": config.inference_settings(),
        "masks": predictor.inference_record(),
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
