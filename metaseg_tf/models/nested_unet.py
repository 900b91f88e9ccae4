"""Nested U-Net, U-Net++ (Zhou, Rahman Siddiquee, Tajbakhsh, Liang, "UNet++: A Nested U-Net Architecture for
Medical Image Segmentation", DLMIA 2018; and "UNet++: Redesigning Skip Connections to Exploit Multiscale
Features in Image Segmentation", IEEE TMI 2019).

Nodes ``X^{i,j}`` (level ``i`` down, ``j`` convolution steps along the skip pathway), named ``X_i_j``:

* ``X^{i,0}`` is the backbone encoder;
* ``X^{i,j} = H([X^{i,0}, ..., X^{i,j-1}, U(X^{i+1,j-1})])`` for ``j >= 1``: a conv block over the
  concatenation of every earlier node of the same level (dense skips) and the up-sampled node below.

Deep supervision attaches a 1x1 head to each of ``X^{0,1} .. X^{0,depth}`` (layers ``head_1`` ..
``head_depth``). Node ``X^{0,L}`` depends only on nodes with ``i + j <= L``, so the network *pruned* to
level ``L`` (the paper's fast inference mode) is the sub-graph ending at ``head_L`` and shares the trained
weights: :func:`prune_nested_unet` cuts it out without retraining.
"""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from metaseg_tf.models.blocks import conv_block, encoder, segmentation_head, upsample


def nested_unet(
    input_shape: tuple[int, int, int],
    filters: Sequence[int] = (16, 32, 64, 128, 256),
    num_classes: int = 1,
    deep_supervision: bool = True,
    multilabel: bool = False,
) -> keras.Model:
    """U-Net++: ``(B, H, W, C)`` -> ``depth`` head outputs ``(B, H, W, num_classes)`` with deep supervision
    (``depth = len(filters) - 1``, outputs ordered ``head_1 .. head_depth``), else ``head_depth`` alone."""
    depth = len(filters) - 1
    inputs = keras.Input(input_shape, name="image")
    nodes: dict[tuple[int, int], keras.KerasTensor] = {
        (level, 0): node for level, node in enumerate(encoder(inputs, filters))
    }
    for step in range(1, depth + 1):
        for level in range(depth - step + 1):
            name = f"X_{level}_{step}"
            below = upsample(nodes[(level + 1, step - 1)], filters[level], name)
            same_level = [nodes[(level, k)] for k in range(step)]
            joined = layers.Concatenate(name=f"{name}_concat")([*same_level, below])
            nodes[(level, step)] = conv_block(joined, filters[level], name)
    heads = [segmentation_head(nodes[(0, step)], num_classes, f"head_{step}", multilabel) for step in range(1, depth + 1)]
    outputs = heads if deep_supervision else heads[-1]
    return keras.Model(inputs, outputs, name="nested_unet")


def head_names(model: keras.Model) -> list[str]:
    """The deep-supervision head layers present in ``model``, shallowest first."""
    names = [layer.name for layer in model.layers if layer.name.startswith("head_") and "_" not in layer.name[5:]]
    return sorted(names, key=lambda name: int(name.split("_")[1]))


def prune_nested_unet(model: keras.Model, level: int) -> keras.Model:
    """The trained U-Net++ pruned to ``level`` (1 .. depth): output ``head_level``, same weights, fewer nodes."""
    names = head_names(model)
    if f"head_{level}" not in names:
        raise ValueError(f"level must be one of 1..{len(names)}, got {level}")
    return keras.Model(model.inputs, model.get_layer(f"head_{level}").output, name=f"nested_unet_L{level}")


def average_heads(model: keras.Model) -> keras.Model:
    """Inference model whose output is the mean of all deep-supervision heads (the paper's accurate mode)."""
    outputs = [model.get_layer(name).output for name in head_names(model)]
    mean = outputs[0] if len(outputs) == 1 else layers.Average(name="heads_mean")(outputs)
    return keras.Model(model.inputs, mean, name="nested_unet_mean")
