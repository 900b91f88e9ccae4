"""Scores: overlap scores against scikit-learn, HD95 against scipy, lesion-wise and per-patient scores."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, jaccard_score, precision_score, recall_score

from metaseg_tf.evaluation import surfaces
from metaseg_tf.evaluation.scores import (
    MAX_GAP_SLICES,
    bootstrap_ci,
    evaluate_masks,
    hausdorff_distance,
    lesion_wise_scores,
    overlap_scores,
    stack_slices,
)


def _random_masks(seed: int, shape=(6, 32, 32)) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random(shape) < 0.2, rng.random(shape) < 0.25


@pytest.mark.parametrize("seed", range(5))
def test_overlap_scores_agree_with_scikit_learn(seed: int) -> None:
    truth, pred = _random_masks(seed)
    scores = overlap_scores(truth, pred)
    t, p = truth.ravel(), pred.ravel()
    assert scores["dice"] == pytest.approx(f1_score(t, p))
    assert scores["iou"] == pytest.approx(jaccard_score(t, p))
    assert scores["precision"] == pytest.approx(precision_score(t, p))
    assert scores["recall"] == pytest.approx(recall_score(t, p))
    assert scores["specificity"] == pytest.approx(recall_score(~t, ~p))


def test_empty_mask_conventions() -> None:
    empty, lesion = np.zeros((8, 8), bool), np.zeros((8, 8), bool)
    lesion[2:4, 2:4] = True
    assert overlap_scores(empty, empty) == dict(dice=1.0, iou=1.0, precision=1.0, recall=1.0, specificity=1.0)
    missed = overlap_scores(lesion, empty)
    assert missed["dice"] == missed["recall"] == missed["precision"] == 0.0 and missed["specificity"] == 1.0
    false_alarm = overlap_scores(empty, lesion)
    assert false_alarm["dice"] == false_alarm["precision"] == 0.0
    assert false_alarm["specificity"] == pytest.approx(60 / 64)
    assert hausdorff_distance(empty, empty) == 0.0
    assert hausdorff_distance(lesion, empty) == hausdorff_distance(empty, lesion) == 374.0  # BraTS's convention
    with pytest.raises(ValueError, match="differ in shape"):
        overlap_scores(empty, np.zeros((4, 4)))


def test_hausdorff_of_shifted_squares_and_surfel_weighted_percentiles_by_hand() -> None:
    a, b = np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    a[10:20, 10:20] = True
    b[13:23, 10:20] = True
    assert hausdorff_distance(a, b) == pytest.approx(3.0)
    assert hausdorff_distance(a, b, spacing=(2.0, 1.0)) == pytest.approx(6.0)
    # two pixels 4 apart: each has 4 surfel corners of equal length; directed distances 3, 3, 4, 4, so the
    # area-weighted 50th percentile is 3 and the 95th 4 (percentiles over voxel centres would give 4 and 4)
    x, y = np.zeros((12, 14), bool), np.zeros((12, 14), bool)
    x[5, 5], y[5, 9] = True, True
    assert hausdorff_distance(x, y) == pytest.approx(4.0)
    assert hausdorff_distance(x, y, percentile=50) == pytest.approx(3.0)
    # a voxel and its neighbour along a 2 mm axis: half the corners coincide, the others are 2 mm away
    v, w = np.zeros((3, 3, 3), bool), np.zeros((3, 3, 3), bool)
    v[1, 1, 1], w[2, 1, 1] = True, True
    assert hausdorff_distance(v, w, spacing=(2.0, 1.0, 1.0)) == pytest.approx(2.0)
    assert hausdorff_distance(v, w, percentile=50, spacing=(2.0, 1.0, 1.0)) == 0.0
    with pytest.raises(ValueError, match="one spacing per axis"):
        hausdorff_distance(v, w, spacing=(1.0, 1.0))


def test_surfel_areas_and_lengths_are_the_marching_cubes_and_squares_surfaces() -> None:
    # one voxel's corner cut: a triangle through three edge midpoints, sqrt(3)/8 on a unit grid; with a 2 mm
    # first axis its sides are (-1, .5, 0) and (-1, 0, .5): area |cross| / 2 = 0.375
    assert surfaces._surfel_measures((1.0, 1.0, 1.0))[1] == pytest.approx(np.sqrt(3) / 8)
    assert surfaces._surfel_measures((2.0, 1.0, 1.0))[1] == pytest.approx(0.375)
    # a k x k square's contour: 4 straight sides of k - 1 and 4 corner cuts of sqrt(2) / 2
    square = np.zeros((10, 10), bool)
    square[2:7, 2:7] = True
    (_, lengths), _ = surfaces.surface_distances(square, square)
    assert lengths.sum() == pytest.approx(4 * 4 + 4 * np.sqrt(2) / 2)
    # a box's surface is its faces less the edge and corner cuts; closer to the faces than voxel counts
    box = np.zeros((8, 8, 8), bool)
    box[2:6, 2:6, 2:6] = True
    (_, areas), _ = surfaces.surface_distances(box, box)
    assert 0.8 * 6 * 16 < areas.sum() < 6 * 16


def _disc(shape: tuple[int, int], centre: tuple[int, int], radius: int) -> np.ndarray:
    rows, cols = np.ogrid[: shape[0], : shape[1]]
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


def test_lesion_wise_counts_detection_misses_and_false_positives() -> None:
    shape = (64, 64)
    truth = _disc(shape, (15, 15), 5) | _disc(shape, (45, 45), 4)
    pred = _disc(shape, (15, 15), 5) | _disc(shape, (10, 50), 3)  # one hit, one miss, one false positive
    scores = lesion_wise_scores(truth, pred)
    assert (scores.truth_lesions, scores.detected, scores.false_positives) == (2, 1, 1)
    assert scores.sensitivity == 0.5
    assert scores.lesion_dice == pytest.approx(1 / 3)  # (1 + 0) / (2 lesions + 1 false positive)
    assert scores.lesion_hd95 == pytest.approx(2 * 374 / 3)  # (0 + 374 for the miss + 374 for the FP) / 3
    assert lesion_wise_scores(np.zeros(shape), np.zeros(shape)).lesion_dice == 1.0
    assert lesion_wise_scores(np.zeros(shape), np.zeros(shape)).lesion_hd95 == 0.0
    assert np.isnan(lesion_wise_scores(np.zeros(shape), np.zeros(shape)).sensitivity)
    single_pixel = np.zeros(shape, bool)
    single_pixel[5, 5] = True  # truth: a 1-pixel lesion, left out; prediction: a 1-pixel false positive
    flipped = lesion_wise_scores(single_pixel, single_pixel[::-1])
    assert (flipped.truth_lesions, flipped.false_positives, flipped.lesion_dice, flipped.lesion_hd95) == (0, 1, 0.0, 374.0)


def _cube(shape: tuple[int, int, int], corner: tuple[int, int, int], side: int) -> np.ndarray:
    volume = np.zeros(shape, bool)
    volume[tuple(slice(c, c + side) for c in corner)] = True
    return volume


def test_lesion_wise_scores_follow_brats_2023_on_hand_built_volumes() -> None:
    shape = (12, 20, 20)
    lesion = _cube(shape, (2, 2, 2), 3)  # 27 voxels
    false_positive = _cube(shape, (9, 15, 15), 1)  # 1 voxel, far from the lesion: counts whatever its size
    scores = lesion_wise_scores(lesion, lesion | false_positive)
    assert (scores.truth_lesions, scores.detected, scores.false_positives) == (1, 1, 1)
    assert scores.lesion_dice == 0.5 and scores.lesion_hd95 == 187.0  # (1 + 0) / 2 and (0 + 374) / 2

    tiny = _cube(shape, (5, 5, 5), 1) | _cube(shape, (5, 5, 6), 1)  # 2 voxels: left out of the score
    assert (lesion_wise_scores(tiny, np.zeros(shape)).lesion_dice, lesion_wise_scores(tiny, tiny).lesion_dice) == (1.0, 1.0)
    assert lesion_wise_scores(tiny, tiny).false_positives == 0  # its match is no false positive either
    in_mm = lesion_wise_scores(tiny, np.zeros(shape), spacing=(2.0, 1.0, 1.0))  # 4 mm^3: counted, missed
    assert (in_mm.truth_lesions, in_mm.detected, in_mm.lesion_dice, in_mm.lesion_hd95) == (1, 0, 0.0, 374.0)

    part = _cube(shape, (2, 2, 2), 3)
    part[3:] = False  # the prediction covers 9 of the lesion's 27 voxels
    partial = lesion_wise_scores(lesion, part)
    assert partial.lesion_dice == pytest.approx(2 * 9 / (27 + 9))


def test_lesion_fragments_count_once() -> None:
    truth = np.zeros((32, 32), bool)
    truth[10:20, 10:14] = True
    truth[10:20, 15:19] = True  # a one-pixel gap: the 1-pixel dilation joins the two fragments
    scores = lesion_wise_scores(truth, truth)
    assert (scores.truth_lesions, scores.detected, scores.false_positives, scores.lesion_dice) == (1, 1, 0, 1.0)
    shape = (5, 16, 16)
    two_voxel_gap = _cube(shape, (0, 2, 2), 3) | _cube(shape, (0, 2, 7), 3)  # dilations meet: one lesion
    three_voxel_gap = _cube(shape, (0, 2, 2), 3) | _cube(shape, (0, 2, 8), 3)  # they do not: two lesions
    assert lesion_wise_scores(two_voxel_gap, two_voxel_gap).truth_lesions == 1
    assert lesion_wise_scores(three_voxel_gap, three_voxel_gap).truth_lesions == 2


def test_slices_are_placed_by_their_number_so_a_gap_is_not_adjacency() -> None:
    truth = np.zeros((2, 16, 16), bool)
    truth[:, 4:8, 4:8] = True  # the same spot on slices 0 and 5 of one case (slices 1-4 are missing)
    pred = truth.copy()
    pred[1] = False
    rows = evaluate_masks(truth, pred, ["A", "A"], slice_indices=[0, 5]).per_patient.set_index("case_id")
    assert (rows.loc["A", "truth_lesions"], rows.loc["A", "detected_lesions"]) == (2, 1)
    adjacent = evaluate_masks(truth, pred, ["A", "A"], slice_indices=[0, 1]).per_patient.set_index("case_id")
    assert (adjacent.loc["A", "truth_lesions"], adjacent.loc["A", "detected_lesions"]) == (1, 1)
    volume = stack_slices(truth.astype(np.uint8), [7, 3])
    assert volume.shape == (5, 16, 16)  # slice 3 first, slice 7 last, 4-6 empty
    assert volume[0].any() and volume[4].any() and not volume[1:4].any()
    sparse = stack_slices(truth, [20200101, 0])  # numbered by date: the gap is capped, not 20 M slices
    assert sparse.shape == (MAX_GAP_SLICES + 2, 16, 16) and sparse[0].any() and sparse[-1].any()
    with pytest.raises(ValueError, match="same slice number"):
        stack_slices(truth, [2, 2], "A")


def test_per_patient_scores_are_3d_and_global_scores_pool_pixels() -> None:
    truth = np.zeros((5, 16, 16), bool)
    truth[1:4, 4:8, 4:8] = True  # one lesion spanning three slices of case A
    truth[4, 2:6, 2:6] = True  # case B
    pred = truth.copy()
    pred[4] = False
    case_ids = ["A", "A", "A", "A", "B"]
    result = evaluate_masks(truth, pred, case_ids, slice_indices=[3, 0, 1, 2, 0])
    assert list(result.per_image.columns[:4]) == ["case_id", "slice_index", "truth_pixels", "pred_pixels"]
    assert len(result.per_image) == 5
    rows = result.per_patient.set_index("case_id")
    assert rows.loc["A", "dice"] == 1.0 and rows.loc["A", "truth_lesions"] == 1
    assert rows.loc["B", "dice"] == 0.0 and rows.loc["B", "detected_lesions"] == 0
    assert result.global_scores["dice"] == pytest.approx(2 * 48 / (48 + 64))
    summary = result.summary()
    assert summary["per_patient"]["dice"]["mean"] == 0.5
    assert summary["global"] == result.global_scores


def test_bootstrap_ci_is_reproducible_and_brackets_the_mean() -> None:
    values = np.random.default_rng(0).normal(0.8, 0.1, size=40)
    low, high = bootstrap_ci(values, seed=3)
    assert low < values.mean() < high
    assert (low, high) == bootstrap_ci(values, seed=3)
    assert all(np.isnan(bootstrap_ci([0.5])))


def test_bootstrap_ci_of_the_median_resamples_the_median() -> None:
    # 27 good patients and three failures, which pull the mean down but not the median
    values = np.concatenate([np.random.default_rng(2).normal(0.85, 0.03, 27), [0.0, 0.02, 0.05]])
    low, high = bootstrap_ci(values, seed=1, statistic="median")
    resamples = values[np.random.default_rng(1).integers(0, len(values), size=(2000, len(values)))]
    assert (low, high) == tuple(np.percentile(np.median(resamples, axis=1), [2.5, 97.5]))
    assert low <= np.median(values) <= high
    mean_low, mean_high = bootstrap_ci(values, seed=1)
    assert high - low < (mean_high - mean_low) / 4 and mean_low < low
    with pytest.raises(ValueError, match="statistic"):
        bootstrap_ci(values, statistic="mode")
