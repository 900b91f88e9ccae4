"""Losses: hand-computed values, empty-mask stability, gradients, serialisation."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from metaseg_tf.training.losses import LOSS_NAMES, SegmentationLoss


def _pair() -> tuple[np.ndarray, np.ndarray]:
    """One 2x2 image: truth [[1, 0], [1, 0]], prediction [[0.8, 0.2], [0.4, 0.1]]."""
    truth = np.array([[1, 0], [1, 0]], np.float32).reshape(1, 2, 2, 1)
    pred = np.array([[0.8, 0.2], [0.4, 0.1]], np.float32).reshape(1, 2, 2, 1)
    return truth, pred


def _per_image(kind: str, truth: np.ndarray, pred: np.ndarray, **kwargs) -> np.ndarray:
    loss = SegmentationLoss(kind, reduction=None, **kwargs)
    return keras.ops.convert_to_numpy(loss(truth, pred))


def test_hand_computed_values() -> None:
    truth, pred = _pair()
    bce = -(np.log(0.8) + np.log(0.8) + np.log(0.4) + np.log(0.9)) / 4
    dice = 1 - (2 * 1.2 + 1) / (2 + 1.5 + 1)
    tp, fn, fp = 1.2, 0.8, 0.3
    tversky = 1 - (tp + 1) / (tp + 0.7 * fn + 0.3 * fp + 1)
    focal_terms = [0.25 * 0.2**2 * -np.log(0.8), 0.75 * 0.2**2 * -np.log(0.8),
                   0.25 * 0.6**2 * -np.log(0.4), 0.75 * 0.1**2 * -np.log(0.9)]
    expected = {"bce": bce, "dice": dice, "bce_dice": bce + dice, "tversky": tversky,
                "focal_tversky": tversky**0.75, "focal": np.mean(focal_terms)}
    for kind, value in expected.items():
        np.testing.assert_allclose(_per_image(kind, truth, pred), [value], rtol=1e-5, err_msg=kind)


@pytest.mark.parametrize("kind", [kind for kind in LOSS_NAMES if kind != "dice_batch"])
def test_empty_mask_is_finite_and_zero_when_prediction_is_empty(kind: str) -> None:
    empty = np.zeros((2, 8, 8, 1), np.float32)
    predicted = np.stack([np.zeros((8, 8, 1)), np.full((8, 8, 1), 0.9)]).astype(np.float32)
    values = _per_image(kind, empty, predicted)
    assert np.all(np.isfinite(values))
    assert values[0] == pytest.approx(0.0, abs=1e-5)
    assert values[1] > values[0]


def test_batch_dice_is_one_soft_dice_over_the_whole_batch() -> None:
    """dice_batch: 1 - (2 sum(yp) + 1) / (sum(y) + sum(p) + 1) over every pixel of the batch (Buda et al.'s
    Keras loss), the same value for each image; an empty batch predicted empty scores 0; an empty slice's
    false positives keep a gradient, where per-image Dice saturates."""
    truth, pred = _pair()
    empty_truth, blob = np.zeros_like(truth), np.full_like(pred, 0.9)
    batch_truth, batch_pred = np.concatenate([truth, empty_truth]), np.concatenate([pred, blob])
    expected = 1 - (2 * 1.2 + 1) / (2 + 1.5 + 3.6 + 1)
    np.testing.assert_allclose(_per_image("dice_batch", batch_truth, batch_pred), [expected] * 2, rtol=1e-5)
    assert _per_image("dice_batch", np.zeros((2, 8, 8, 1), np.float32),
                      np.zeros((2, 8, 8, 1), np.float32))[0] == pytest.approx(0.0, abs=1e-6)
    truth = np.zeros((2, 32, 32, 1), np.float32)  # a lesion on slice 0, none on slice 1
    truth[0, 8:24, 8:24] = 1
    gains = {}
    for kind in ("dice", "dice_batch"):  # halving slice 1's spurious blob (0.9 -> 0.45): how much loss it saves
        losses = [float(np.mean(_per_image(kind, truth, np.concatenate([truth[:1], np.full_like(truth[:1], p)]))))
                  for p in (0.9, 0.45)]
        gains[kind] = losses[0] - losses[1]
    assert gains["dice_batch"] > 20 * gains["dice"] > 0, gains


def test_perfect_prediction_minimises_overlap_losses() -> None:
    truth = np.zeros((1, 8, 8, 1), np.float32)
    truth[0, 2:5, 2:5] = 1
    for kind in ("dice", "tversky", "focal_tversky"):
        assert _per_image(kind, truth, truth)[0] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("kind", LOSS_NAMES)
def test_gradient_is_finite_at_saturated_predictions(kind: str) -> None:
    """Saturated sigmoid outputs (exactly 0 and 1) must not give NaN or infinite gradients."""
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Conv2D(1, 1, activation="sigmoid")])
    model.layers[0].set_weights([np.full((1, 1, 1, 1), 100.0, np.float32), np.zeros(1, np.float32)])
    model.compile(optimizer=keras.optimizers.SGD(0.01), loss=SegmentationLoss(kind))
    x = np.linspace(-1, 1, 16, dtype=np.float32).reshape(1, 4, 4, 1)
    y = (x > 0.5).astype(np.float32)
    history = model.fit(x, y, epochs=2, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    assert np.all(np.isfinite(model.layers[0].get_weights()[0]))


def test_unknown_loss_and_config_round_trip() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        SegmentationLoss("hinge")
    loss = SegmentationLoss("tversky", alpha=0.6, beta=0.4, smooth=0.5)
    clone = keras.losses.deserialize(keras.losses.serialize(loss))
    assert (clone.kind, clone.alpha, clone.beta, clone.smooth) == ("tversky", 0.6, 0.4, 0.5)


@pytest.mark.parametrize("kind", ["bce_dice", "dice_batch"])
def test_batch_loss_leaves_out_images_of_weight_zero(kind: str) -> None:
    """``mean_with_sample_weight``: the loss of a batch with a padding image (weight 0) is the mean of the
    others, as in a batch without it; ``dice_batch`` leaves its pixels out of the batch's overlap."""
    rng = np.random.default_rng(1)
    truth = (rng.random((3, 8, 8, 1)) < 0.3).astype(np.float32)
    pred = rng.random((3, 8, 8, 1)).astype(np.float32)
    loss = SegmentationLoss(kind)
    alone = float(keras.ops.convert_to_numpy(loss(truth[:2], pred[:2])))
    padded = float(keras.ops.convert_to_numpy(loss(truth, pred, sample_weight=np.array([1, 1, 0], np.float32))))
    assert padded == pytest.approx(alone, rel=1e-6)
    with_it = float(keras.ops.convert_to_numpy(loss(truth, pred)))
    assert with_it != pytest.approx(alone, rel=1e-3)  # the third image does change the loss when it counts
    column = float(keras.ops.convert_to_numpy(loss(truth, pred, sample_weight=[[1.0], [1.0], [0.0]])))
    assert column == pytest.approx(alone, rel=1e-6)


