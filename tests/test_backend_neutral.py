"""Backend neutrality: the data layer runs under KERAS_BACKEND=jax with TensorFlow made unimportable, and
the models pass their whole test module under JAX."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = r"""
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError("tensorflow is blocked in this test")
        return None

sys.meta_path.insert(0, NoTensorFlow())

import keras
import numpy as np
from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data import discover_pairs, generate_phantom, split_for_config
from metaseg_tf.data.batches import split_batches
from metaseg_tf.data.preprocess import preprocess_dataset

root = sys.argv[1]
generate_phantom(root + "/phantom", n_patients=4, n_slices=4, size=64, seed=0)
config = ExperimentConfig(image_size=32, batch_size=4, cache_dir=root + "/cache")
dataset = preprocess_dataset(discover_pairs(root + "/phantom"), config, progress=False)
batches = split_batches(dataset, split_for_config(dataset.case_ids, config), config)
x, y = batches["train"][0]
assert keras.backend.backend() == "jax", keras.backend.backend()
assert "tensorflow" not in sys.modules
print("ok", x.shape, y.shape)
"""


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (dev extra)")
def test_data_layer_under_jax_without_tensorflow(tmp_path: Path) -> None:
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "ok (4, 32, 32, 3) (4, 32, 32, 1)" in result.stdout


JAX_SUITE = ("test_models.py", "test_losses.py", "test_metrics.py", "test_scores.py", "test_complexity.py")


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (dev extra)")
@pytest.mark.skipif(os.environ.get("KERAS_BACKEND") == "jax", reason="this session already runs under JAX")
def test_model_suite_passes_under_jax() -> None:
    """The model, loss and metric test modules again, in a fresh interpreter with KERAS_BACKEND=jax."""
    env = {**os.environ, "KERAS_BACKEND": "jax", "JAX_PLATFORMS": "cpu"}
    modules = [str(Path(__file__).with_name(name)) for name in JAX_SUITE]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:warnings", *modules],
                            env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-4000:]
    assert " passed" in result.stdout and "failed" not in result.stdout
