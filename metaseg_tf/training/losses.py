"""Segmentation losses for binary masks, written with ``keras.ops`` only (any Keras 3 backend).

All losses take ``y_true`` and ``y_pred`` of shape ``(B, H, W, 1)`` (probabilities in ``[0, 1]``, as the
models' sigmoid heads give them) and return one value per image, ``(B,)``; Keras then averages over the
batch (weighted by ``sample_weight`` where batches carry one: ``mean_with_sample_weight``, so a padding image
of weight 0 does not count). Overlap-based losses are computed **per image** over its pixels, with an additive ``smooth`` term in
numerator and denominator: an image with an empty mask and an empty prediction scores a perfect overlap
(loss 0) instead of ``0 / 0``, and an image with an empty mask and ``p`` predicted foreground (summed
probability) gets Dice ``smooth / (p + smooth)``, i.e. it is penalised for every false positive. Most MRI
slices have no lesion, so this case is the common one, not an edge case.

* ``bce`` -- binary cross-entropy.
* ``dice`` -- soft Dice loss ``1 - (2 sum(yp) + s) / (sum(y) + sum(p) + s)`` (Milletari et al., V-Net, 2016).
  Per image, an empty slice's false positives saturate it: with ``P = sum(p)`` its loss is ``P / (P + s)``,
  whose gradient ``s / (P + s)^2`` vanishes once ``P >> s``, so nothing pulls a spurious blob back (on the
  LGG set Dice alone trained to a per-patient Dice of 0.29; results/lgg_recipe/README.md).
* ``dice_batch`` -- the same soft Dice over every pixel of the batch at once, one value for the batch (returned
  for each of its images), as Buda et al.'s Keras repository trains (``dice_coef`` on the flattened batch):
  an empty slice's false positives then weigh against the batch's lesions instead of saturating. With
  ``sample_weight`` ``(B,)`` (or ``(B, 1)``), a padding flag per image as sharded evaluation batches carry
  it (0: padding, 1: an image), the padding images leave the sums (their pixels are multiplied by 0; a weight
  other than 0 or 1 would enter the overlap squared, so none is given here); under ``MirroredStrategy`` each
  replica's batch is its shard.
* ``bce_dice`` -- ``bce + dice``, the U-Net++ paper's loss (Zhou et al. 2018).
* ``focal`` -- binary focal loss ``-alpha_t (1 - p_t)^gamma log p_t`` (Lin et al., ICCV 2017).
* ``tversky`` -- ``1 - TI``, ``TI = (TP + s) / (TP + alpha FN + beta FP + s)`` (Salehi et al., 2017);
  ``alpha > beta`` weighs missed lesion pixels more than false alarms.
* ``focal_tversky`` -- ``(1 - TI)^gamma`` (Abraham & Khan, ISBI 2019).
"""

from __future__ import annotations

import keras
from keras import ops

from metaseg_tf.config import LOSS_NAMES

__all__ = ["LOSS_NAMES", "SegmentationLoss", "batch_soft_dice", "binary_crossentropy", "binary_focal", "soft_dice",
           "tversky_index"]
_EPSILON = 1e-7


def _flatten(y_true, y_pred):
    """``(B, ...)`` -> two ``(B, N)`` float32 tensors."""
    batch = ops.shape(y_pred)[0]
    y_true = ops.reshape(ops.cast(y_true, "float32"), (batch, -1))
    y_pred = ops.reshape(ops.cast(y_pred, "float32"), (batch, -1))
    return y_true, y_pred


def binary_crossentropy(y_true, y_pred):
    """Mean binary cross-entropy per image: ``(B, H, W, 1)`` -> ``(B,)``."""
    y_true, y_pred = _flatten(y_true, y_pred)
    y_pred = ops.clip(y_pred, _EPSILON, 1.0 - _EPSILON)
    return -ops.mean(y_true * ops.log(y_pred) + (1.0 - y_true) * ops.log(1.0 - y_pred), axis=-1)