def test_dice_batch_refuses_pixel_weights() -> None:
    """One weight per image: a per-pixel weight map would be read as many images' flags."""
    truth, pred = np.ones((1, 4, 4, 1), np.float32), np.full((1, 4, 4, 1), 0.5, np.float32)
    with pytest.raises(ValueError, match="one sample weight per image"):
        SegmentationLoss("dice_batch")(truth, pred, sample_weight=np.ones((1, 4, 4), np.float32))


def test_dice_batch_in_evaluate_leaves_out_padding_images() -> None:
    """Through ``model.evaluate`` (Keras' compiled loss passes the batches' ``sample_weight`` on): a sharded
    evaluation batch padded with a weight-0 image scores as the batch without it."""
    rng = np.random.default_rng(2)
    images = rng.normal(size=(3, 8, 8, 1)).astype(np.float32)
    truth = (rng.random((3, 8, 8, 1)) < 0.3).astype(np.float32)
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid")])
    model.compile(loss=SegmentationLoss("dice_batch"))
    alone = model.evaluate(images[:2], truth[:2], batch_size=3, verbose=0)
    padded = model.evaluate(images, truth, sample_weight=np.array([1, 1, 0], np.float32), batch_size=3, verbose=0)
    assert padded == pytest.approx(alone, rel=1e-5)
