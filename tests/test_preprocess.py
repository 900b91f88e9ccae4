"""CLAHE, resizing, normalisation and the preprocessing cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
from conftest import write_image

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.discover import discover_pairs
from metaseg_tf.data.preprocess import (
    apply_clahe,
    normalise,
    preprocess_dataset,
    resize_image,
    resize_mask,
    window_to_uint8,
)


def _low_contrast(size: int = 64) -> np.ndarray:
    rng = np.random.default_rng(0)
    base = 100 + 20 * np.sin(np.linspace(0, 6, size))[None, :] + rng.normal(0, 3, (size, size))
    return np.clip(np.dstack([base, base + 5, base - 5]), 0, 255).astype(np.uint8)


def test_clahe_spreads_a_narrow_histogram_and_keeps_shape_and_dtype() -> None:
    image = _low_contrast()
    out = apply_clahe(image, clip_limit=2.0, tile_grid=4)
    assert out.shape == image.shape and out.dtype == np.uint8
    for c in range(3):
        assert np.ptp(out[..., c]) > 1.5 * np.ptp(image[..., c])
    stronger = apply_clahe(image, clip_limit=8.0, tile_grid=4)
    assert stronger[..., 0].std() > out[..., 0].std()  # a higher clip limit allows more contrast


def test_clahe_rejects_float_input() -> None:
    with pytest.raises(ValueError, match="uint8"):
        apply_clahe(np.zeros((8, 8, 3), np.float32))


def test_window_stretches_each_channel_and_handles_constant_channels() -> None:
    image = np.zeros((4, 4, 2), np.float32)
    image[..., 0] = np.linspace(0.1, 0.2, 16).reshape(4, 4)
    out = window_to_uint8(image)
    assert out[..., 0].min() == 0 and out[..., 0].max() == 255
    assert not out[..., 1].any()


def test_resize_keeps_masks_binary_and_images_typed() -> None:
    mask = (np.random.default_rng(1).random((100, 100)) > 0.7).astype(np.uint8)
    small = resize_mask(mask, 32)
    assert small.shape == (32, 32) and set(np.unique(small)) <= {0, 1}
    image = np.zeros((100, 100, 1), np.uint8)
    assert resize_image(image, 48).shape == (48, 48, 1)
    assert resize_image(np.zeros((16, 16, 3), np.uint8), 64).shape == (64, 64, 3)


def test_zscore_and_minmax_normalisation() -> None:
    images = np.random.default_rng(2).integers(0, 256, (2, 8, 8, 3)).astype(np.uint8)
    z = normalise(images, "zscore")
    np.testing.assert_allclose(z.mean(axis=(1, 2)), 0, atol=1e-5)
    np.testing.assert_allclose(z.std(axis=(1, 2)), 1, atol=1e-4)
    m = normalise(images, "minmax")
    assert m.min() == 0 and m.max() == 1
    assert normalise(np.zeros((8, 8, 1), np.uint8)).max() == 0  # constant slice: no division by zero
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(images, "robust")


def test_dataset_is_cached_and_reused(phantom_dir: Path, tmp_path: Path) -> None:
    config = ExperimentConfig(image_size=32, cache_dir=str(tmp_path / "cache"))
    report = discover_pairs(phantom_dir)
    first = preprocess_dataset(report, config, progress=False)
    assert not first.from_cache and first.cache_path.is_file()
    assert first.images.shape == (48, 32, 32, 3) and first.images.dtype == np.uint8
    assert first.masks.shape == (48, 32, 32) and set(np.unique(first.masks)) <= {0, 1}
    assert len(first.patients) == 6
    second = preprocess_dataset(report, config, progress=False)
    assert second.from_cache
    np.testing.assert_array_equal(first.images, second.images)
    np.testing.assert_array_equal(first.case_ids, second.case_ids)
    other = preprocess_dataset(report, config.replace(clahe=False), progress=False)
    assert not other.from_cache and other.cache_path != first.cache_path


def test_the_cache_is_rebuilt_when_a_file_changes(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    config = ExperimentConfig(image_size=32, cache_dir=str(tmp_path / "cache"))
    first = preprocess_dataset(discover_pairs(data), config, progress=False)
    pair = discover_pairs(data).pairs[0]
    mask = cv2.imread(str(pair.mask_path), cv2.IMREAD_UNCHANGED)
    mask[:] = 255  # the annotation of one slice is redrawn
    cv2.imwrite(str(pair.mask_path), mask)
    second = preprocess_dataset(discover_pairs(data), config, progress=False)
    assert not second.from_cache and second.cache_path != first.cache_path
    assert second.masks[0].all() and not first.masks[0].all()


def test_unreadable_pairs_are_skipped_and_listed(tmp_path: Path) -> None:
    root = tmp_path / "data"
    for n in range(3):
        write_image(root / f"c_{n}.png", np.full((32, 32, 3), 60 * n, np.uint8))
        write_image(root / f"c_{n}_mask.png", np.zeros((32, 32), np.uint8))
    (root / "c_1.png").write_bytes(b"broken")
    write_image(root / "c_2_mask.png", np.zeros((16, 16), np.uint8))
    config = ExperimentConfig(image_size=16, cache_dir=str(tmp_path / "cache"))
    dataset = preprocess_dataset(discover_pairs(root), config, progress=False)
    assert len(dataset) == 1
    assert sorted(Path(p).name for p in dataset.skipped) == ["c_1.png", "c_2.png"]
    assert "unreadable" in dataset.skipped[str(root / "c_1.png")]
    assert "mask" in dataset.skipped[str(root / "c_2.png")]
