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

The module is longer than ~450 lines on purpose: the resumable steps and the summary written from their state
after every fold are one concept, and the summary reads nothing but ``crossval.json``.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from metaseg_tf import paths
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.discover import DataError
from metaseg_tf.evaluation.compare import worst_patients
from metaseg_tf.evaluation.ensemble import evaluate_ensemble
from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.evaluation.scores import bootstrap_ci
from metaseg_tf.evaluation.stats import WILCOXON_NOTE, paired_wilcoxon
from metaseg_tf.runs.folders import RunLockedError, hold_run_lock, is_run_dir, load_run_split, newest_run, read_json, write_json
from metaseg_tf.runs.records import CROSSVAL_STATE_FILE, current_summary, newest_evaluation
from metaseg_tf.training.train import train

logger = logging.getLogger(__name__)

STATE_FILE = CROSSVAL_STATE_FILE  # crossval.json
LOCK_FILE = "crossval.lock"  # held while a process works through all folds: a second one is refused
STATE_LOCK = "crossval-state.lock"  # held (waited for) while crossval.json is read or merged
STATE_VERSION = 1
ENSEMBLE = "ensemble"  # the label of the models' ensemble in the state and the tables
DEFAULT_MODELS = ("nested_unet", "attention_unet")
PER_FOLD_SETTINGS = ("model", "n_folds", "fold")  # set per run; every other setting is shared by all runs


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
             f"Data `{settings['data_dir']}` (target {settings['target']}, {settings['image_size']} px, "
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
    state = state if state is not None else read_json(out_dir / STATE_FILE)
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
