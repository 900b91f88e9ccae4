"""Keras training metrics: pooled over batches, equal to the NumPy scores of the evaluation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from metaseg_tf.evaluation.scores import ConfusionCounts
from metaseg_tf.training.metrics import segmentation_metrics


def test_keras_metrics_equal_pooled_numpy_scores() -> None:
    rng = np.random.default_rng(7)
    truth, pred_binary = rng.random((4, 16, 16)) < 0.2, rng.random((4, 16, 16)) < 0.25
    probabilities = np.where(pred_binary, 0.7, 0.2).astype(np.float32)
    expected = ConfusionCounts.from_masks(truth, pred_binary).scores()
    for metric in segmentation_metrics(threshold=0.5):
        for k in range(0, 4, 2):  # two batches: the metric must pool across them
            metric.update_state(truth[k : k + 2, ..., None].astype(np.float32), probabilities[k : k + 2, ..., None])
        assert float(keras.ops.convert_to_numpy(metric.result())) == pytest.approx(expected[metric.name], rel=1e-6)
        metric.reset_state()
        metric.update_state(np.zeros((1, 4, 4, 1)), np.zeros((1, 4, 4, 1)))
        assert float(keras.ops.convert_to_numpy(metric.result())) == 1.0


def test_images_of_weight_zero_do_not_count() -> None:
    """A padding image (sample weight 0, as sharded evaluation batches carry) leaves every score as it was."""
    rng = np.random.default_rng(3)
    truth = (rng.random((3, 8, 8, 1)) < 0.3).astype(np.float32)
    probabilities = rng.random((3, 8, 8, 1)).astype(np.float32)
    for metric in segmentation_metrics():
        metric.update_state(truth[:2], probabilities[:2])
        expected = float(keras.ops.convert_to_numpy(metric.result()))
        metric.reset_state()
        metric.update_state(truth, probabilities, sample_weight=np.array([1, 1, 0], np.float32))
        assert float(keras.ops.convert_to_numpy(metric.result())) == pytest.approx(expected, rel=1e-6)
