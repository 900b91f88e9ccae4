"""The training engine's Keras callbacks: run progress and callback state on disk, checkpoints and backups,
and which of them a process of a process group has (:mod:`metaseg_tf.training.processes`).

:func:`engine_callbacks` is the list :func:`~metaseg_tf.training.train.train` fits with, in the order that
matters (see its comments): process 0 (or a process alone) gets all; a follower gets those that steer
training (early stopping, reduce-on-plateau, the time limit) and reads the leader's backup, writing nothing.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import keras

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.runs.folders import read_json, write_json
from metaseg_tf.training.processes import agree, current_group


class RunProgress(keras.callbacks.Callback):
    """Keeps ``state.json`` and ``timings.json`` current after every epoch (``run_dir`` ``None``: in memory
    only) and stops at the time limit (in a process group when process 0 reaches it, so that all stop
    together)."""

    def __init__(self, run_dir: Path | None, state: dict[str, Any], timings: dict[str, Any], monitor: str,
                 time_limit_s: float) -> None:
        super().__init__()
        self.run_dir, self.state, self.timings = run_dir, state, timings
        self.monitor, self.time_limit_s = monitor, time_limit_s
        self.hit_time_limit = False
        self._epoch_start = 0.0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch_start = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        seconds = time.perf_counter() - self._epoch_start
        self.timings["epoch_seconds"].append(round(seconds, 3))
        self.timings["train_seconds"] = round(sum(self.timings["epoch_seconds"]), 3)
        value = (logs or {}).get(self.monitor)
        if value is not None and value > self.state.get("best_value", float("-inf")):
            self.state.update(best_value=float(value), best_epoch=epoch + 1)
        self.state["epochs_done"] = epoch + 1
        if self.run_dir is not None:
            write_json(self.run_dir / "timings.json", self.timings)
            write_json(self.run_dir / "state.json", self.state)
        if self.time_limit_s and agree(self.timings["train_seconds"] >= self.time_limit_s):
            self.hit_time_limit = True
            self.model.stop_training = True


class CallbackState(keras.callbacks.Callback):
    """Keeps the counters of early stopping and reduce-on-plateau (``wait``, ``best``, cooldown, best and
    stopped epoch) in ``callbacks.json`` after every epoch and puts them back when a killed run resumes, so it
    decays its learning rate and stops at the same epochs as an uninterrupted run would. Must come after the
    callbacks it watches (their ``on_train_begin`` resets the counters first)."""

    FIELDS = ("wait", "best", "cooldown_counter", "best_epoch", "stopped_epoch")

    def __init__(self, path: Path, watched: dict[str, keras.callbacks.Callback], writer: bool = True) -> None:
        super().__init__()
        self.path, self.watched, self.writer = path, watched, writer

    def on_train_begin(self, logs: dict | None = None) -> None:
        saved = read_json(self.path) if self.path.is_file() else {}
        for name, callback in self.watched.items():
            for field_name, value in saved.get(name, {}).items():
                setattr(callback, field_name, value)

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if not self.writer:
            return

        def plain(value: Any) -> Any:
            return None if value is None else float(value) if isinstance(value, float) or hasattr(value, "dtype") \
                else value

        write_json(self.path, {name: {f: plain(getattr(callback, f)) for f in self.FIELDS if hasattr(callback, f)}
                               for name, callback in self.watched.items()})


@contextlib.contextmanager
def saving_alone() -> Iterator[None]:
    """No ``keras.distribution`` while process 0 saves alone: saving makes throw-away variables (Keras' saving
    builds an optimiser to list what to skip), which under a multi-process distribution would be placed with
    a collective the other processes never join. The weights themselves are replicated on every process and
    read without one."""
    previous = keras.distribution.distribution()
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


class LeaderCheckpoint(keras.callbacks.ModelCheckpoint):
    """``ModelCheckpoint`` saving alone (:func:`saving_alone`): process 0 of a process group."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with saving_alone():
            super().on_epoch_end(epoch, logs)


class LeaderBackup(keras.callbacks.BackupAndRestore):
    """``BackupAndRestore`` saving alone (:func:`saving_alone`): process 0 of a process group."""

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        with saving_alone():
            super().on_epoch_end(epoch, logs)


# the files keras.callbacks.BackupAndRestore keeps in its folder (``.bkp``: the previous epoch's, with double_checkpoint)
BACKUP_WEIGHTS, BACKUP_METADATA = "latest.weights.h5", "training_metadata.json"


def _readable(weights: Path) -> bool:
    """Whether every array of an HDF5 weights file can be read (a kill while it was written leaves it broken)."""
    import h5py

    def read(name: str, item: Any) -> None:
        if isinstance(item, h5py.Dataset):
            item[()]

    try:
        with h5py.File(weights, "r") as handle:
            handle.visititems(read)
        return True
    except (OSError, KeyError, ValueError, RuntimeError):
        return False


