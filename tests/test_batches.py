"""Batches with joint augmentation: shapes, alignment of image and mask, reproducibility."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.augment import AugmentationSettings, random_affine, warp_pair
from metaseg_tf.data.batches import SegmentationBatches, split_batches
from metaseg_tf.data.discover import discover_pairs
from metaseg_tf.data.preprocess import PreprocessedDataset, preprocess_dataset
from metaseg_tf.data.split import split_for_config


def _square_dataset(n: int = 8, size: int = 32) -> PreprocessedDataset:
    """Slices whose only bright structure is a square exactly where the mask is."""
    rng = np.random.default_rng(0)
    images = np.full((n, size, size, 3), 30, np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for k in range(n):
        top, left = rng.integers(4, size - 14, 2)
        images[k, top : top + 10, left : left + 10] = 230
        masks[k, top : top + 10, left : left + 10] = 1
    return PreprocessedDataset(images, masks, np.asarray([f"c{k // 2}" for k in range(n)]), np.arange(n))


def test_square_moves_with_its_mask() -> None:
    dataset = _square_dataset()
    config = ExperimentConfig(batch_size=4, rotation_degrees=40, zoom_range=0.2, vertical_flip=True,
                              intensity_jitter=0.0, normalisation="none")
    batches = SegmentationBatches(dataset, np.arange(8), config, training=True, seed=1)
    for epoch in range(3):
        for x, y in (batches[i] for i in range(len(batches))):
            assert set(np.unique(y)) <= {0.0, 1.0}
            bright = x[..., 0] > 0.5
            inside = y[..., 0] > 0
            # the bright square and the mask coincide except on the interpolated rim
            agreement = (bright & inside).sum() / max((bright | inside).sum(), 1)
            assert agreement > 0.75
        batches.on_epoch_end()


def test_augmentation_changes_something_and_can_be_switched_off() -> None:
    dataset = _square_dataset()
    on = SegmentationBatches(dataset, np.arange(8), ExperimentConfig(batch_size=8), training=True, seed=0)
    off = SegmentationBatches(dataset, np.arange(8), ExperimentConfig(batch_size=8, augment=False),
                              training=True, seed=0)
    x_on, y_on = on[0]
    x_off, y_off = off[0]
    order = on._order
    assert not np.array_equal(y_on[..., 0], dataset.masks[order])
    np.testing.assert_array_equal(y_off[..., 0], dataset.masks[off._order])
    assert x_on.dtype == np.float32 and x_on.shape == (8, 32, 32, 3) and y_on.shape == (8, 32, 32, 1)


def test_missing_sequence_fill_copies_one_sequence_into_all_and_leaves_other_runs_as_they_were() -> None:
    from metaseg_tf.config import ConfigError
    from metaseg_tf.data.augment import fill_sequences

    dataset = _square_dataset(n=16)
    dataset.images[..., 0], dataset.images[..., 2] = 10, 250  # three different sequences
    plain = ExperimentConfig(batch_size=16, rotation_degrees=0, zoom_range=0, horizontal_flip=False,
                             intensity_jitter=0, normalisation="none")
    x = SegmentationBatches(dataset, np.arange(16), plain.replace(sequence_fill_probability=0.5), training=True)[0][0]
    filled = np.all(x == x[..., 1:2], axis=(1, 2, 3))
    assert 0 < filled.sum() < 16, "about half of the slices are all FLAIR, the others keep their three sequences"
    np.testing.assert_allclose(x[~filled][..., 0], 10 / 255, rtol=1e-6)
    np.testing.assert_allclose(x[filled][..., 0], x[filled][..., 1])
    # no random number is drawn without the fill: a slice is augmented by the draws of the steps that predate it
    from metaseg_tf.data.augment import random_gain_offset, random_gamma
    from metaseg_tf.data.preprocess import normalise

    config = ExperimentConfig(batch_size=16)
    batches = SegmentationBatches(dataset, np.arange(16), config, training=True)
    k, settings = 3, AugmentationSettings.from_config(config)
    rng = np.random.default_rng([config.seed, 0, 0, k])  # (seed, epoch, batch, position)
    chosen = batches._order[k]
    image = warp_pair(dataset.images[chosen], dataset.masks[chosen], random_affine(rng, settings, 32))[0]
    image = normalise(random_gamma(image.astype(np.float32) / 255.0, rng, settings.intensity_jitter),
                      config.normalisation)
    np.testing.assert_allclose(batches[0][0][k], random_gain_offset(image, rng, settings.intensity_jitter), rtol=1e-6)
    # 2.5D blocks: each block takes its own FLAIR
    image = np.arange(2 * 2 * 6).reshape(2, 2, 6)
    settings = AugmentationSettings(sequence_fill_probability=1.0, sequence_fill_channel=1, sequences=3)
    np.testing.assert_array_equal(fill_sequences(image, np.random.default_rng(0), settings),
                                  np.repeat(image[..., [1, 4]], 3, axis=-1))
    with pytest.raises(ConfigError, match="sequence_fill_channel"):
        ExperimentConfig(sequence_fill_probability=0.2, sequence_fill_channel=3)

def test_batches_are_reproducible_and_reshuffled_per_epoch() -> None:
    dataset = _square_dataset()
    config = ExperimentConfig(batch_size=3)
    a = SegmentationBatches(dataset, np.arange(8), config, training=True, seed=5)
    b = SegmentationBatches(dataset, np.arange(8), config, training=True, seed=5)
    np.testing.assert_array_equal(a[1][0], b[1][0])
    assert len(a) == 3 and a[2][0].shape[0] == 2
    first_order = a._order.copy()
    a.on_epoch_end()
    assert not np.array_equal(first_order, a._order)
    with pytest.raises(IndexError):
        a[3]


def test_evaluation_batches_keep_order_and_are_not_augmented() -> None:
    dataset = _square_dataset()
    batches = SegmentationBatches(dataset, np.arange(8), ExperimentConfig(batch_size=8), training=False)
    _, y = batches[0]
    np.testing.assert_array_equal(y[..., 0], dataset.masks)


def test_identity_warp_is_exact() -> None:
    image = np.random.default_rng(3).integers(0, 255, (16, 16, 3)).astype(np.uint8)
    mask = (image[..., 0] > 128).astype(np.uint8)
    settings = AugmentationSettings(0.0, 0.0, False, False, 0.0)
    matrix = random_affine(np.random.default_rng(0), settings, 16)
    warped_image, warped_mask = warp_pair(image, mask, matrix)
    np.testing.assert_array_equal(warped_image, image)
    np.testing.assert_array_equal(warped_mask, mask)


def test_split_batches_on_phantom(phantom_dir: Path, tmp_path: Path) -> None:
    config = ExperimentConfig(image_size=32, batch_size=4, cache_dir=str(tmp_path))
    dataset = preprocess_dataset(discover_pairs(phantom_dir), config, progress=False)
    split = split_for_config(dataset.case_ids, config)
    batches = split_batches(dataset, split, config)
    assert set(batches) == {"train", "val", "test"}
    n_slices = sum(len(b.indices) for b in batches.values())
    assert n_slices == len(dataset)
    x, y = batches["train"][0]
    assert x.shape == (4, 32, 32, 3) and np.isfinite(x).all()


def test_volume_batches_carry_context_channels_and_multilabel_targets(brats_phantom_dir: Path, tmp_path: Path) -> None:
    from metaseg_tf.data.batches import load_experiment_data

    config = ExperimentConfig(data_dir=str(brats_phantom_dir), cache_dir=str(tmp_path), image_size=32, batch_size=4,
                              target="multilabel", context_slices=1, sequences=("t1c", "t2f"))
    data = load_experiment_data(config, progress=False)
    assert data.report.layout == "brats_mets" and data.dataset.convention == "brats"
    assert config.channels == 2 and config.input_channels == 6 and data.dataset.images.shape[1:] == (32, 32, 2)
    assert set(np.unique(data.dataset.masks)) == {0, 1, 2, 3}  # the cache keeps the labels
    assert data.dataset.geometry["BraTS-MET-04000-000"]["spacing"] == pytest.approx([3.75, 3.75, 3.75])
    train = data.split.indices(data.dataset.case_ids, "train")
    x, y = SegmentationBatches(data.dataset, train, config)[0]
    assert x.shape == (4, 32, 32, 6) and y.shape == (4, 32, 32, 3)
    sampled = SegmentationBatches(data.dataset, train, config.replace(lesion_slice_repeats=2,
                                                                      lesion_slice_sampling="area"), training=True)
    area = (data.dataset.masks[sampled.lesion_indices] > 0).reshape(len(sampled.lesion_indices), -1).sum(axis=1)
    cases = data.dataset.case_ids[sampled.lesion_indices]  # a slice's area: its pixels of any region (WT here)
    for case in set(cases):
        mine = area[cases == case]
        np.testing.assert_allclose(sampled.lesion_weights[cases == case] * len(set(cases)),
                                   (mine + 0.1 * mine.mean()) / (1.1 * mine.sum()))
    np.testing.assert_array_equal(y[..., 0] >= y[..., 1], True)  # WT contains TC
    # the centre block of the context is the slice itself; its neighbour block is the previous slice
    first = SegmentationBatches(data.dataset, train[:2], config.replace(normalisation="none"))[0][0]
    np.testing.assert_allclose(first[1, ..., 2:4], data.dataset.images[train[1]] / 255.0)
    np.testing.assert_allclose(first[1, ..., 0:2], data.dataset.images[train[0]] / 255.0)
    halved = SegmentationBatches(data.dataset, train, config.replace(empty_slice_fraction=0.5), training=True)
    lesion = data.dataset.masks[train].reshape(len(train), -1).any(axis=1)
    assert halved.slices_per_epoch == lesion.sum() + round(0.5 * (~lesion).sum())
    epochs = [set(halved._epoch_order().tolist()) for halved.epoch in range(10)]
    assert all(set(train[lesion]) <= drawn and len(drawn) == halved.slices_per_epoch for drawn in epochs)
    assert set().union(*epochs) == set(train)  # each epoch draws other lesion-free slices
    doubled = SegmentationBatches(data.dataset, train, config.replace(lesion_slice_repeats=2, empty_slice_fraction=0.5),
                                  training=True)  # Buda et al.'s "tumour slices twice"
    order = doubled._epoch_order()
    counts = np.bincount(order, minlength=int(train.max()) + 1)
    assert len(order) == doubled.slices_per_epoch == 2 * lesion.sum() + round(0.5 * (~lesion).sum())
    assert (counts[train[lesion]] == 2).all() and set(np.unique(counts[train[~lesion]])) <= {0, 1}
    assert len(SegmentationBatches(data.dataset, train, config.replace(lesion_slice_repeats=2))) == \
        len(SegmentationBatches(data.dataset, train, config))  # evaluation batches see each slice once
    enhancing = SegmentationBatches(data.dataset, train, config.replace(target="et", empty_slice_fraction=0.5),
                                    training=True)  # "lesion" is the target region: oedema-only slices are empty
    assert set(enhancing.lesion_indices) == set(train[(data.dataset.masks[train] == 3).reshape(len(train), -1).any(1)])


def test_area_sampling_draws_a_patient_then_its_lesion_slices_by_area() -> None:
    """lesion_slice_sampling="area": k n lesion-slice draws per epoch with replacement, a patient uniformly,
    then its slice i with probability (a_i + 0.1 mean a) / (1.1 sum a) over its lesion slices (Buda et al.'s
    PyTorch sampler); empty slices as before; reproducible from (seed, epoch)."""
    dataset = _square_dataset(n=6)  # cases c0 (slices 0, 1), c1 (2, 3), c2 (4, 5); 100-pixel squares
    dataset.masks[0] = 0
    dataset.masks[0, 2:4, 2:4] = 1  # c0: a 4-pixel lesion beside a 100-pixel one
    dataset.masks[4] = 0  # c2: one empty slice, one lesion slice
    config = ExperimentConfig(batch_size=4, lesion_slice_repeats=2, lesion_slice_sampling="area")
    batches = SegmentationBatches(dataset, np.arange(6), config, training=True, seed=3)
    c0 = (np.array([4.0, 100.0]) + 0.1 * 52.0) / (1.1 * 104.0)
    expected = np.concatenate([c0, [0.5, 0.5], [1.0]]) / 3
    np.testing.assert_array_equal(batches.lesion_indices, [0, 1, 2, 3, 5])
    np.testing.assert_allclose(batches.lesion_weights, expected)
    counts = np.zeros(6)
    for batches.epoch in range(400):
        order = batches._epoch_order()
        assert len(order) == batches.slices_per_epoch == 2 * 5 + 1 and (order == 4).sum() == 1
        counts += np.bincount(order, minlength=6)
    np.testing.assert_allclose(counts[[0, 1, 2, 3, 5]] / counts[[0, 1, 2, 3, 5]].sum(), expected, atol=0.02)
    assert counts[0] < counts[1] / 5, "the small lesion's slice is drawn far less often than its neighbour's"
    assert counts[5] > 1.5 * counts[2], "a patient with one lesion slice gets a patient's share of the draws"
    np.testing.assert_array_equal(batches._epoch_order(), batches._epoch_order())  # (seed, epoch) decide
    uniform = SegmentationBatches(dataset, np.arange(6), config.replace(lesion_slice_sampling="uniform"),
                                  training=True, seed=3)
    assert uniform.lesion_weights is None and (np.bincount(uniform._epoch_order())[[0, 1, 2, 3, 5]] == 2).all()
    with pytest.raises(ConfigError, match="lesion_slice_sampling"):
        config.replace(lesion_slice_sampling="volume")


def test_shards_side_by_side_are_the_one_process_batch() -> None:
    """Process i of n reads rows [i b, (i + 1) b) of every global batch, augmented as one process would."""
    dataset = _square_dataset(n=10)
    config = ExperimentConfig(batch_size=4, rotation_degrees=30, intensity_jitter=0.1)
    alone = SegmentationBatches(dataset, np.arange(10), config, training=True, seed=2)
    shards = [SegmentationBatches(dataset, np.arange(10), config, training=True, seed=2, shard=(i, 2))
              for i in range(2)]
    assert len(alone) == 3 and all(len(shard) == 2 for shard in shards)  # 10 slices: 2 whole batches of 4
    assert shards[0].dropped_per_epoch == 2 and alone.dropped_per_epoch == 0
    for epoch in range(2):
        for index in range(2):
            x, y = alone[index]
            parts = [shard[index] for shard in shards]
            np.testing.assert_array_equal(np.concatenate([part[0] for part in parts]), x)
            np.testing.assert_array_equal(np.concatenate([part[1] for part in parts]), y)
            assert all(np.array_equal(part[2], np.ones(2, np.float32)) for part in parts)
        for batches in (alone, *shards):
            batches.on_epoch_end()


def test_sharded_evaluation_pads_its_last_batch_with_weight_zero() -> None:
    dataset = _square_dataset(n=10)
    config = ExperimentConfig(batch_size=8)
    alone = SegmentationBatches(dataset, np.arange(10), config)
    shards = [SegmentationBatches(dataset, np.arange(10), config, shard=(i, 2)) for i in range(2)]
    assert len(alone) == len(shards[0]) == 2
    last = [shard[1] for shard in shards]  # the global batch holds 2 slices: 8 and 9, then 6 repeats of 8
    weights = np.concatenate([part[2] for part in last])
    np.testing.assert_array_equal(weights, [1, 1, 0, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(np.concatenate([part[0] for part in last])[:2], alone[1][0])
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        SegmentationBatches(dataset, np.arange(10), config, shard=(0, 3))
