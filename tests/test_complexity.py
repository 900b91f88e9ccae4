"""Complexity: FLOPs measured by the backend and counted from the layer shapes match hand counts; pruning saves
FLOPs."""

from __future__ import annotations

import keras
import pytest

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.evaluation.complexity import convolution_flops, count_flops, model_complexity
from metaseg_tf.models import build_model, prune_nested_unet


@pytest.mark.skipif(keras.backend.backend() == "torch", reason="FLOPs are not measured under PyTorch")
def test_flops_of_one_convolution_match_the_hand_count() -> None:
    """Valid padding: XLA skips the zero-padded taps of "same" convolutions, the TF profiler does not."""
    model = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.Conv2D(4, 3, use_bias=False)])
    assert count_flops(model) == 2 * 6 * 6 * 2 * 4 * 9


def test_convolution_flops_count_every_convolution_as_pytorch_does() -> None:
    """Same padding counts the padded taps; a transposed convolution counts over its input grid; a layer of a
    nested sub-model counts; only convolutions count (no bias, normalisation, activation)."""
    inner = keras.Sequential([keras.Input((8, 8, 4)), keras.layers.Conv2D(2, 1)], name="inner")
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = keras.layers.BatchNormalization()(keras.layers.ReLU()(x))
    x = inner(x)
    outputs = keras.layers.Conv2DTranspose(3, 2, strides=2)(x)
    model = keras.Model(inputs, outputs)
    assert model.output_shape == (None, 16, 16, 3)
    assert convolution_flops(model) == 2 * (8 * 8 * 3 * 3 * 2 * 4 + 8 * 8 * 4 * 2 + 8 * 8 * 2 * 2 * 2 * 3)
    config = ExperimentConfig(image_size=32, filters=(4, 8, 16))
    assert convolution_flops(build_model("nested_unet", config)) > convolution_flops(build_model("unet", config))


def test_convolution_flops_refuse_what_they_would_miscount() -> None:
    depthwise = keras.Sequential([keras.Input((8, 8, 2)), keras.layers.DepthwiseConv2D(3)])
    with pytest.raises(ValueError, match="not counted"):
        convolution_flops(depthwise)
    inputs = keras.Input((8, 8, 2))
    shared = keras.layers.Conv2D(2, 3, padding="same")
    with pytest.raises(ValueError, match="called 2 times"):
        convolution_flops(keras.Model(inputs, shared(shared(inputs))))
    with pytest.raises(ValueError, match="unknown"):
        convolution_flops(keras.Sequential([keras.Input((None, None, 2)), keras.layers.Conv2D(2, 3)]))


def test_complexity_of_models_and_prune_levels() -> None:
    config = ExperimentConfig(image_size=32, filters=(4, 8, 16))
    nested = build_model("nested_unet", config)
    unet = model_complexity(build_model("unet", config), batch_size=2, repeats=2)
    full = model_complexity(nested, batch_size=2, repeats=2)
    pruned = model_complexity(prune_nested_unet(nested, 1), batch_size=2, repeats=2)
    assert full.parameters == nested.count_params() > pruned.parameters
    assert full.flops_per_image > unet.flops_per_image > 0
    assert full.flops_per_image > pruned.flops_per_image > 0
    assert full.latency_ms > 0 and full.images_per_second == pytest.approx(2000 / full.latency_ms)
    assert set(full.to_dict()) >= {"name", "parameters", "flops_per_image", "latency_ms"}
