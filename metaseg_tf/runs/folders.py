"""Run directories: one folder per training run, never overwritten, and the files in it.

A run folder ``<runs root>/<YYYYmmdd-HHMMSS>-<name>/`` holds:

==================  ====================================================================================
``config.json``     the resolved :class:`~metaseg_tf.config.ExperimentConfig`
``state.json``      ``status`` (``running`` / ``finished``), epochs done, best validation Dice, stop reason
``data.json``       pairs found, used and skipped (with reasons), the patient split, slices per part
``environment.json`` versions of Python, Keras, the backend and key libraries; backend and device
``best.keras``      the model at the epoch of best validation Dice; ``last.keras`` the final model
``history.csv``     one row per epoch (losses, metrics, learning rate)
``timings.json``    seconds per epoch and in total
``callbacks.json``  counters of early stopping and reduce-on-plateau, restored when a killed run resumes
``train.lock``      held (``fcntl``) by the process training into the folder; a second one is refused
``backup/``         Keras ``BackupAndRestore`` state while a run is unfinished (removed when it finishes)
``tensorboard/``    TensorBoard logs, when TensorFlow is installed
==================  ====================================================================================

A run that was killed stays ``running``; training the same configuration again under the same runs root
and name resumes it instead of starting a new folder.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.split import PatientSplit


def read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def write_json(path: Path, data: dict[str, Any]) -> None:
    """Write ``data`` atomically (a temporary file renamed over the target)."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(json.dumps(data, indent=2, default=str) + "\n")
    partial.replace(path)


def new_dir(parent: Path | str, stem: str) -> Path:
    """A new, empty folder ``<parent>/<stem>`` (``<stem>-2``, ``-3`` ... if that exists): never reused."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = parent / (stem if attempt == 1 else f"{stem}-{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RuntimeError(f"could not create a new folder {stem} under {parent}")


def create_run_dir(runs_root: Path | str, name: str) -> Path:
    """A new, empty folder ``<runs_root>/<timestamp>-<name>``."""
    return new_dir(runs_root, f"{time.strftime('%Y%m%d-%H%M%S')}-{name}")


def find_unfinished_run(runs_root: Path | str, name: str, config: ExperimentConfig, since: str = "") -> Path | None:
    """The newest run under ``runs_root`` with ``name`` and exactly ``config`` that did not finish, started at
    or after ``since`` (``%Y-%m-%d %H:%M:%S``)."""
    return newest_run(runs_root, name, "running", config, since)


def newest_run(runs_root: Path | str, name: str, status: str = "finished", config: ExperimentConfig | None = None,
               since: str = "", required: bool = False) -> Path | None:
    """The newest run folder (by its name, which starts with the time it started) directly under ``runs_root``
    named ``name`` (its ``state.json``) in ``status`` (``running`` or ``finished``), started at or after ``since``
    (``%Y-%m-%d %H:%M:%S``) and, if ``config`` is given, trained with exactly that config; None if there is
    none, or with ``required`` a :class:`FileNotFoundError` that says what to run first."""
    runs_root = Path(runs_root)
    for path in sorted(runs_root.iterdir(), reverse=True) if runs_root.is_dir() else []:
        if not is_run_dir(path):
            continue
        state = read_json(path / "state.json")
        if (state.get("name"), state.get("status")) == (name, status) and state.get("started", "") >= since and \
                (config is None or same_config(path / "config.json", config)):
            return path
    if required:
        raise FileNotFoundError(f"no {status} run named {name!r} under {runs_root}: train it first (the notebook or "
                                "`metaseg train` that makes it)")
    return None


def same_config(saved: Path, config: ExperimentConfig) -> bool:
    """Whether the config file ``saved`` holds exactly ``config``, fields it predates read at their defaults."""
    try:
        return ExperimentConfig.load(saved).to_dict() == config.to_dict()
    except ConfigError:  # a field this release does not know, or a value it refuses: another config
        return False


class RunLockedError(ConfigError):
    """Another live process is training into the run folder."""


@contextlib.contextmanager
def hold_run_lock(run_dir: Path | str, lock_name: str = "train.lock", activity: str = "trained",
                  wait: bool = False) -> Iterator[Path]:
    """Hold ``<run_dir>/<lock_name>`` (an exclusive ``fcntl`` lock holding our pid) while training into a run
    (or, with another ``lock_name`` and ``activity``, while working in another folder that one process owns).

    A second process that tries raises :class:`RunLockedError` naming the holder's pid (with ``wait``, it waits
    for the lock instead: for short critical sections, such as merging a shared state file). The operating system
    releases the lock when its process ends, however it ends, so a run killed mid-way is taken over by the
    next start without any clean-up. (Where ``fcntl`` does not exist, on Windows, nothing is locked.)
    """
    path = Path(run_dir) / lock_name
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield path
        return
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise RunLockedError(f"{run_dir} is being {activity} by another process (pid {holder}); wait for it, or "
                                 "stop it, before starting again in this folder") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield path
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def is_run_dir(path: Path) -> bool:
    return (path / "config.json").is_file() and (path / "state.json").is_file()


def load_run_config(run_dir: Path | str) -> ExperimentConfig:
    run_dir = Path(run_dir)
    if not is_run_dir(run_dir):
        raise ConfigError(f"{run_dir} is not a run folder (no config.json and state.json); "
                          "create one with `metaseg train`")
    return ExperimentConfig.load(run_dir / "config.json")


def load_run_split(run_dir: Path | str) -> PatientSplit:
    """The patient split a run was trained with, as recorded in its ``data.json`` when it started."""
    path = Path(run_dir) / "data.json"
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run's patient split is unknown")
    return PatientSplit.from_dict(read_json(path)["split"])


def run_model_path(run_dir: Path | str, which: str = "best") -> Path:
    """``best.keras`` (default) or ``last.keras`` of a run; a clear error when it is missing."""
    path = Path(run_dir) / f"{which}.keras"
    if not path.is_file():
        raise ConfigError(f"{path} does not exist: the run has not saved a {which} model yet")
    return path


def list_runs(runs_root: Path | str, finished_only: bool = True) -> list[Path]:
    """Run folders under ``runs_root`` (recursively), oldest first."""
    runs_root = Path(runs_root)
    if not runs_root.is_dir():
        return []
    runs = [p.parent for p in runs_root.rglob("state.json") if is_run_dir(p.parent)]
    if finished_only:
        runs = [p for p in runs if read_json(p / "state.json").get("status") == "finished"]
    return sorted(runs, key=lambda p: (p.name, str(p)))
