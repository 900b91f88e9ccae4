"""Fine-tuning from another run (``init_from``): the weights are the parent's, the input convolution adapted by
the documented rule when the number of input channels differs, the parent recorded, another architecture
refused in one line."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.inference.loading import load_model
from metaseg_tf.runs.folders import load_run_config, read_json
from metaseg_tf.training.train import train
from metaseg_tf.training.transfer import adapt_input_kernel


def test_an_adapted_input_kernel_answers_an_input_of_equal_channels_as_the_parent_did() -> None:
    rng = np.random.default_rng(0)
    kernel = rng.normal(size=(3, 3, 3, 5)).astype(np.float32)
    grey = rng.random((1, 8, 8, 1)).astype(np.float32)
    for channels in (1, 3, 9):
        adapted = adapt_input_kernel(kernel, channels)
        assert adapted.shape == (3, 3, channels, 5)
        parent = keras.ops.conv(np.repeat(grey, 3, axis=-1), kernel, padding="same")
        child = keras.ops.conv(np.repeat(grey, channels, axis=-1), adapted, padding="same")
        np.testing.assert_allclose(keras.ops.convert_to_numpy(child), keras.ops.convert_to_numpy(parent), atol=1e-5)
    assert adapt_input_kernel(kernel, 3) is kernel


@pytest.fixture(scope="module")
def parent(served_runs: list[Path]) -> Path:
    return served_runs[1]  # the session's Attention U-Net: 3 channels, 32 px, filters 4-8-16


def test_a_run_started_from_another_begins_with_its_weights_and_records_it(parent: Path, tmp_path: Path) -> None:
    config = load_run_config(parent).replace(init_from=str(parent), epochs=0, cache_dir=str(tmp_path / "cache"))
    child = train(config, runs_root=tmp_path / "runs", progress=False).run_dir
    theirs, ours = load_model(parent).weights, load_model(child).weights
    assert all(np.array_equal(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value))
               for a, b in zip(theirs, ours))
    record = read_json(child / "state.json")["initialised_from"]
    assert record == {"run": str(parent), "model": "attention_unet", "input_channels": 3, "adapted": []}
    assert load_run_config(child).init_from == str(parent)


def test_more_input_channels_adapt_only_the_input_convolution(parent: Path, tmp_path: Path) -> None:
    config = load_run_config(parent).replace(init_from=str(parent), epochs=0, context_slices=1,
                                             cache_dir=str(tmp_path / "cache"))
    child = train(config, runs_root=tmp_path / "runs", progress=False).run_dir
    theirs, ours = load_model(parent).weights, load_model(child).weights
    first = keras.ops.convert_to_numpy(ours[0].value)
    assert first.shape[2] == 9
    np.testing.assert_array_equal(first, adapt_input_kernel(keras.ops.convert_to_numpy(theirs[0].value), 9))
    assert all(np.array_equal(keras.ops.convert_to_numpy(a.value), keras.ops.convert_to_numpy(b.value))
               for a, b in zip(theirs[1:], ours[1:]))
    assert read_json(child / "state.json")["initialised_from"]["adapted"][0].endswith("3 -> 9 input channels")


def test_another_architecture_is_refused_naming_the_weight(parent: Path, tmp_path: Path) -> None:
    config = load_run_config(parent).replace(init_from=str(parent), epochs=0, filters=(4, 8, 32),
                                             cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ConfigError, match="another architecture"):
        train(config, runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(ConfigError, match="its model is attention_unet"):
        train(config.replace(model="nested_unet", filters=(4, 8, 16)), runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(ConfigError, match="not a finished run folder"):
        train(ExperimentConfig(**{**config.__dict__, "init_from": str(tmp_path)}), runs_root=tmp_path / "runs",
              progress=False)
