"""The synthetic phantom: deterministic, loadable like real data, with the lesion statistics promised."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

from metaseg_tf.data.discover import DataError, discover_pairs
from metaseg_tf.data.io import read_image, read_pair
from metaseg_tf.data.synthetic import generate_phantom


def _digest(root: Path) -> str:
    files = sorted(root.rglob("*.png"))
    return hashlib.sha256(b"".join(f.name.encode() + f.read_bytes() for f in files)).hexdigest()


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path) -> None:
    a = generate_phantom(tmp_path / "a", n_patients=2, n_slices=4, size=64, seed=5)
    b = generate_phantom(tmp_path / "b", n_patients=2, n_slices=4, size=64, seed=5)
    c = generate_phantom(tmp_path / "c", n_patients=2, n_slices=4, size=64, seed=6)
    assert _digest(a.root) == _digest(b.root) != _digest(c.root)
    assert a.lesions_per_slice == b.lesions_per_slice


def test_phantom_is_found_in_kaggle_layout(phantom_dir: Path) -> None:
    report = discover_pairs(phantom_dir)
    assert report.layout == "kaggle_3m"
    assert len(report.case_ids) == 6 and len(report.pairs) == 48
    assert report.n_skipped == 0
    image, mask = read_pair(report.pairs[3])
    assert image.shape == (64, 64, 3) and set(np.unique(mask)) <= {0, 1}


def test_lesion_statistics_at_full_size(tmp_path: Path) -> None:
    summary = generate_phantom(tmp_path / "p", n_patients=8, n_slices=24, size=256, seed=0)
    counts = np.asarray(summary.lesions_per_slice)
    assert counts.max() <= 6
    assert 0.2 <= summary.fraction_without_lesion <= 0.45  # "about a third" of the slices are empty
    radii = np.asarray(summary.lesion_radii)
    assert radii.min() >= 2.0 and radii.max() <= 30.0
    assert np.median(radii) < 12.0  # most lesions are small
    # the written masks agree with the counts: connected components per slice never exceed the lesions
    report = discover_pairs(summary.root)
    for pair, expected in zip(report.pairs, counts):
        _, mask = read_pair(pair)
        assert ndimage.label(mask)[1] <= expected
        assert (mask.sum() > 0) == (expected > 0)


def test_lesions_enhance_on_post_contrast_and_oedema_is_bright_on_flair(tmp_path: Path) -> None:
    summary = generate_phantom(tmp_path / "p", n_patients=3, n_slices=12, size=128, seed=1)
    report = discover_pairs(summary.root)
    lesion_t1c, brain_t1c, ring_flair, brain_flair = [], [], [], []
    for pair in report.pairs:
        image, mask = read_pair(pair)
        if mask.sum() < 20:
            continue
        ring = ndimage.binary_dilation(mask, iterations=3) & ~mask.astype(bool)
        brain = (image[..., 1] > 0.3) & ~ndimage.binary_dilation(mask, iterations=12)
        lesion_t1c.append(image[..., 2][mask > 0].max())
        brain_t1c.append(np.median(image[..., 2][brain]))
        ring_flair.append(np.mean(image[..., 1][ring]))
        brain_flair.append(np.median(image[..., 1][brain]))
    assert lesion_t1c, "no slice with a lesion of 20+ pixels"
    assert np.mean(lesion_t1c) > np.mean(brain_t1c) + 0.15
    assert np.mean(ring_flair) > np.mean(brain_flair) + 0.05


def test_existing_folder_is_reused_or_never_overwritten(tmp_path: Path) -> None:
    first = generate_phantom(tmp_path / "p", n_patients=1, n_slices=2, size=64, seed=0)
    again = generate_phantom(tmp_path / "p", n_patients=1, n_slices=2, size=64, seed=0)
    assert again.reused and again.case_ids == first.case_ids
    with pytest.raises(DataError, match="not empty"):
        generate_phantom(tmp_path / "p", n_patients=1, n_slices=2, size=64, seed=1)
    other = tmp_path / "mine"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(DataError):
        generate_phantom(other, n_patients=1, n_slices=2, size=64)
    assert (other / "precious.txt").read_text() == "keep me"


def test_images_look_like_a_head(tmp_path: Path) -> None:
    summary = generate_phantom(tmp_path / "p", n_patients=1, n_slices=3, size=128, seed=2)
    image = read_image(next(summary.root.rglob("*_2.png")))
    assert image[:4, :4].mean() < 0.1  # air around the head is dark
    assert image[64, 64].mean() > 0.1  # brain in the middle is not
