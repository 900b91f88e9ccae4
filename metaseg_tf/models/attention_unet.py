"""Attention U-Net (Oktay et al., "Attention U-Net: Learning Where to Look for the Pancreas", MIDL 2018).

A U-Net whose every skip connection passes an additive attention gate (:func:`attention_gate`) before it
is concatenated in the decoder. The gating signal of the gate at level ``i`` is the coarser decoder node
(level ``i + 1``; at the bottom, the bridge), as in the paper's figure 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
import numpy as np
from keras import layers

from metaseg_tf.models.blocks import (
    attention_gate,
    conv_block,
    encoder,
    segmentation_head,
    upsample,
)


def attention_unet(
    input_shape: tuple[int, int, int], filters: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 1,
    multilabel: bool = False,
) -> keras.Model:
    """Attention U-Net: ``(B, H, W, C)`` -> ``(B, H, W, num_classes)`` probabilities.

    Gate ``i`` (``i = 0 .. len(filters) - 2``) has ``filters[i] // 2`` intermediate channels, and its
    coefficients ``(B, H/2^i, W/2^i, 1)`` come from the layer ``attention_{i}_coefficients``.
    """
    inputs = keras.Input(input_shape, name="image")
    nodes = encoder(inputs, filters)
    x = nodes[-1]
    for level in reversed(range(len(filters) - 1)):
        name = f"decoder_{level}"
        gated, _ = attention_gate(nodes[level], x, max(filters[level] // 2, 1), f"attention_{level}")
        x = layers.Concatenate(name=f"{name}_concat")([gated, upsample(x, filters[level], name)])
        x = conv_block(x, filters[level], name)
    return keras.Model(inputs, segmentation_head(x, num_classes, "mask", multilabel), name="attention_unet")


def attention_coefficient_layers(model: keras.Model) -> list[str]:
    """Names of the gates' coefficient layers, finest level first."""
    names = [layer.name for layer in model.layers if layer.name.endswith("_coefficients")]
    return sorted(names, key=lambda name: int(name.split("_")[1]))


def attention_maps(model: keras.Model, images: np.ndarray) -> dict[str, np.ndarray]:
    """Attention coefficients of every gate for ``images`` ``(B, H, W, C)``.

    Returns ``{layer name: (B, H/2^i, W/2^i, 1) array in [0, 1]}``, finest level first.
    """
    names = attention_coefficient_layers(model)
    if not names:
        raise ValueError(f"model {model.name!r} has no attention gates")
    probe = keras.Model(model.inputs, [model.get_layer(name).output for name in names])
    outputs = probe.predict(images, verbose=0)
    return {name: keras.ops.convert_to_numpy(out) for name, out in zip(names, outputs)}