def soft_dice(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice coefficient per image (``(B,)``, in ``(0, 1]``); see the module docstring for ``smooth``."""
    y_true, y_pred = _flatten(y_true, y_pred)
    intersection = ops.sum(y_true * y_pred, axis=-1)
    total = ops.sum(y_true, axis=-1) + ops.sum(y_pred, axis=-1)
    return (2.0 * intersection + smooth) / (total + smooth)


def batch_soft_dice(y_true, y_pred, smooth: float = 1.0):
    """Soft Dice coefficient over all pixels of the batch: ``(B, H, W, 1)`` -> a scalar in ``(0, 1]``."""
    y_true, y_pred = _flatten(y_true, y_pred)
    intersection = ops.sum(y_true * y_pred)
    return (2.0 * intersection + smooth) / (ops.sum(y_true) + ops.sum(y_pred) + smooth)


def tversky_index(y_true, y_pred, alpha: float = 0.7, beta: float = 0.3, smooth: float = 1.0):
    """Tversky index per image (``(B,)``): ``alpha`` weighs false negatives, ``beta`` false positives."""
    y_true, y_pred = _flatten(y_true, y_pred)
    true_pos = ops.sum(y_true * y_pred, axis=-1)
    false_neg = ops.sum(y_true * (1.0 - y_pred), axis=-1)
    false_pos = ops.sum((1.0 - y_true) * y_pred, axis=-1)
    return (true_pos + smooth) / (true_pos + alpha * false_neg + beta * false_pos + smooth)


def binary_focal(y_true, y_pred, alpha: float = 0.25, gamma: float = 2.0):
    """Mean binary focal loss per image (``(B,)``); ``alpha`` weighs the foreground class."""
    y_true, y_pred = _flatten(y_true, y_pred)
    y_pred = ops.clip(y_pred, _EPSILON, 1.0 - _EPSILON)
    p_t = y_true * y_pred + (1.0 - y_true) * (1.0 - y_pred)
    alpha_t = y_true * alpha + (1.0 - y_true) * (1.0 - alpha)
    return ops.mean(-alpha_t * ops.power(1.0 - p_t, gamma) * ops.log(p_t), axis=-1)


@keras.saving.register_keras_serializable(package="metaseg_tf")
class SegmentationLoss(keras.losses.Loss):
    """One of :data:`LOSS_NAMES` as a serialisable Keras loss (saved with the model in ``.keras`` files).

    ``smooth`` is the overlap losses' additive term; ``alpha``/``beta``/``gamma`` are the focal and Tversky
    parameters (``None`` takes each paper's default: focal alpha 0.25, gamma 2; Tversky alpha 0.7,
    beta 0.3; focal Tversky gamma 0.75).
    """

    def __init__(
        self,
        kind: str = "bce_dice",
        smooth: float = 1.0,
        alpha: float | None = None,
        beta: float | None = None,
        gamma: float | None = None,
        name: str | None = None,
        **kwargs,
    ) -> None:
        if kind not in LOSS_NAMES:
            raise ValueError(f"unknown loss {kind!r}; choose one of {', '.join(LOSS_NAMES)}")
        kwargs.setdefault("reduction", "mean_with_sample_weight")
        super().__init__(name=name or kind, **kwargs)
        self.kind, self.smooth, self.alpha, self.beta, self.gamma = kind, smooth, alpha, beta, gamma

    def __call__(self, y_true, y_pred, sample_weight=None):
        if self.kind == "dice_batch" and sample_weight is not None:  # padding flags: see the module docstring
            sample_weight = ops.convert_to_tensor(sample_weight)
            if len(sample_weight.shape) > 2 or len(sample_weight.shape) == 2 and sample_weight.shape[1] != 1:
                raise ValueError(f"dice_batch takes one sample weight per image, (B,) or (B, 1); got shape "
                                 f"{tuple(sample_weight.shape)}")
            weight = ops.reshape(ops.cast(sample_weight, "float32"), (-1, 1, 1, 1))
            y_true, y_pred = ops.cast(y_true, "float32") * weight, ops.cast(y_pred, "float32") * weight
        return super().__call__(y_true, y_pred, sample_weight)

    def call(self, y_true, y_pred):
        kind = self.kind
        if kind == "bce":
            return binary_crossentropy(y_true, y_pred)
        if kind == "dice":
            return 1.0 - soft_dice(y_true, y_pred, self.smooth)
        if kind == "dice_batch":  # one value for the batch, repeated per image: (B,)
            return ops.zeros_like(ops.cast(y_pred[:, 0, 0, 0], "float32")) + 1.0 - batch_soft_dice(
                y_true, y_pred, self.smooth)
        if kind == "bce_dice":
            return binary_crossentropy(y_true, y_pred) + 1.0 - soft_dice(y_true, y_pred, self.smooth)
        if kind == "focal":
            alpha = 0.25 if self.alpha is None else self.alpha
            return binary_focal(y_true, y_pred, alpha, 2.0 if self.gamma is None else self.gamma)
        alpha = 0.7 if self.alpha is None else self.alpha
        beta = 0.3 if self.beta is None else self.beta
        distance = 1.0 - tversky_index(y_true, y_pred, alpha, beta, self.smooth)
        if kind == "tversky":
            return distance
        return ops.power(ops.maximum(distance, 0.0), 0.75 if self.gamma is None else self.gamma)

    def get_config(self) -> dict:
        return {**super().get_config(), "kind": self.kind, "smooth": self.smooth, "alpha": self.alpha,
                "beta": self.beta, "gamma": self.gamma}
