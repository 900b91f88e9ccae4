"""The metric that int8 accuracy control is run on: per-patient Dice of a compiled model's masks."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg_tf.config import ConfigError
from metaseg_tf.inference.quantise import per_patient_dice, quantise_int8


def _identity(inputs: np.ndarray) -> list[np.ndarray]:
    """A stand-in for an OpenVINO compiled model: its first output is its input, as probabilities."""
    return [inputs]


def test_per_patient_dice_pools_a_patients_slices_and_batches_do_not_change_it() -> None:
    truth = np.zeros((70, 4, 4, 1), bool)
    truth[:, :2] = True  # 8 of 16 pixels in every slice
    found = np.where(truth, 0.9, 0.1).astype(np.float32)
    found[0] = 0.9  # one slice fully positive: 8 false positives among 70 * 8 true positives
    empty = (np.zeros((3, 4, 4, 1), np.float32), np.zeros((3, 4, 4, 1), bool))
    mean, scores = per_patient_dice(_identity, [(found, truth), empty, (found * 0, truth)])
    assert scores[0] == pytest.approx(2 * 560 / (2 * 560 + 8))
    assert scores[1] == 1.0  # nothing to find and nothing found
    assert scores[2] == 0.0  # everything missed
    assert mean == pytest.approx(np.mean(scores))
    assert per_patient_dice(_identity, [(found, truth)], threshold=0.95)[1] == [0.0]


def test_per_patient_dice_averages_with_the_flipped_slices_as_the_predictor_does() -> None:
    left = np.zeros((2, 4, 4, 1), np.float32)
    left[:, :, :2] = 1.0

    def always_left(inputs: np.ndarray) -> list[np.ndarray]:
        """A model that finds the left half whatever it is shown: flipped back and averaged, 0.5 everywhere."""
        return [np.broadcast_to(left[:1], inputs.shape).copy()]

    assert per_patient_dice(always_left, [(left, left > 0)])[0] == 1.0
    assert per_patient_dice(always_left, [(left, left > 0)], flip_tta=True)[0] == pytest.approx(2 * 16 / (16 + 32))


def test_a_max_drop_outside_zero_to_one_is_a_config_error(tmp_path) -> None:
    pytest.importorskip("nncf")
    with pytest.raises(ConfigError, match="max_drop"):
        quantise_int8(tmp_path / "model.xml", tmp_path, max_drop=1.5)
