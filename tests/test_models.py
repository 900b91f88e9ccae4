"""Architectures: shapes, deep supervision and pruning, attention coefficients, training signal, save/load."""

from __future__ import annotations

from pathlib import Path

import keras
import numpy as np
import pytest

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.models import (
    MODEL_NAMES,
    attention_maps,
    average_heads,
    build_model,
    nested_unet,
    prune_nested_unet,
)

SMALL = (4, 8, 16)  # two down-samplings: fast enough to build many times


def _images(n: int = 2, size: int = 32, channels: int = 3) -> np.ndarray:
    return np.random.default_rng(0).normal(size=(n, size, size, channels)).astype("float32")


def _outputs(model: keras.Model, x: np.ndarray) -> list[np.ndarray]:
    out = model.predict(x, verbose=0)
    return [np.asarray(o) for o in out] if isinstance(out, list) else [np.asarray(out)]


@pytest.mark.parametrize("name", MODEL_NAMES)
@pytest.mark.parametrize(("size", "filters", "channels"), [(32, SMALL, 3), (48, SMALL, 1), (32, (4, 8, 8, 8, 8), 3)])
def test_output_shapes_and_range(name: str, size: int, filters: tuple, channels: int) -> None:
    config = ExperimentConfig(image_size=size, filters=filters, channels=channels, deep_supervision=True)
    model = build_model(name, config)
    outputs = _outputs(model, _images(2, size, channels))
    expected_heads = len(filters) - 1 if name == "nested_unet" else 1
    assert len(outputs) == expected_heads
    for out in outputs:
        assert out.shape == (2, size, size, 1)
        assert out.min() >= 0.0 and out.max() <= 1.0


def test_multiclass_softmax_sums_to_one() -> None:
    model = build_model("attention_unet", ExperimentConfig(image_size=32, filters=SMALL), num_classes=3)
    out = _outputs(model, _images())[0]
    assert out.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(out.sum(axis=-1), 1.0, atol=1e-5)


def test_nested_unet_has_the_papers_nodes_and_dense_skips() -> None:
    model = nested_unet((32, 32, 3), filters=(4, 8, 16, 32, 64))
    names = {layer.name for layer in model.layers}
    nodes = {(i, j) for i in range(5) for j in range(5 - i)}
    assert all(f"X_{i}_{j}_conv2" in names for i, j in nodes)
    assert not any(f"X_{i}_{j}_conv2" in names for i in range(5) for j in range(5) if (i, j) not in nodes)
    # X^{0,3} concatenates X^{0,0}, X^{0,1}, X^{0,2} and the up-sampled X^{1,2}: 4 inputs
    assert len(model.get_layer("X_0_3_concat").input) == 4


def test_pruned_model_reuses_trained_weights() -> None:
    model = nested_unet((32, 32, 3), filters=(4, 8, 16, 32), deep_supervision=True)
    x = _images()
    heads = _outputs(model, x)
    for level in (1, 2, 3):
        pruned = prune_nested_unet(model, level)
        np.testing.assert_allclose(_outputs(pruned, x)[0], heads[level - 1], atol=1e-6)
        assert pruned.count_params() <= model.count_params()
    assert prune_nested_unet(model, 1).count_params() < prune_nested_unet(model, 3).count_params()
    np.testing.assert_allclose(_outputs(average_heads(model), x)[0], np.mean(heads, axis=0), atol=1e-6)
    with pytest.raises(ValueError, match="level"):
        prune_nested_unet(model, 4)


def test_attention_coefficients_in_unit_range_with_skip_shape() -> None:
    config = ExperimentConfig(image_size=32, filters=(4, 8, 16, 32))
    maps = attention_maps(build_model("attention_unet", config), _images(3))
    assert list(maps) == ["attention_0_coefficients", "attention_1_coefficients", "attention_2_coefficients"]
    for level, coefficients in enumerate(maps.values()):
        assert coefficients.shape == (3, 32 // 2**level, 32 // 2**level, 1)
        assert coefficients.min() >= 0.0 and coefficients.max() <= 1.0
    with pytest.raises(ValueError, match="no attention gates"):
        attention_maps(build_model("unet", config), _images(1))


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_one_training_step_updates_every_weight(name: str) -> None:
    keras.utils.set_random_seed(0)
    model = build_model(name, ExperimentConfig(image_size=32, filters=SMALL))
    n_outputs = len(model.outputs)
    model.compile(optimizer=keras.optimizers.SGD(0.5), loss=["binary_crossentropy"] * n_outputs)
    before = [keras.ops.convert_to_numpy(w) for w in model.trainable_weights]
    x = _images(4)
    y = (x[..., :1] > 0.5).astype("float32")
    model.train_on_batch(x, [y] * n_outputs if n_outputs > 1 else y)
    unchanged = [w.path for w, old in zip(model.trainable_weights, before) if np.allclose(keras.ops.convert_to_numpy(w), old)]
    assert not unchanged, f"no gradient reached: {unchanged}"


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_keras_save_load_round_trip(name: str, tmp_path: Path) -> None:
    model = build_model(name, ExperimentConfig(image_size=32, filters=SMALL))
    path = tmp_path / f"{name}.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    x = _images()
    for original, restored in zip(_outputs(model, x), _outputs(loaded, x)):
        np.testing.assert_allclose(original, restored, atol=1e-6)


def test_registry_rejects_unknown_names_and_indivisible_sizes() -> None:
    with pytest.raises(ConfigError, match="unknown model"):
        build_model("segformer", ExperimentConfig())
    with pytest.raises(ConfigError, match="not divisible"):
        build_model("unet", ExperimentConfig(image_size=48, filters=(4, 8, 16, 32, 64, 128)))


def _disc_slices(n: int = 8, size: int = 32) -> tuple[np.ndarray, np.ndarray]:
    """Noisy slices with one bright disc each, and the discs' masks: a task any segmenter can overfit."""
    rng = np.random.default_rng(0)
    rows, cols = np.ogrid[:size, :size]
    masks = np.zeros((n, size, size, 1), np.float32)
    for k in range(n):
        centre, radius = rng.integers(8, size - 8, 2), rng.integers(3, 7)
        masks[k, ..., 0] = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2
    images = np.repeat(masks, 3, axis=-1) * 1.5 + rng.normal(0, 0.5, (n, size, size, 3)).astype(np.float32)
    return images.astype(np.float32), masks


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_overfits_a_handful_of_slices(name: str) -> None:
    """Proof of learning: 60 Adam steps on 8 slices take Dice from chance (~0.1) to well above it.

    Scored with batch statistics (``training=True``): after 60 steps batch normalisation's moving
    averages (momentum 0.99) have covered only half of the way, which is about inference, not learning.
    """
    from metaseg_tf.evaluation.scores import overlap_scores
    from metaseg_tf.training.train import compile_model

    keras.utils.set_random_seed(0)
    config = ExperimentConfig(image_size=32, filters=SMALL, learning_rate=3e-3)
    model = compile_model(build_model(name, config), config)
    images, masks = _disc_slices()
    targets = masks if len(model.outputs) == 1 else (masks,) * len(model.outputs)
    model.fit(images, targets, batch_size=8, epochs=60, verbose=0)
    outputs = model(images, training=True)
    last = outputs[-1] if isinstance(outputs, (list, tuple)) else outputs
    prediction = keras.ops.convert_to_numpy(last) >= 0.5
    assert overlap_scores(masks, prediction)["dice"] > 0.7
