"""U-Net baseline (Ronneberger, Fischer, Brox, "U-Net: Convolutional Networks for Biomedical Image
Segmentation", MICCAI 2015), with the same blocks and filter schedule as U-Net++ and Attention U-Net."""

from __future__ import annotations

from collections.abc import Sequence

import keras
from keras import layers

from metaseg_tf.models.blocks import conv_block, encoder, segmentation_head, upsample


def unet(
    input_shape: tuple[int, int, int], filters: Sequence[int] = (16, 32, 64, 128, 256), num_classes: int = 1,
    multilabel: bool = False,
) -> keras.Model:
    """U-Net: ``(B, H, W, C)`` -> ``(B, H, W, num_classes)`` probabilities.

    ``len(filters) - 1`` down-samplings, so ``H`` and ``W`` must be divisible by ``2 ** (len(filters) - 1)``.
    The decoder node at level ``i`` concatenates the up-sampled coarser node with the encoder's skip.
    """
    inputs = keras.Input(input_shape, name="image")
    nodes = encoder(inputs, filters)
    x = nodes[-1]
    for level in reversed(range(len(filters) - 1)):
        name = f"decoder_{level}"
        x = layers.Concatenate(name=f"{name}_concat")([nodes[level], upsample(x, filters[level], name)])
        x = conv_block(x, filters[level], name)
    return keras.Model(inputs, segmentation_head(x, num_classes, "mask", multilabel), name="unet")
