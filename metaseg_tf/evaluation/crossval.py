"""Patient-level k-fold cross-validation of one or more models and their ensemble, in one resumable call.

:func:`crossval` trains, for each fold ``k`` of ``n_folds`` and each model ``m``, the configuration
``config.replace(model=m, n_folds=n_folds, fold=k)`` into a run folder ``<runs root>/<timestamp>-<name>-<m>-fold<k>``
(:func:`~metaseg_tf.training.train.train`), scores it on its test part
(:func:`~metaseg_tf.evaluation.report.evaluate_run`) and, with two or more models, scores the fold's ensemble,
the mean of the models' probabilities (:func:`~metaseg_tf.evaluation.ensemble.evaluate_ensemble`). The test
parts of the folds partition the patients (:func:`~metaseg_tf.data.split.kfold_patients`): every patient is
scored exactly once per model, by a model that never saw it (out of fold); this is checked, not assumed.

The cross-validation's folder ``out_dir`` (default ``results/crossval/<name>``) holds:

====================  ==================================================================================
``crossval.json``     the state: the shared settings, the models, ``n_folds``, and per fold and model the run
                      folder and evaluation folder once done (written atomically after every step)
``per_patient.csv``   out of fold: one row per patient and model (and ``ensemble``): ``model``, ``fold`` and
                      the columns of an evaluation's ``per_patient.csv``
``summary.csv``       one row per model and the ensemble: folds done and missing, patients, per-patient Dice
                      mean and median with 95 % bootstrap CIs, sd, pooled global Dice, HD95, lesion-wise Dice,
                      false-positive lesions per patient, training minutes per fold
``per_fold.csv``      one row per fold and model
``wilcoxon.csv``      paired Wilcoxon signed-rank tests on out-of-fold per-patient Dice, with Holm-adjusted p
``summary.md``        all of it as tables, saying which folds are missing while the cross-validation is partial,
                      with the inference settings and each model's worst patients (numbers only, the error in
                      words: :func:`~metaseg_tf.evaluation.compare.patient_error`)
``fold<k>/``          the fold's ensemble evaluation (``ensemble-test/``)
====================  ==================================================================================

The summary files are rewritten after every fold, so partial results can be read while the rest runs.
Running the same call again skips every step that is done, and an interrupted training continues from its
last epoch (``train``'s own resume); a fold whose evaluation is gone or was scored by an older release
(another :data:`~metaseg_tf.runs.records.EVALUATION_VERSION`) is scored again, never pooled; a folder
that holds a cross-validation of other settings, models or number of folds is refused (:class:`~metaseg_tf.config.ConfigError`), never overwritten or mixed.
Folds are numbered from 0, as ``ExperimentConfig.fold`` and the run names. Folds can run as separate jobs
over one shared folder (``--fold K``, e.g. a SLURM job array; nnU-Net trains its folds the same way): each
fold is worked on under its own lock (``fold<k>.lock``), every save merges the process's folds into
``crossval.json`` under ``crossval-state.lock``, and ``--collect`` summarises what is there without training,
saying which folds are missing. ``metaseg predict`` and ``metaseg
serve`` given this folder use its fold models as one ensemble
(:meth:`~metaseg_tf.inference.predictor.Predictor.from_run`).

The summary files are written from ``crossval.json`` alone by
:func:`~metaseg_tf.evaluation.crossval_summary.write_summary`.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from metaseg_tf import paths
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.evaluation.crossval_summary import ENSEMBLE, CrossValidation, write_summary
from metaseg_tf.evaluation.ensemble import evaluate_ensemble
from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.runs.folders import RunLockedError, hold_run_lock, is_run_dir, newest_run, read_json, write_json
from metaseg_tf.runs.records import CROSSVAL_STATE_FILE, current_summary, newest_evaluation
from metaseg_tf.training.train import train

logger = logging.getLogger(__name__)

STATE_FILE = CROSSVAL_STATE_FILE  # crossval.json
LOCK_FILE = "crossval.lock"  # held while a process works through all folds: a second one is refused
STATE_LOCK = "crossval-state.lock"  # held (waited for) while crossval.json is read or merged
STATE_VERSION = 1
DEFAULT_MODELS = ("nested_unet", "attention_unet")
PER_FOLD_SETTINGS = ("model", "n_folds", "fold")  # set per run; every other setting is shared by all runs


def _shared_settings(config: ExperimentConfig) -> dict[str, Any]:
    """The settings every run of a cross-validation shares: ``config`` less model, n_folds and fold."""
    return {key: value for key, value in config.to_dict().items() if key not in PER_FOLD_SETTINGS}


def _recorded_settings(recorded: dict[str, Any]) -> dict[str, Any]:
    """A state's shared settings with the fields its release predated read at their defaults (as
    :func:`~metaseg_tf.runs.folders.same_config` reads run configs), so that a newer release continues it;
    as recorded where this release does not know a field or refuses a value."""
    try:
        return _shared_settings(ExperimentConfig.from_dict(recorded))
    except ConfigError:
        return recorded


def _open_state(out_dir: Path, config: ExperimentConfig, models: tuple[str, ...], n_folds: int) -> dict[str, Any]:
    """The state of the cross-validation in ``out_dir``: read back when it is this one, new when there is none;
    a :class:`ConfigError` when the folder holds a cross-validation of anything else."""
    path = out_dir / STATE_FILE
    settings = _shared_settings(config)
    if path.is_file():
        state = read_json(path)
        if state.get("version") != STATE_VERSION:
            raise ConfigError(f"{path} was written by another version of crossval (state version "
                              f"{state.get('version')}, not {STATE_VERSION}); choose another --out folder")
        differences, recorded = [], _recorded_settings(state["config"])
        changed = sorted(key for key in set(settings) | set(recorded) if settings.get(key) != recorded.get(key))
        if changed:
            differences.append("settings " + ", ".join(f"{key} ({recorded.get(key)!r} there, "
                                                       f"{settings.get(key)!r} now)" for key in changed))
        if set(state["models"]) != set(models):
            differences.append(f"models ({', '.join(state['models'])} there, {', '.join(models)} now)")
        if state["n_folds"] != n_folds:
            differences.append(f"folds ({state['n_folds']} there, {n_folds} now)")
        if differences:
            raise ConfigError(f"{out_dir} holds a cross-validation of other {'; '.join(differences)}; it is never "
                              "overwritten or mixed: choose another --out folder (or --name)")
        state["models"] = list(models)
        return state
    state = {"version": STATE_VERSION, "config": settings, "models": list(models), "n_folds": n_folds,
             "started": time.strftime("%Y-%m-%d %H:%M:%S"), "folds": {}}
    write_json(path, state)
    return state


def fold_lock(fold: int) -> str:
    """The lock a process holds while it works on ``fold`` (``--fold K`` jobs, or one process going through all)."""
    return f"fold{fold}.lock"


class _Steps:
    """Saves the state after every step and says what happens, one line each, with the minutes elapsed. A save
    merges: under ``STATE_LOCK`` it writes this process's folds into the file as it is now, so that processes
    working on other folds of the same folder (``--fold K``) never overwrite each other."""

    def __init__(self, out_dir: Path, state: dict[str, Any], progress: bool) -> None:
        self.path, self.state, self.progress = out_dir / STATE_FILE, state, progress
        self.start = time.perf_counter()
        self.mine: set[str] = set()  # the folds this process works on

    def say(self, message: str) -> None:
        line = f"[crossval {(time.perf_counter() - self.start) / 60:.1f} min] {message}"
        logger.info(line)
        if self.progress:
            print(line, flush=True)

    def save(self) -> None:
        with hold_run_lock(self.path.parent, STATE_LOCK, "saved", wait=True):
            on_disk = read_json(self.path) if self.path.is_file() else dict(self.state, folds={})
            on_disk["folds"].update({fold: self.state["folds"][fold] for fold in self.mine})
            on_disk["models"], on_disk["updated"] = self.state["models"], time.strftime("%Y-%m-%d %H:%M:%S")
            write_json(self.path, on_disk)
            self.state["folds"] = on_disk["folds"]


def _finished_ensemble(parent: Path, members: list[str]) -> Path | None:
    """An ensemble evaluation of exactly ``members`` on the test split under ``parent`` (one whose process
    was killed before recording it), or None."""
    for folder in sorted(parent.glob(f"{ENSEMBLE}-test*")):
        summary = current_summary(folder)
        if summary is not None and summary.get("split") == "test" and \
                [member["run"] for member in summary.get("members", [])] == members:
            return folder
    return None


def _scored_now(evaluation: str | None) -> bool:
    """Whether a recorded evaluation folder is still there and was scored by this release's scores
    (:func:`~metaseg_tf.runs.records.current_summary`): folds scored by an older one are scored again,
    never pooled with the others."""
    return evaluation is not None and current_summary(evaluation) is not None


def _dice_line(evaluation_dir: Path) -> str:
    summary = read_json(evaluation_dir / "summary.json")
    return f"per-patient Dice {summary['per_patient']['dice']['mean']:.3f} over {summary['patients']} patients"


def _run_fold(fold: int, config: ExperimentConfig, models: tuple[str, ...], n_folds: int, out_dir: Path,
              runs_root: Path, name: str, with_ensemble: bool, steps: _Steps) -> None:
    """Train, evaluate and ensemble what fold ``fold`` still lacks, saving the state after every step."""
    fold_state = steps.state["folds"].setdefault(str(fold), {})
    steps.mine.add(str(fold))
    where = f"fold{fold} ({fold + 1}/{n_folds})"
    for model in models:
        entry = fold_state.setdefault(model, {})
        run_config = config.replace(model=model, n_folds=n_folds, fold=fold)
        run_name = f"{name}-{model}-fold{fold}"
        if "run" in entry and not is_run_dir(Path(entry["run"])):
            raise ConfigError(f"the run {entry['run']} that {steps.path} records for {where} {model} is gone; "
                              "restore it, or start the cross-validation in another --out folder")
        if "run" not in entry:
            # a fold trained by this cross-validation whose process was killed before recording it
            run_dir = newest_run(runs_root, run_name, "finished", run_config, since=steps.state["started"])
            if run_dir is None:
                steps.say(f"{where} {model}: training (run {run_name} under {runs_root})")
                run_dir = train(run_config, runs_root, run_name, progress=steps.progress,
                                resume_since=steps.state["started"]).run_dir
            timings = read_json(run_dir / "timings.json")
            steps.say(f"{where} {model}: trained in {(timings.get('train_seconds') or 0) / 60:.1f} min ({run_dir})")
            entry["run"] = str(run_dir)
            steps.save()
        if "evaluation" in entry and not _scored_now(entry["evaluation"]):
            steps.say(f"{where} {model}: {entry.pop('evaluation')} is gone or was scored by an older release: "
                      "scoring again")
        if "evaluation" not in entry:
            evaluation_dir = newest_evaluation(entry["run"], "test")
            if evaluation_dir is None:
                steps.say(f"{where} {model}: evaluating on the fold's test patients")
                evaluation_dir = evaluate_run(entry["run"], "test", progress=steps.progress).out_dir
            entry["evaluation"] = str(evaluation_dir)
            steps.save()
            steps.say(f"{where} {model}: evaluated: {_dice_line(evaluation_dir)}")
    if with_ensemble and not _scored_now(fold_state.get(ENSEMBLE, {}).get("evaluation")):
        members = [fold_state[model]["run"] for model in models]
        parent = out_dir / f"fold{fold}"
        evaluation_dir = _finished_ensemble(parent, members)
        if evaluation_dir is None:
            steps.say(f"{where} {ENSEMBLE} of {', '.join(models)}: evaluating the mean of their probabilities")
            evaluation_dir = evaluate_ensemble(members, parent, "test", progress=steps.progress).out_dir
        fold_state[ENSEMBLE] = {"members": members, "evaluation": str(evaluation_dir)}
        steps.save()
        steps.say(f"{where} {ENSEMBLE}: evaluated: {_dice_line(evaluation_dir)}")


def _fold_done(fold_state: dict[str, Any], models: tuple[str, ...], with_ensemble: bool) -> bool:
    labels = (*models, ENSEMBLE) if with_ensemble else models
    return all(_scored_now(fold_state.get(label, {}).get("evaluation")) for label in labels)


def crossval(
    config: ExperimentConfig,
    models: Sequence[str] = DEFAULT_MODELS,
    n_folds: int = 5,
    out_dir: Path | str | None = None,
    runs_root: Path | str = paths.RUNS_ROOT,
    name: str = "crossval",
    ensemble: bool = True,
    progress: bool = True,
    max_folds: int | None = None,
    fold: int | None = None,
    collect: bool = False,
) -> CrossValidation:
    """Patient-level ``n_folds``-fold cross-validation of ``models`` on ``config``'s data and settings (its
    ``model``, ``n_folds`` and ``fold`` are set per run), with the ensemble of the models when there are two
    or more and ``ensemble``; see the module docstring for what is written where.

    ``out_dir`` (default ``results/crossval/<name>`` in the project) is the cross-validation's own folder:
    calling again with the same arguments continues it and trains nothing that is done. ``max_folds`` stops
    after working on that many folds that were not done (None: all of them). ``fold``: train and score that
    fold only, as one job of an array that runs the folds on different nodes over a shared folder (each fold
    under its own lock; a process going through all folds skips one that another process holds);
    ``collect``: train nothing, summarise what is there, saying which folds are missing.
    Returns the (possibly partial) out-of-fold results, as written.
    """
    models = tuple(models)
    if not models or len(set(models)) != len(models):
        raise ConfigError(f"crossval needs one or more distinct models, got {list(models)}")
    for model in models:
        config.replace(model=model, n_folds=n_folds, fold=0)  # a bad model name or fold count fails here, at once
    out_dir = paths.resolve(out_dir if out_dir is not None else Path(paths.CROSSVAL_ROOT) / name)
    runs_root = paths.resolve(runs_root)
    with_ensemble = ensemble and len(models) >= 2
    if fold is not None and not 0 <= fold < n_folds:
        raise ConfigError(f"--fold must lie in [0, {n_folds - 1}] for {n_folds} folds, got {fold}")
    if collect and not (out_dir / STATE_FILE).is_file():
        raise ConfigError(f"{out_dir} holds no cross-validation to collect ({STATE_FILE} is missing)")
    if out_dir.is_dir() and not (out_dir / STATE_FILE).is_file() and \
            any(not path.name.endswith((".lock", ".partial")) for path in out_dir.iterdir()):  # locks alone: killed
        # before its state, or another job's state file half-way through its atomic write
        raise ConfigError(f"{out_dir} is not empty and holds no {STATE_FILE}; choose another --out folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    with contextlib.ExitStack() as held:
        if fold is None and not collect:  # one process through all folds: the folder is its own
            held.enter_context(hold_run_lock(out_dir, LOCK_FILE, "cross-validated"))
        with hold_run_lock(out_dir, STATE_LOCK, "saved", wait=True):
            state = _open_state(out_dir, config, models, n_folds)
        steps = _Steps(out_dir, state, progress)
        worked = 0
        for k in range(n_folds) if not collect else ():
            if fold is not None and k != fold or _fold_done(state["folds"].get(str(k), {}), models, with_ensemble):
                continue
            if max_folds is not None and worked >= max_folds:
                steps.say(f"stopping after {worked} fold(s) (max_folds); run again to continue")
                break
            with contextlib.ExitStack() as fold_held:
                try:
                    fold_held.enter_context(hold_run_lock(out_dir, fold_lock(k), f"cross-validated in fold {k}"))
                except RunLockedError:
                    if fold is not None:
                        raise
                    steps.say(f"fold{k}: another process works on it; leaving it to that one")
                    continue
                with hold_run_lock(out_dir, STATE_LOCK, "saved", wait=True):  # as the last holder left it
                    steps.state["folds"] = read_json(out_dir / STATE_FILE)["folds"]
                if _fold_done(steps.state["folds"].get(str(k), {}), models, with_ensemble):
                    continue
                _run_fold(k, config, models, n_folds, out_dir, runs_root, name, with_ensemble, steps)
                steps.mine.discard(str(k))  # the lock goes now: later saves leave this fold to its next holder
            worked += 1
            with hold_run_lock(out_dir, STATE_LOCK, "saved", wait=True):  # fold jobs write the summary in turn
                write_summary(out_dir, read_json(out_dir / STATE_FILE))
        with hold_run_lock(out_dir, STATE_LOCK, "saved", wait=True):
            state = read_json(out_dir / STATE_FILE)
            result = write_summary(out_dir, state)
    done = {str(k) for k, fold_state in state["folds"].items() if _fold_done(fold_state, models, with_ensemble)}
    missing = ", ".join(str(k) for k in range(n_folds) if str(k) not in done)
    steps.say(f"{'complete' if result.complete else 'partial'}{f' (folds missing: {missing})' if missing else ''}: "
              f"{out_dir / 'summary.md'}")
    return result
