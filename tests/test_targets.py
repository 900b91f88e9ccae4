"""Targets: regions of each label convention, label sets, multilabel masks and the way back to labels."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg_tf.data.targets import resolve_target

LABELS = np.array([[0, 1, 2, 3]], np.uint8)


@pytest.mark.parametrize(("target", "convention", "expected"), [
    ("wt", "brats", [0, 1, 1, 1]), ("tc", "brats", [0, 1, 0, 1]), ("et", "brats", [0, 0, 0, 1]),
    ("tc", "msd", [0, 0, 1, 1]), ("wt", "msd", [0, 1, 1, 1]),  # MSD: 1 oedema, 2 non-enhancing, 3 enhancing
    ("any", "brats", [0, 1, 1, 1]), ("labels:2", "brats", [0, 0, 1, 0]), ("tc", "binary", [0, 1, 1, 1]),
])
def test_region_masks_follow_the_convention(target: str, convention: str, expected: list[int]) -> None:
    resolved = resolve_target(target, convention)
    assert resolved.masks(LABELS)[0, :, 0].tolist() == expected
    assert resolved.names == (["lesion"] if convention == "binary" or target == "any" else
                              ["labels_2"] if target == "labels:2" else [target])


@pytest.mark.parametrize("convention", ["brats", "msd"])
def test_multilabel_masks_and_back_to_the_same_labels(convention: str) -> None:
    labels = np.random.default_rng(0).integers(0, 4, (5, 6, 7)).astype(np.uint8)
    target = resolve_target("multilabel", convention)
    masks = target.masks(labels)
    assert target.names == ["wt", "tc", "et"] and masks.shape == (5, 6, 7, 3)
    assert (masks[..., 0] >= masks[..., 1]).all() and (masks[..., 1] >= masks[..., 2]).all()  # nested regions
    np.testing.assert_array_equal(target.to_labels(masks), labels)


def test_one_region_is_written_with_its_own_label_and_multilabel_needs_region_labels() -> None:
    """A BraTS evaluator reads ET from label 3: an ET-only run's seg must say 3, not 1 (NETC)."""
    target = resolve_target("tc", "brats")
    assert target.to_labels(target.masks(LABELS)).tolist() == [[0, 1, 0, 1]]
    assert resolve_target("et", "brats").to_labels(np.array([[[0], [1]]])).tolist() == [[0, 3]]
    assert resolve_target("wt", "brats").to_labels(np.array([[[0], [1]]])).tolist() == [[0, 2]]
    assert resolve_target("tc", "msd").to_labels(np.array([[[0], [1]]])).tolist() == [[0, 2]]
    assert resolve_target("labels:1,3", "brats").to_labels(np.array([[[1]]])).tolist() == [[1]]
    with pytest.raises(ValueError, match="multilabel needs masks with region labels"):
        resolve_target("multilabel", "binary")
    with pytest.raises(ValueError, match="unknown label convention"):
        resolve_target("wt", "kits")


def test_files_are_written_by_region_in_the_convention_of_the_data_predicted() -> None:
    # any (WT on BraTS) and labels:3 (ET) read back as what they segment, in any region convention
    lesion = np.array([[[0], [1]]])
    for convention, wt, et in (("brats", 2, 3), ("msd", 1, 3), ("brats2021", 2, 4), ("binary", 1, 1)):
        assert resolve_target("any", "brats").to_labels(lesion, convention).tolist() == [[0, wt]]
        assert resolve_target("labels:3", "brats").to_labels(lesion, convention).tolist() == [[0, et]]
        written = resolve_target("any", "brats").to_labels(lesion, convention)
        assert resolve_target("wt", convention).masks(written)[..., 0].tolist() == [[0, 1]]
    assert resolve_target("labels:1", "brats").to_labels(lesion).tolist() == [[0, 1]]  # NETC alone stays NETC
    # an MSD-trained multilabel model writing BraTS data: BraTS labels, so ET is 3 and SNFH 2
    labels = np.random.default_rng(1).integers(0, 4, (4, 5, 6)).astype(np.uint8)
    msd = resolve_target("multilabel", "msd")
    as_brats = msd.to_labels(msd.masks(labels), "brats")
    np.testing.assert_array_equal(as_brats, np.select([labels == 1, labels == 2, labels == 3], [2, 1, 3], 0))
    np.testing.assert_array_equal(msd.in_convention("brats").masks(as_brats), msd.masks(labels))
    # BraTS 2024 post-treatment: a resection cavity (4) is in no region, so `any` leaves it out
    assert resolve_target("any", "brats_post").masks(np.array([[0, 3, 4]]))[0, :, 0].tolist() == [0, 1, 0]


def test_the_config_knows_every_label_convention() -> None:
    from metaseg_tf.config import LABEL_CONVENTION_NAMES
    from metaseg_tf.data.targets import LABEL_CONVENTIONS, LABEL_NAMES, REGION_LABELS

    assert set(LABEL_CONVENTION_NAMES) == set(LABEL_CONVENTIONS) == set(LABEL_NAMES) == set(REGION_LABELS)
