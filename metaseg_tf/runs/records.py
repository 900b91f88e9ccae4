"""What a run folder records about work done on it: its evaluations (which is current, which was made with given
settings, the threshold one chose on the validation patients) and, for a cross-validation folder, the runs it
trained.

An evaluation folder ``<run>/evaluation-<split>[-<settings>]`` is written by
:func:`~metaseg_tf.evaluation.report.evaluate_run`; its ``summary.json`` says with which model, threshold,
inference settings, engine and pruning level the masks were made. This module only reads those records, so
prediction (a run that chooses its threshold on validation) and the web app (the scores it shows) need not
import the reporting code.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.paths import resolve
from metaseg_tf.runs.folders import is_run_dir, load_run_config, read_json

logger = logging.getLogger(__name__)

# what summary.json's scores mean; evaluations of another version are never reused (3: per-region scores of
# the run's target, HD95 and lesion volumes in mm where the voxel spacing is known; 2: BraTS-MET 2023
# lesion-wise scores, slices placed by number, masks read as any non-zero label, the run's recorded split)
EVALUATION_VERSION = 3
CROSSVAL_STATE_FILE = "crossval.json"  # a cross-validation folder's state (metaseg_tf.evaluation.crossval)


def current_summary(evaluation_dir: Path | str) -> dict[str, Any] | None:
    """An evaluation folder's ``summary.json`` where it is there (the evaluation finished) and was scored by
    this release (:data:`EVALUATION_VERSION`); None otherwise."""
    path = resolve(evaluation_dir) / "summary.json"
    if not path.is_file():
        return None
    summary = read_json(path)
    return summary if summary.get("evaluation_version") == EVALUATION_VERSION else None


def newest_evaluation(run_dir: Path | str, split: str = "test", which: str = "best", threshold: float | None = None,
                      native_resolution: bool = True, inference: dict[str, Any] | None = None,
                      engine: str = "keras", level: int | None = None) -> Path | None:
    """The newest evaluation folder of a run on ``split`` made with exactly these settings (model ``which``,
    ``threshold``, default the run's own or the one chosen on validation, resolution, the run's inference
    settings overridden by ``inference``, the ``engine`` and U-Net++ pruning ``level`` that made the masks, as
    :func:`~metaseg_tf.evaluation.report.evaluate_run` takes them), read from each folder's ``summary.json``;
    None if there is none. Evaluations with other settings, or made by a release whose scores meant something
    else (:data:`EVALUATION_VERSION`), are never mixed in. Newest: by ``summary.json``'s modification time."""
    run_dir = Path(run_dir)
    run_config = load_run_config(run_dir)
    config = run_config.with_inference(inference)
    chosen_on_validation = threshold is None and config.threshold_from_validation
    threshold = run_config.threshold if threshold is None else threshold

    def same_threshold(summary: dict) -> bool:
        source = summary.get("threshold_source", "config")  # older summaries: never chosen on validation
        if chosen_on_validation:
            return source == "validation"
        return source != "validation" and bool(np.isclose(summary.get("threshold", float("nan")), threshold))

    settings = config.inference_settings()
    before_inference_settings = ExperimentConfig().inference_settings()
    wanted = (split, which, native_resolution, engine, level)
    found = []
    for folder in run_dir.glob("evaluation-*"):
        summary = current_summary(folder)
        # summaries written before engines and levels were recorded: Keras, the whole network; before an
        # inference setting existed (e.g. keep_lesions): its default
        if summary is not None and (summary.get("split"), summary.get("which"), summary.get("native_resolution"),
                                    summary.get("engine", "keras"), summary.get("level")) == wanted and \
                {**before_inference_settings, **summary.get("inference", {})} == settings and same_threshold(summary):
            found.append(folder)
    return max(found, key=lambda p: (p / "summary.json").stat().st_mtime) if found else None


def chosen_threshold(run_dir: Path | str, which: str = "best") -> float | None:
    """The threshold that the run's newest test evaluation of model ``which``, with the run's own inference
    settings, chose on the validation patients (``threshold_from_validation``); None where the run does not
    choose its threshold on validation, or no evaluation has chosen it yet."""
    if not load_run_config(run_dir).threshold_from_validation:
        return None
    evaluation = newest_evaluation(run_dir, "test", which)
    return None if evaluation is None else float(read_json(evaluation / "summary.json")["threshold"])


def run_threshold(run_dir: Path | str, which: str = "best") -> tuple[float, str]:
    """The threshold the run's model ``which`` predicts at, and its source: the one its newest evaluation chose
    on the validation patients (``validation``: :func:`chosen_threshold`) for a run trained with
    ``threshold_from_validation``; else, and with a warning before any evaluation has chosen one, the
    config's (``config``)."""
    chosen = chosen_threshold(run_dir, which)
    if chosen is not None:
        return chosen, "validation"
    config = load_run_config(run_dir)
    if config.threshold_from_validation:
        logger.warning("%s chooses its threshold on the validation patients, but no evaluation has chosen it yet "
                       "(run `metaseg evaluate %s`): using the config's %g", run_dir, run_dir, config.threshold)
    return config.threshold, "config"


def is_crossval_dir(path: Path | str) -> bool:
    """Whether ``path`` is a cross-validation folder (it holds :data:`CROSSVAL_STATE_FILE`)."""
    return (Path(path) / CROSSVAL_STATE_FILE).is_file()


def crossval_runs(crossval_dir: Path | str, models: tuple[str, ...] | None = None) -> list[Path]:
    """The trained fold runs a cross-validation folder records, fold by fold, of ``models`` (default: every
    model it trained); a :class:`ConfigError` where it records none, or a recorded run is gone."""
    crossval_dir = Path(crossval_dir)
    state = read_json(crossval_dir / CROSSVAL_STATE_FILE)
    models = tuple(state.get("models", ())) if models is None else models
    runs = [Path(fold[model]["run"]) for _, fold in sorted(state.get("folds", {}).items(), key=lambda kv: int(kv[0]))
            for model in models if "run" in fold.get(model, {})]
    gone = [str(run) for run in runs if not is_run_dir(run)]
    if gone:
        raise ConfigError(f"{crossval_dir} records fold runs that are gone: {', '.join(gone)}")
    if not runs:
        raise ConfigError(f"{crossval_dir} records no trained fold run of {', '.join(models) or 'any model'} yet")
    return runs
