"""Several processes training one run (metaseg_tf.training.processes): the group from flags, Keras' variables
or SLURM; two JAX processes on loopback (gloo) against one process; resuming after a kill; one-line ends."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from conftest import free_port, tiny_config
from metaseg_tf.cli import main
from metaseg_tf.config import ConfigError
from metaseg_tf.training.processes import (
    DEFAULT_PORT,
    ProcessGroup,
    first_slurm_host,
    group_from_environment,
    resolve_group,
)

HELPER = Path(__file__).parent / "helpers" / "train_in_group.py"
needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (dev extra)")


def _jax_env() -> dict[str, str]:
    """One CPU device per process; the coordinator on loopback only."""
    return {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}


def test_group_from_flags_keras_variables_and_slurm() -> None:
    assert resolve_group("127.0.0.1:5000", 2, 1, environ={}) == ProcessGroup("127.0.0.1:5000", 2, 1)
    assert resolve_group(None, None, None, environ={}) is None
    assert resolve_group("h:1", 1, 0, environ={}) is None  # one process: no group
    with pytest.raises(ConfigError, match="go together"):
        resolve_group("h:1", 2, None, environ={})
    keras_env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "n1:7000,n2:7000,n3:7000", "KERAS_DISTRIBUTION_PROCESS_ID": "2"}
    assert group_from_environment(keras_env) == ProcessGroup("n1:7000", 3, 2)
    slurm = {"SLURM_STEP_NUM_TASKS": "4", "SLURM_PROCID": "3", "SLURM_STEP_NODELIST": "gpu[07-09,11],cpu1",
             "SLURM_JOB_ID": "123456"}
    assert group_from_environment(slurm) == ProcessGroup(f"gpu07:{DEFAULT_PORT + 456}", 4, 3)
    assert group_from_environment({**slurm, "METASEG_COORDINATOR_PORT": "6000"}).coordinator == "gpu07:6000"
    assert group_from_environment({"SLURM_STEP_NUM_TASKS": "1", "SLURM_PROCID": "0"}) is None  # an array task alone
    assert group_from_environment({"SLURM_NTASKS": "4", "SLURM_PROCID": "0"}) is None  # the batch script, not srun
    assert first_slurm_host("a17,b2") == "a17" and first_slurm_host("node[003-004]") == "node003"
    for bad in (dict(coordinator="no-port", num_processes=2, process_id=0),
                dict(coordinator="h:1", num_processes=2, process_id=2)):
        with pytest.raises(ConfigError):
            ProcessGroup(**bad)


def test_tensorflow_refuses_several_processes_in_one_line(phantom_dir: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture) -> None:
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow":
        pytest.skip("this session does not run under TensorFlow")
    status = main(["train", "--data", str(phantom_dir), "--runs-root", str(tmp_path), "--coordinator",
                   f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "0"])
    error = capsys.readouterr().err.strip()
    assert status == 2 and "\n" not in error
    assert "needs the JAX backend (KERAS_BACKEND=jax)" in error and "keras-team/keras#20585" in error
    assert not any(tmp_path.iterdir())
    assert main(["pipeline", "--num-processes", "2", "--process-id", "1", "--coordinator", "h:1"]) == 2
    assert "cannot join a process group" in capsys.readouterr().err


@needs_jax
def test_a_coordinator_out_of_reach_ends_in_one_line(phantom_dir: Path, tmp_path: Path) -> None:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "metaseg_tf.cli", "train", "--data", str(phantom_dir), "--runs-root", str(tmp_path),
         "--coordinator", f"127.0.0.1:{free_port()}", "--num-processes", "2", "--process-id", "1",
         "--coordinator-timeout", "3"], env=_jax_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert "metaseg: error: process 1 of 2: cannot reach the coordinator 127.0.0.1:" in done.stderr
    assert "Traceback" not in done.stderr and "Check failure" not in done.stderr
    assert time.monotonic() - started < 90 and not any(tmp_path.iterdir())


def _weights(path: Path) -> list[np.ndarray]:
    with np.load(path) as saved:
        return [saved[f"arr_{k}"] for k in range(len(saved.files))]


def _history(run_dir: Path) -> list[dict[str, str]]:
    with (run_dir / "history.csv").open() as handle:
        return list(csv.DictReader(handle))


@needs_jax
def test_two_processes_train_as_one_on_the_same_global_batches(phantom_dir: Path, tmp_path: Path) -> None:
    """Two JAX CPU processes on 127.0.0.1 (gloo all-reduce), 8 of every 16 slices each, against one process on
    the 16: both end with the same weights, within 1e-5 of the one process's (sums in another order), and
    their validation scores (the last validation batch padded with weight-0 slices) are the one process's."""
    config = tiny_config(phantom_dir, tmp_path, batch_size=16, epochs=2)  # 32 training slices, 8 validation ones
    config.save(tmp_path / "config.json")
    alone = subprocess.run([sys.executable, str(HELPER), str(tmp_path / "config.json"), str(tmp_path / "alone"),
                            str(tmp_path / "alone.npz")], env=_jax_env(), capture_output=True, text=True, timeout=300)
    assert alone.returncode == 0, alone.stderr[-3000:]
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen([sys.executable, str(HELPER), str(tmp_path / "config.json"), str(tmp_path / "together"),
                                   str(tmp_path / f"process{k}.npz"), coordinator, "2", str(k)], env=_jax_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    first, second, reference = (_weights(tmp_path / name) for name in ("process0.npz", "process1.npz", "alone.npz"))
    assert all(np.array_equal(a, b) for a, b in zip(first, second, strict=True))
    assert max(float(np.abs(a - b).max()) for a, b in zip(first, reference, strict=True)) < 1e-5
    (run_dir,) = (tmp_path / "together").iterdir()  # the follower made no folder of its own
    (reference_dir,) = (tmp_path / "alone").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["distribution"] == {
        "processes": 2, "devices": 2, "coordinator": coordinator, "global_batch": 16, "per_process_batch": 8,
        "learning_rate": config.learning_rate}
    together, one = _history(run_dir), _history(reference_dir)
    assert len(together) == len(one) == 2
    for row, expected in zip(together, one, strict=True):
        for key in ("dice", "loss", "val_dice", "val_loss"):
            assert float(row[key]) == pytest.approx(float(expected[key]), abs=1e-5), key
    assert "process 1 of 2 joins training" in outputs[1] and "finished" not in outputs[1]


def _train_command(phantom_dir: Path, tmp_path: Path, coordinator: str, process_id: int) -> list[str]:
    return [sys.executable, "-m", "metaseg_tf.cli", "--quiet", "train", "--data", str(phantom_dir), "--runs-root",
            str(tmp_path / "runs"), "--model", "attention_unet", "--image-size", "32", "--filters", "4", "8", "16",
            "--batch-size", "16", "--epochs", "40", "-p", "early_stopping_patience", "0", "-p", "cache_dir",
            str(tmp_path / "cache"), "--coordinator", coordinator, "--num-processes", "2", "--process-id",
            str(process_id), "--coordinator-timeout", "120"]


@needs_jax
def test_a_run_killed_in_one_process_resumes_when_both_start_again(phantom_dir: Path, tmp_path: Path) -> None:
    """``metaseg train`` in two processes; process 1 is killed after a few epochs (then process 0, as a scheduler
    ends the whole step); the same two commands again resume the run from process 0's backup and finish it."""
    coordinator = f"127.0.0.1:{free_port()}"
    processes = [subprocess.Popen(_train_command(phantom_dir, tmp_path, coordinator, k), env=_jax_env(),
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    deadline = time.monotonic() + 300
    state: dict = {}
    while time.monotonic() < deadline and state.get("epochs_done", 0) < 3:
        time.sleep(0.2)
        found = list((tmp_path / "runs").glob("*/state.json"))
        if found:
            state = json.loads(found[0].read_text() or "{}")
        assert all(process.poll() is None for process in processes), [p.communicate()[0][-2000:] for p in processes]
    assert state.get("epochs_done", 0) >= 3, "the two processes did not train 3 epochs in 5 minutes"
    processes[1].send_signal(signal.SIGKILL)
    processes[0].send_signal(signal.SIGKILL)
    for process in processes:
        process.communicate(timeout=60)
    coordinator = f"127.0.0.1:{free_port()}"
    again = [subprocess.Popen(_train_command(phantom_dir, tmp_path, coordinator, k), env=_jax_env(),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in range(2)]
    outputs = [process.communicate(timeout=300)[0] for process in again]
    assert [process.returncode for process in again] == [0, 0], outputs[0][-3000:] + outputs[1][-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    state = json.loads((run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["resumed"] == 1 and state["epochs_done"] == 40
    assert [int(row["epoch"]) for row in _history(run_dir)][-1] == 39
    assert "the leader has finished; joined 1 training(s)" in outputs[1]
    assert (run_dir / "best.keras").is_file() and not (run_dir / "backup").exists()
