"""Keras metrics for training and validation: Dice, IoU, precision and recall of thresholded masks.

Each metric accumulates pixel counts (true positives, false positives, false negatives) over every batch
of an epoch and reports the score of the pooled pixels (a *global* score: large lesions weigh more than
small ones). The per-image, per-patient and lesion-wise scores of reports come from
:mod:`metaseg_tf.evaluation.scores`, which follows the same conventions. When the epoch has neither a true nor a
predicted foreground pixel every score is 1 (perfect agreement on "no lesion"); any other zero denominator
gives 0.
"""

from __future__ import annotations

import keras
from keras import ops

STATISTICS = ("dice", "iou", "precision", "recall")


@keras.saving.register_keras_serializable(package="metaseg_tf")
class ThresholdedOverlap(keras.metrics.Metric):
    """Pooled-pixel ``statistic`` (one of :data:`STATISTICS`) of ``y_pred >= threshold`` against ``y_true``.

    ``y_true`` and ``y_pred``: ``(B, H, W, 1)``; ``y_true`` holds 0/1, ``y_pred`` probabilities;
    ``sample_weight`` ``(B,)`` weighs each image's pixel counts (0: a padding image that does not count).
    """

    def __init__(self, statistic: str = "dice", threshold: float = 0.5, name: str | None = None, **kwargs) -> None:
        if statistic not in STATISTICS:
            raise ValueError(f"unknown statistic {statistic!r}; choose one of {', '.join(STATISTICS)}")
        super().__init__(name=name or statistic, **kwargs)
        self.statistic, self.threshold = statistic, float(threshold)
        self.true_pos = self.add_variable((), initializer="zeros", name="true_pos")
        self.false_pos = self.add_variable((), initializer="zeros", name="false_pos")
        self.false_neg = self.add_variable((), initializer="zeros", name="false_neg")

    def update_state(self, y_true, y_pred, sample_weight=None) -> None:
        truth = ops.cast(ops.greater_equal(ops.cast(y_true, "float32"), 0.5), "float32")
        pred = ops.cast(ops.greater_equal(ops.cast(y_pred, "float32"), self.threshold), "float32")
        weight = 1.0 if sample_weight is None else ops.reshape(ops.cast(sample_weight, "float32"),
                                                                (-1,) + (1,) * (len(truth.shape) - 1))
        self.true_pos.assign_add(ops.sum(truth * pred * weight))
        self.false_pos.assign_add(ops.sum((1.0 - truth) * pred * weight))
        self.false_neg.assign_add(ops.sum(truth * (1.0 - pred) * weight))

    def result(self):
        tp, fp, fn = (ops.convert_to_tensor(v) for v in (self.true_pos, self.false_pos, self.false_neg))
        numerator, denominator = {
            "dice": (2.0 * tp, 2.0 * tp + fp + fn),
            "iou": (tp, tp + fp + fn),
            "precision": (tp, tp + fp),
            "recall": (tp, tp + fn),
        }[self.statistic]
        nothing_anywhere = ops.equal(tp + fp + fn, 0.0)
        score = ops.divide_no_nan(numerator, denominator)
        return ops.where(nothing_anywhere, ops.ones_like(score), score)

    def reset_state(self) -> None:
        for variable in (self.true_pos, self.false_pos, self.false_neg):
            variable.assign(0.0)

    def get_config(self) -> dict:
        return {**super().get_config(), "statistic": self.statistic, "threshold": self.threshold}


def segmentation_metrics(threshold: float = 0.5) -> list[ThresholdedOverlap]:
    """Dice, IoU, precision and recall at ``threshold``, named ``dice``, ``iou``, ``precision``, ``recall``."""
    return [ThresholdedOverlap(statistic, threshold) for statistic in STATISTICS]
