"""The training engine's callbacks: a backup cut short by a kill is settled before a run resumes."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np

from metaseg_tf.training.callbacks import settle_backup


def _backup(run_dir: Path, epoch: int, suffix: str = "") -> None:
    backup = run_dir / "backup"
    backup.mkdir(parents=True, exist_ok=True)
    with h5py.File(backup / f"latest.weights.h5{suffix}", "w") as handle:
        handle["layer/kernel"] = np.full((4, 4), epoch, np.float32)
    (backup / f"training_metadata.json{suffix}").write_text(json.dumps({"epoch": epoch, "batch": 0}))


def _history(run_dir: Path, epochs: int) -> None:
    (run_dir / "history.csv").write_text("epoch,dice\n" + "".join(f"{k},0.{k}\n" for k in range(epochs)))


def test_a_backup_cut_short_gives_way_to_the_previous_epochs(tmp_path: Path) -> None:
    _backup(tmp_path, 2, ".bkp")
    _backup(tmp_path, 3)
    weights = tmp_path / "backup" / "latest.weights.h5"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # killed while writing epoch 3's
    _history(tmp_path, 4)  # state.json and history.csv were written before the backup: one epoch ahead
    state, timings = {"epochs_done": 4}, {"epoch_seconds": [1.0, 2.0, 3.0, 4.0], "train_seconds": 10.0}
    assert settle_backup(tmp_path, state, timings) == 2
    with h5py.File(weights, "r") as handle:
        assert handle["layer/kernel"][0, 0] == 2
    assert state["epochs_done"] == 2 and timings == {"epoch_seconds": [1.0, 2.0], "train_seconds": 3.0}
    assert (tmp_path / "history.csv").read_text() == "epoch,dice\n0,0.0\n1,0.1\n"


def test_a_whole_backup_is_left_as_it_is_and_none_means_epoch_zero(tmp_path: Path) -> None:
    _backup(tmp_path, 3)
    state, timings = {"epochs_done": 3}, {"epoch_seconds": [1.0, 1.0, 1.0]}
    assert settle_backup(tmp_path, state, timings) == 3 and state["epochs_done"] == 3
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    state = {"epochs_done": 1}  # killed after state.json, before the first backup
    assert settle_backup(fresh, state, {"epoch_seconds": [5.0]}) == 0 and state["epochs_done"] == 0