def settle_backup(run_dir: Path, state: dict[str, Any], timings: dict[str, Any]) -> int:
    """Before a killed run resumes, once and before any process reads the backup: a newest backup the kill cut
    short is replaced by the previous epoch's (what ``BackupAndRestore`` would do itself when it finds it
    broken, which in a process group would happen in one process and not in another, so that they would no
    longer take the same steps); then ``state["epochs_done"]``, the epoch times and ``history.csv`` are set
    back to the epoch the backup resumes at (a kill between ``state.json`` and the backup leaves them one
    epoch ahead). Returns that epoch."""
    backup = run_dir / "backup"
    weights, metadata = backup / BACKUP_WEIGHTS, backup / BACKUP_METADATA
    if weights.exists() and not _readable(weights):
        previous = weights.with_name(BACKUP_WEIGHTS + ".bkp")
        if previous.exists() and _readable(previous):
            previous.replace(weights)
            old_metadata = metadata.with_name(BACKUP_METADATA + ".bkp")
            if old_metadata.exists():
                old_metadata.replace(metadata)
            else:
                metadata.unlink(missing_ok=True)
        else:  # nothing to resume from: the run starts again at epoch 0
            weights.unlink()
            metadata.unlink(missing_ok=True)
    epoch = int(read_json(metadata)["epoch"]) if weights.exists() and metadata.exists() else 0
    state["epochs_done"] = epoch
    timings["epoch_seconds"] = timings.get("epoch_seconds", [])[:epoch]
    timings["train_seconds"] = round(sum(timings["epoch_seconds"]), 3)
    history = run_dir / "history.csv"
    if history.is_file():
        lines = history.read_text().splitlines(keepends=True)
        kept = lines[:1] + [line for line in lines[1:] if line.split(",", 1)[0].isdigit() and int(line.split(",", 1)[0]) < epoch]
        history.write_text("".join(kept))
    return epoch


class RestoreOnly(keras.callbacks.BackupAndRestore):
    """A follower's ``BackupAndRestore``: restores the leader's backup when a run resumes (settled by the leader
    first, :func:`settle_backup`), never writes it."""

    def on_train_begin(self, logs: dict | None = None) -> None:
        self._load_model()

    def _save_model(self) -> None:
        pass

    def on_train_end(self, logs: dict | None = None) -> None:
        pass


def engine_callbacks(run_dir: Path, config: ExperimentConfig, monitor: str, state: dict, progress: RunProgress,
               early_stopping: keras.callbacks.EarlyStopping, writer: bool = True) -> list[keras.callbacks.Callback]:
    """The engine's callbacks; a follower (``writer`` False) has those that steer training, none that write;
    process 0 of a group saves alone (:class:`LeaderCheckpoint`, :class:`LeaderBackup`)."""
    grouped = current_group() is not None
    checkpoint = LeaderCheckpoint if grouped else keras.callbacks.ModelCheckpoint
    callbacks: list[keras.callbacks.Callback] = [
        checkpoint(str(run_dir / "best.keras"), monitor=monitor, mode="max", save_best_only=True,
                   initial_value_threshold=state.get("best_value")),
    ] if writer else []
    watched: dict[str, keras.callbacks.Callback] = {}
    if config.lr_schedule == "plateau":  # before the CSV logger, so that the history records the rate
        watched["reduce_lr_on_plateau"] = keras.callbacks.ReduceLROnPlateau(
            monitor=monitor, mode="max", factor=0.5, patience=max(2, config.early_stopping_patience // 3),
            min_lr=config.learning_rate / 100)
        callbacks.append(watched["reduce_lr_on_plateau"])
    callbacks += [keras.callbacks.CSVLogger(str(run_dir / "history.csv"), append=True)] if writer else []
    callbacks.append(progress)
    if config.early_stopping_patience:
        watched["early_stopping"] = early_stopping
        callbacks.append(early_stopping)
    callbacks.append(CallbackState(run_dir / "callbacks.json", watched, writer))
    if not writer:
        return [*callbacks, RestoreOnly(str(run_dir / "backup"))]
    with contextlib.suppress(ImportError):
        import tensorboard  # noqa: F401  (with TensorFlow: the writer Keras' callback needs; optional)
        import tensorflow  # noqa: F401

        callbacks.append(keras.callbacks.TensorBoard(str(run_dir / "tensorboard"), write_graph=False))
    # last: its end-of-epoch backup then holds the learning rate reduce-on-plateau has just set, and is
    # written after state.json and callbacks.json, so a kill never leaves those behind the backup; double: a
    # kill while the weights are written leaves the previous epoch's backup to resume from
    backup = LeaderBackup if grouped else keras.callbacks.BackupAndRestore
    callbacks.append(backup(str(run_dir / "backup"), delete_checkpoint=True, double_checkpoint=True))
    return callbacks
