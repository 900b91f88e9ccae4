"""Training engine: run folders, resuming a killed run, reproducibility, data-parallel training."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from conftest import add_patient_copy, tiny_config

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.discover import DataError
from metaseg_tf.runs.folders import list_runs, RunLockedError
from metaseg_tf.training.train import train

RUN_FILES = {"config.json", "state.json", "data.json", "environment.json", "best.keras", "last.keras",
             "history.csv", "timings.json"}


class StopAfterEpoch(keras.callbacks.Callback):
    """Raise KeyboardInterrupt at the end of an epoch, as Ctrl-C (or a kill) would interrupt a run."""

    def __init__(self, epoch: int) -> None:
        super().__init__()
        self.stop_epoch = epoch

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if epoch + 1 == self.stop_epoch:
            raise KeyboardInterrupt


def test_run_folder_is_complete_and_never_overwritten(phantom_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(phantom_dir, tmp_path, model="nested_unet")
    first = train(config, runs_root=tmp_path / "runs", progress=False)
    assert RUN_FILES <= {p.name for p in first.run_dir.iterdir()}
    assert not (first.run_dir / "backup").exists()  # removed once the run finished
    assert ExperimentConfig.load(first.run_dir / "config.json") == config
    state = json.loads((first.run_dir / "state.json").read_text())
    assert state["status"] == "finished" and state["epochs_done"] == 2 and state["monitor"] == "val_head_2_dice"
    assert len(pd.read_csv(first.run_dir / "history.csv")) == 2
    assert len(json.loads((first.run_dir / "timings.json").read_text())["epoch_seconds"]) == 2
    split = json.loads((first.run_dir / "data.json").read_text())["split"]
    assert not set(split["train"]) & set(split["test"]) and not set(split["val"]) & set(split["test"])
    second = train(config, runs_root=tmp_path / "runs", progress=False)  # same config: a new folder
    assert second.run_dir != first.run_dir and len(list_runs(tmp_path / "runs")) == 2


def test_killed_run_resumes_where_it_stopped(phantom_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(phantom_dir, tmp_path, epochs=3)
    with pytest.raises(KeyboardInterrupt):
        train(config, runs_root=tmp_path / "runs", progress=False, callbacks=[StopAfterEpoch(2)])
    [run_dir] = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "state.json").read_text())["status"] == "running"
    resumed = train(config, runs_root=tmp_path / "runs", progress=False)
    assert resumed.run_dir == run_dir
    assert resumed.state["resumed"] == 1 and resumed.state["epochs_done"] == 3
    history = pd.read_csv(run_dir / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2]  # the third epoch only, not a restart
    assert len(json.loads((run_dir / "timings.json").read_text())["epoch_seconds"]) == 3


def test_a_killed_and_resumed_run_matches_an_uninterrupted_one(phantom_dir: Path, tmp_path: Path) -> None:
    """Same epochs, learning rates and best epoch: early stopping and reduce-on-plateau keep their counters."""
    config = tiny_config(phantom_dir, tmp_path, model="unet", epochs=12, early_stopping_patience=3,
                         learning_rate=0.05, jit_compile="off")
    whole = train(config, runs_root=tmp_path / "whole", progress=False)
    with pytest.raises(KeyboardInterrupt):
        train(config, runs_root=tmp_path / "killed", progress=False, callbacks=[StopAfterEpoch(4)])
    resumed = train(config, runs_root=tmp_path / "killed", progress=False)
    assert resumed.state["resumed"] == 1
    histories = [pd.read_csv(run.run_dir / "history.csv") for run in (whole, resumed)]
    assert len(histories[0]) == len(histories[1]) == whole.state["epochs_done"] == resumed.state["epochs_done"]
    np.testing.assert_allclose(histories[1]["learning_rate"], histories[0]["learning_rate"])
    assert resumed.state["best_epoch"] == whole.state["best_epoch"]
    assert resumed.state["stop_reason"] == whole.state["stop_reason"]


def test_a_second_process_cannot_train_into_a_live_run_but_takes_over_a_killed_one(
        phantom_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(phantom_dir, tmp_path, model="unet", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, runs_root=tmp_path / "runs", progress=False, callbacks=[StopAfterEpoch(1)])
    [run_dir] = (tmp_path / "runs").iterdir()
    holder = subprocess.Popen(  # another live process training into the run
        [sys.executable, "-c", "import sys, time\nfrom metaseg_tf.runs.folders import hold_run_lock\n"
         f"with hold_run_lock({str(run_dir)!r}):\n    print('held', flush=True)\n    time.sleep(120)\n"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid}"):
            train(config, runs_root=tmp_path / "runs", progress=False)
    finally:
        holder.kill()  # killed, not released: the lock dies with its process
        holder.wait()
    resumed = train(config, runs_root=tmp_path / "runs", progress=False)
    assert resumed.run_dir == run_dir and resumed.state["epochs_done"] == 2


def test_a_resumed_run_keeps_its_recorded_patients(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    config = tiny_config(data, tmp_path, model="unet", epochs=2)
    with pytest.raises(KeyboardInterrupt):
        train(config, runs_root=tmp_path / "runs", progress=False, callbacks=[StopAfterEpoch(1)])
    [run_dir] = (tmp_path / "runs").iterdir()
    recorded = json.loads((run_dir / "data.json").read_text())
    add_patient_copy(data, recorded["split"]["test"][0], "A_added_patient")  # would shift a new split
    moved = shutil.move(data / recorded["split"]["train"][0], tmp_path / "aside")
    with pytest.raises(DataError, match="train/val patients are not in"):
        train(config, runs_root=tmp_path / "runs", progress=False)
    shutil.move(moved, data / recorded["split"]["train"][0])
    resumed = train(config, runs_root=tmp_path / "runs", progress=False)
    assert resumed.run_dir == run_dir and resumed.state["epochs_done"] == 2
    assert json.loads((run_dir / "data.json").read_text()) == recorded


def test_same_seed_gives_same_split_and_initial_weights(phantom_dir: Path, tmp_path: Path) -> None:
    config = tiny_config(phantom_dir, tmp_path, epochs=0, model="unet")
    runs = [train(config, runs_root=tmp_path / "runs", progress=False, resume=False) for _ in range(2)]
    splits = [json.loads((run.run_dir / "data.json").read_text())["split"] for run in runs]
    assert splits[0] == splits[1]
    weights = [keras.saving.load_model(run.run_dir / "last.keras", compile=False).get_weights() for run in runs]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    other = train(config.replace(seed=1), runs_root=tmp_path / "runs", progress=False)
    different = keras.saving.load_model(other.run_dir / "last.keras", compile=False).get_weights()
    assert not all(np.array_equal(a, b) for a, b in zip(weights[0], different))


@pytest.mark.parametrize("setting", ["on", "off", "auto"])
@pytest.mark.parametrize("name", ["nested_unet", "attention_unet"])
def test_jit_compile_setting_reaches_keras(name: str, setting: str) -> None:
    """``jit_compile: on`` (the cpu profile's choice on an AVX2 CPU) compiles the train step of both models with
    XLA, ``off`` without, and ``auto`` as Keras decides (JAX always, TensorFlow only with an accelerator): the
    compiled model carries the setting Keras traces its step functions with (Keras turns ``True`` back to
    ``False``, with a warning only, where a layer cannot run under XLA)."""
    backend = keras.backend.backend()
    if backend not in ("tensorflow", "jax"):
        pytest.skip("XLA is TensorFlow's and JAX's; under torch jit_compile means torch.compile")
    from metaseg_tf.models.registry import build_model
    from metaseg_tf.training.train import compile_model

    config = ExperimentConfig(model=name, filters=(4, 8, 16), image_size=16, jit_compile=setting)
    model = compile_model(build_model(name, config), config)
    if setting != "auto":
        expected = setting == "on"
    elif backend == "jax":
        expected = True
    else:
        import tensorflow as tf
        expected = any(device.device_type != "CPU" for device in tf.config.list_physical_devices())
    assert model.jit_compile is expected


@pytest.mark.parametrize("jit_compile", ["auto", "on"])
def test_two_trainings_on_one_machine_agree_exactly(jit_compile: str, phantom_dir: Path, tmp_path: Path) -> None:
    """The main job's reproducibility on one machine, small: two trainings of one config (augmentation,
    shuffling and dropout included) end with the same weights, bit for bit, and so the same scores; with XLA
    too (the cpu profile's choice on an AVX2 CPU)."""
    config = tiny_config(phantom_dir, tmp_path, epochs=2, jit_compile=jit_compile)
    runs = [train(config, runs_root=tmp_path / "runs", progress=False, resume=False) for _ in range(2)]
    weights = [keras.saving.load_model(run.run_dir / "last.keras", compile=False).get_weights() for run in runs]
    assert all(np.array_equal(a, b) for a, b in zip(*weights))
    histories = [pd.read_csv(run.run_dir / "history.csv") for run in runs]
    pd.testing.assert_frame_equal(histories[0].drop(columns=["seconds"], errors="ignore"),
                                  histories[1].drop(columns=["seconds"], errors="ignore"))


TWO_CPU_DEVICES = {
    "tensorflow": ({}, "import tensorflow as tf\n"
                       "cpu = tf.config.list_physical_devices('CPU')[0]\n"
                       "tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)\n"),
    "jax": ({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2"}, ""),
}


@pytest.mark.parametrize("backend", sorted(TWO_CPU_DEVICES))
def test_data_parallel_fit_on_two_cpu_devices(backend: str, phantom_dir: Path, tmp_path: Path) -> None:
    """``devices=2``: a short fit through MirroredStrategy (TensorFlow) or DataParallel (JAX) on two CPUs."""
    if importlib.util.find_spec(backend) is None:
        pytest.skip(f"{backend} is not installed")
    config = tiny_config(phantom_dir, tmp_path, epochs=1, devices=2, model="unet")
    config_path = config.save(tmp_path / "config.json")
    env, setup = TWO_CPU_DEVICES[backend]
    script = setup + (
        "from metaseg_tf.config import ExperimentConfig\n"
        "from metaseg_tf.training.train import train\n"
        f"run = train(ExperimentConfig.load({str(config_path)!r}), runs_root={str(tmp_path / 'runs')!r}, "
        "progress=False)\n"
        "print('EPOCHS', run.state['epochs_done'])\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                            env={**os.environ, "KERAS_BACKEND": backend, **env})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "EPOCHS 1" in result.stdout


def test_a_log_file_gets_one_line_per_epoch_not_a_redrawn_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    import io
    import sys

    from metaseg_tf.training.train import fit_verbosity

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delitem(sys.modules, "ipykernel", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert fit_verbosity(True) == 2 and fit_verbosity(False) == 2
    monkeypatch.setattr(sys, "stdout", Terminal())
    assert fit_verbosity(True) == 1 and fit_verbosity(False) == 2


def test_mixed_precision_is_bfloat16_on_a_cpu_and_float32_by_default_there() -> None:
    """On a CPU ``mixed_precision on`` means ``mixed_bfloat16`` (no loss scaling, native with AVX512-BF16/AMX);
    ``auto`` keeps float32 there; the global policy is restored afterwards."""
    from metaseg_tf.environment import accelerator
    from metaseg_tf.training.train import precision_policy

    if accelerator() != "cpu":
        pytest.skip("the CPU policy is what this test checks")
    before = keras.config.dtype_policy().name
    with precision_policy(ExperimentConfig(mixed_precision="on")) as policy:
        assert policy == keras.config.dtype_policy().name == "mixed_bfloat16"
    with precision_policy(ExperimentConfig(mixed_precision="auto")) as policy:
        assert policy == "float32"
    assert keras.config.dtype_policy().name == before


def test_deep_supervision_weights_set_each_head_s_share_of_the_loss(tmp_path: Path) -> None:
    """The compiled U-Net++ loss is the heads' losses weighted by ``deep_supervision_weights`` (normalised),
    equal weights by default (Zhou et al. 2018); a wrong number of weights is refused."""
    from metaseg_tf.config import ConfigError
    from metaseg_tf.models.registry import build_model
    from metaseg_tf.training.train import compile_model, head_loss_weights

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 32, 32, 3)).astype("float32")
    y = (rng.random((4, 32, 32, 1)) > 0.7).astype("float32")
    for weights in ((), (0.0, 0.0, 3.0), (1.0, 2.0, 1.0)):
        config = ExperimentConfig(model="nested_unet", filters=(4, 8, 16, 32), image_size=32,
                                  deep_supervision_weights=weights)
        keras.utils.set_random_seed(0)
        model = compile_model(build_model("nested_unet", config), config)
        scores = model.evaluate(x, (y,) * 3, verbose=0, return_dict=True)
        heads = np.array([scores[f"head_{k}_loss"] for k in (1, 2, 3)])
        expected = np.asarray(weights or (1.0, 1.0, 1.0)) / sum(weights or (1.0, 1.0, 1.0))
        np.testing.assert_allclose(head_loss_weights(config, 3), expected)
        assert scores["loss"] == pytest.approx(float(heads @ expected), rel=1e-4)
    with pytest.raises(ConfigError, match="deep_supervision_weights"):
        ExperimentConfig(filters=(4, 8, 16, 32), deep_supervision_weights=(1.0, 1.0))
    for wrong in ((0.0, 0.0, 0.0), (1.0, float("inf"), 1.0), 3):
        with pytest.raises(ConfigError, match="deep_supervision_weights"):
            ExperimentConfig(filters=(4, 8, 16, 32), deep_supervision_weights=wrong)
    weighted = ExperimentConfig(filters=(4, 8, 16, 32), deep_supervision_weights=(1, 2, 3))
    assert ExperimentConfig.from_dict(weighted.to_dict()).deep_supervision_weights == (1.0, 2.0, 3.0)
    assert ExperimentConfig.load(weighted.save(tmp_path / "config.yml")) == weighted
