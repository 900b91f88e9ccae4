"""Building blocks shared by U-Net, U-Net++ and Attention U-Net (Keras 3 functional API, built-in layers only).

Every block takes and returns channels-last tensors ``(batch, height, width, channels)`` and names its
layers after the caller's ``name``, so that architectures read like the papers' figures and trained
weights can be addressed by node (``X_1_2_conv1``) or gate (``attention_2_coefficients``).
"""

from __future__ import annotations

from collections.abc import Sequence

from keras import KerasTensor, layers


def conv_block(x: KerasTensor, filters: int, name: str) -> KerasTensor:
    """Two 3x3 convolutions, each followed by batch normalisation and ReLU (Ronneberger et al. 2015).

    ``(B, H, W, C_in)`` -> ``(B, H, W, filters)``. The convolutions have no bias: batch normalisation's
    offset takes its place.
    """
    for index in (1, 2):
        x = layers.Conv2D(filters, 3, padding="same", use_bias=False, kernel_initializer="he_normal",
                          name=f"{name}_conv{index}")(x)
        x = layers.BatchNormalization(name=f"{name}_bn{index}")(x)
        x = layers.Activation("relu", name=f"{name}_relu{index}")(x)
    return x


def downsample(x: KerasTensor, name: str) -> KerasTensor:
    """2x2 max pooling: ``(B, H, W, C)`` -> ``(B, H/2, W/2, C)``."""
    return layers.MaxPooling2D(2, name=f"{name}_pool")(x)


def upsample(x: KerasTensor, filters: int, name: str) -> KerasTensor:
    """Learned 2x up-sampling (2x2 transposed convolution): ``(B, H, W, C)`` -> ``(B, 2H, 2W, filters)``."""
    return layers.Conv2DTranspose(filters, 2, strides=2, padding="same", name=f"{name}_up")(x)


def encoder(inputs: KerasTensor, filters: Sequence[int]) -> list[KerasTensor]:
    """Backbone nodes ``X^{i,0}`` for ``i = 0 .. len(filters) - 1``; node ``i`` is ``(B, H/2^i, W/2^i,
    filters[i])``. Shared by all three architectures, so their encoders are identical."""
    nodes = [conv_block(inputs, filters[0], "X_0_0")]
    for level in range(1, len(filters)):
        nodes.append(conv_block(downsample(nodes[-1], f"X_{level}_0"), filters[level], f"X_{level}_0"))
    return nodes


def attention_gate(
    skip: KerasTensor, gating: KerasTensor, inter_filters: int, name: str
) -> tuple[KerasTensor, KerasTensor]:
    """Additive attention gate of Oktay et al., "Attention U-Net" (MIDL 2018), eq. 1-2.

    ``skip`` x: ``(B, H, W, C_x)`` from the encoder; ``gating`` g: ``(B, H/2, W/2, C_g)`` from the coarser
    decoder level. The gate computes ``q = psi(ReLU(W_x x + W_g g))`` at the gating resolution (``W_x`` a
    2x2 convolution with stride 2, ``W_g`` and ``psi`` 1x1 convolutions), the coefficients
    ``alpha = sigmoid(q)``, resamples ``alpha`` bilinearly to the skip's resolution and returns
    ``(W (alpha * x), alpha)``: the gated skip ``(B, H, W, C_x)`` after a 1x1 convolution and batch
    normalisation, and the coefficients ``(B, H, W, 1)`` in ``[0, 1]``, in a layer named
    ``{name}_coefficients``.
    """
    theta_x = layers.Conv2D(inter_filters, 2, strides=2, padding="same", use_bias=False,
                            name=f"{name}_theta_x")(skip)
    phi_g = layers.Conv2D(inter_filters, 1, padding="same", name=f"{name}_phi_g")(gating)
    joint = layers.Activation("relu", name=f"{name}_relu")(layers.Add(name=f"{name}_add")([theta_x, phi_g]))
    psi = layers.Conv2D(1, 1, padding="same", name=f"{name}_psi")(joint)
    alpha = layers.Activation("sigmoid", name=f"{name}_sigmoid")(psi)
    alpha = layers.UpSampling2D(2, interpolation="bilinear", name=f"{name}_coefficients")(alpha)
    gated = layers.Multiply(name=f"{name}_apply")([skip, alpha])
    gated = layers.Conv2D(skip.shape[-1], 1, padding="same", use_bias=False, name=f"{name}_w")(gated)
    gated = layers.BatchNormalization(name=f"{name}_bn")(gated)
    return gated, alpha


def segmentation_head(x: KerasTensor, num_classes: int, name: str, multilabel: bool = False) -> KerasTensor:
    """1x1 convolution to class scores; sigmoid for one class (binary) or for each of several overlapping
    regions (``multilabel``: BraTS' nested WT, TC, ET), softmax for several exclusive classes.

    ``(B, H, W, C)`` -> ``(B, H, W, num_classes)`` probabilities, kept in float32 under mixed precision.
    """
    activation = "sigmoid" if num_classes == 1 or multilabel else "softmax"
    scores = layers.Conv2D(num_classes, 1, name=f"{name}_logits")(x)
    return layers.Activation(activation, dtype="float32", name=name)(scores)
