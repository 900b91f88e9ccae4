"""Evaluating an ensemble of runs on their shared recorded patient split.

The ensemble is a :class:`~metaseg_tf.inference.predictor.Predictor` of several runs
(:meth:`~metaseg_tf.inference.predictor.Predictor.from_runs`: the mean of the members' probabilities, each
member with its own preprocessing and engine, thresholded once), so the masks scored here are those that
``metaseg predict`` and the web app make with the same runs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.batches import ExperimentData, load_recorded_data
from metaseg_tf.evaluation.report import best_threshold, RunEvaluation, write_evaluation
from metaseg_tf.inference.predictor import Predictor
from metaseg_tf.paths import resolve
from metaseg_tf.runs.folders import load_run_config, load_run_split, read_json


@dataclass
class SplitProbabilities:
    """Probabilities ``float32 (n, S, S, R)`` of the slices at ``indices`` (``n`` of them) of ``data``, and the
    ``predictor`` that made them."""

    data: ExperimentData
    indices: np.ndarray
    probabilities: np.ndarray
    predictor: Predictor


def _check_ensemble_members(run_dirs: Sequence[Path], configs: Sequence[ExperimentConfig]) -> None:
    """Refuse (:class:`ConfigError`) runs that cannot be averaged slice by slice on a split: other recorded
    patient splits or data folders than the first run's (what else members must share is
    :data:`~metaseg_tf.inference.predictor.ENSEMBLE_SETTINGS`, checked by the predictor)."""
    first, reference = run_dirs[0], configs[0]
    split = load_run_split(first)
    for run_dir, config in zip(run_dirs[1:], configs[1:]):
        if load_run_split(run_dir) != split:
            raise ConfigError(f"{run_dir} was trained on another patient split (its data.json) than {first}; "
                              "an ensemble averages runs of one split")
        if resolve(config.data_dir) != resolve(reference.data_dir):
            raise ConfigError(f"the ensemble's runs must share data_dir: {run_dir} has {config.data_dir!r}, "
                              f"{first} {reference.data_dir!r}")


def ensemble_probabilities(run_dirs: Sequence[Path | str], split: str = "test", which: str = "best",
                           progress: bool = True, predictor: Predictor | None = None) -> SplitProbabilities:
    """The mean of the runs' probabilities on ``split`` of their (shared) recorded patient split, made by
    ``predictor`` (default :meth:`~metaseg_tf.inference.predictor.Predictor.from_runs` of ``run_dirs``, model
    ``which``).

    Each run reads the slices with its own preprocessing and 2.5D context (``data.model_inputs(config,
    indices)``), so runs of different ``context_slices`` or CLAHE settings can be averaged, and its network is
    read at its last output (for U-Net++ with deep supervision the deepest head, as in
    :func:`~metaseg_tf.evaluation.report.evaluate_run`). The result is ``mean_k p_k``, ``float32 (n, S, S, R)``
    for the ``n`` slices of ``split`` at the runs' ``S = image_size`` with ``R`` regions of their target;
    ``data`` is the first run's. One run gives its own probabilities. Runs that differ in split, data folder,
    target, image size, threshold or inference settings are refused (:class:`ConfigError`), as are
    preprocessings that kept different slices.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if not run_dirs:
        raise ValueError("an ensemble needs at least one run")
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    _check_ensemble_members(run_dirs, configs)
    predictor = predictor or Predictor.from_runs(run_dirs, which, threshold=configs[0].threshold,
                                                 batch_size=configs[0].batch_size)
    recorded = load_run_split(run_dirs[0])
    loaded: dict[str, ExperimentData] = {}  # by preprocessing key: runs preprocessed alike share one load

    def data_for(config: ExperimentConfig) -> tuple[ExperimentData, np.ndarray]:
        key = config.preprocessing_key()
        if key not in loaded:
            loaded[key] = load_recorded_data(config, recorded, (split,), progress=progress)[0]
        return loaded[key], loaded[key].split.indices(loaded[key].dataset.case_ids, split)

    data, indices = data_for(configs[0])
    if len(indices) == 0:
        raise ValueError(f"the {split} part of {run_dirs[0]} has no slices")

    def inputs(config: ExperimentConfig) -> np.ndarray:
        member_data, member_indices = data_for(config)
        if not (np.array_equal(member_data.dataset.case_ids[member_indices], data.dataset.case_ids[indices])
                and np.array_equal(member_data.dataset.slice_indices[member_indices],
                                   data.dataset.slice_indices[indices])):
            raise ConfigError(f"the preprocessing of a run (key {config.preprocessing_key()}) kept other {split} "
                              f"slices than that of {run_dirs[0]}; their probabilities cannot be averaged slice "
                              "by slice")
        return member_data.model_inputs(config, member_indices)

    return SplitProbabilities(data, indices, predictor.probabilities(inputs, progress), predictor)


def evaluate_ensemble(
    run_dirs: Sequence[Path | str],
    out_dir: Path | str,
    split: str = "test",
    which: str = "best",
    native_resolution: bool = True,
    progress: bool = True,
) -> RunEvaluation:
    """Score the ensemble of two or more runs on ``split`` of their shared recorded patient split; write the
    evaluation files of :func:`~metaseg_tf.evaluation.report.evaluate_run` (``per_image.csv``,
    ``per_patient.csv``, ``summary.json`` with ``"model": "ensemble"`` and the member runs, the plots) into a
    new folder ``<out_dir>/ensemble-<split>`` (``-2``, ``-3`` ... if it exists; never overwritten).

    The ensemble's probability of a pixel is the mean of the members' probabilities
    (:func:`ensemble_probabilities`), ``float32 (n, S, S, R)``, made into masks by the ensemble's predictor at
    the members' threshold, which must be the same (as must split, data folder, target, image size and
    inference settings; else :class:`ConfigError`); with ``threshold_from_validation`` at the ensemble's own
    best threshold on the validation patients (:func:`~metaseg_tf.evaluation.report.best_threshold`). A run
    may be listed twice (it then scores as itself). ``summary.json``'s ``training.train_seconds`` is the
    members' total, the ensemble's training cost.
    """
    run_dirs = [Path(run_dir) for run_dir in run_dirs]
    if len(run_dirs) < 2:
        raise ValueError("an ensemble needs at least two runs")
    ensemble = ensemble_probabilities(run_dirs, split, which, progress)
    predictor = ensemble.predictor
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    predictor.threshold, predictor.threshold_source = configs[0].threshold, "config"
    if configs[0].threshold_from_validation:  # the ensemble's own best threshold on the validation patients
        validation = ensemble_probabilities(run_dirs, "val", which, progress, predictor)
        predictor.threshold = best_threshold(validation.probabilities, validation.data, validation.indices,
                                             predictor)
        predictor.threshold_source = "validation"
    members = [{"run": str(run_dir), "model": config.model} for run_dir, config in zip(run_dirs, configs)]
    train_seconds = sum(read_json(run_dir / "timings.json").get("train_seconds") or 0.0 for run_dir in run_dirs)
    return write_evaluation(
        ensemble.probabilities, ensemble.data, ensemble.indices, configs[0], resolve(out_dir), f"ensemble-{split}",
        predictor, native_resolution, label="ensemble",
        identity={"model": "ensemble", "members": members, "which": which, "split": split,
                  "threshold_source": predictor.threshold_source, "engine": predictor.engine_name,
                  "level": predictor.level},
        details={"training": {"train_seconds": train_seconds}},
    )
