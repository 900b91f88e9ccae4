"""Evaluation of binary lesion masks with NumPy/SciPy: per image, per patient (3D) and global.

Conventions (explicit, and tested):

* **Overlap scores** (Dice = F1, IoU, precision, recall, specificity) come from pixel counts. When truth and
  prediction are both empty, Dice, IoU, precision and recall are 1 (perfect agreement on "no lesion");
  any other zero denominator gives 0 (e.g. precision of an empty prediction on a lesion slice). Specificity
  with no true-negative pixel at all is 1.
* **HD95** is the larger of the two directed 95th-percentile surface distances (the BraTS and MONAI
  convention; medpy pools both directions instead), computed as the BraTS 2023 scripts do: surface elements
  on the voxel-corner grid weighted by their area (:mod:`metaseg_tf.evaluation.surfaces`), in pixel units
  scaled by ``spacing``. Both empty: 0. Exactly one empty: 374, BraTS's convention (mm: the diagonal of its
  240 x 240 x 155 mm volume; the same number in pixels where the spacing is unknown).
* **Lesion-wise** scores follow the BraTS 2023 metastasis challenge exactly (:func:`lesion_wise_scores`
  gives the definition): 26-connected components, truth merged by a 1-iteration dilation with
  ``generate_binary_structure(3, 2)``, truth lesions of at most 2 voxels (or 2 mm^3 with spacing) left
  out, every unmatched predicted component a false positive whatever its size, misses and false positives
  scoring Dice 0 and HD95 374; both empty: lesion-wise Dice 1 and HD95 0. Lesion sensitivity is undefined
  (NaN, left out of means) for a case without a counted truth lesion.
* **Per patient** places a case's slices at their slice numbers in a volume and scores it in 3D, so a
  lesion spanning several slices is one lesion, and slices on either side of a missing one are not
  neighbours. **Global** pools every pixel of the split.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import pandas as pd
from scipy import ndimage

from metaseg_tf.evaluation.surfaces import percentile_hausdorff

OVERLAP_SCORES = ("dice", "iou", "precision", "recall", "specificity")
# the per-patient scores summarised (mean, sd, bootstrap CI) in an evaluation's summary.json
SUMMARY_SCORES = ("dice", "iou", "precision", "recall", "specificity", "hd95", "lesion_sensitivity",
                  "lesion_dice", "lesion_hd95", "false_positive_lesions")


@dataclass(frozen=True)
class ConfusionCounts:
    """Pixel counts of a binary prediction against a binary truth."""

    true_pos: int
    false_pos: int
    false_neg: int
    true_neg: int

    @classmethod
    def from_masks(cls, truth: np.ndarray, pred: np.ndarray) -> ConfusionCounts:
        truth, pred = _binary_pair(truth, pred)
        true_pos = int(np.count_nonzero(truth & pred))
        false_pos = int(np.count_nonzero(pred)) - true_pos
        false_neg = int(np.count_nonzero(truth)) - true_pos
        return cls(true_pos, false_pos, false_neg, truth.size - true_pos - false_pos - false_neg)

    def __add__(self, other: ConfusionCounts) -> ConfusionCounts:
        return ConfusionCounts(*(a + b for a, b in zip(asdict(self).values(), asdict(other).values())))

    def scores(self) -> dict[str, float]:
        """Dice, IoU, precision, recall and specificity with the module's empty-mask conventions."""
        tp, fp, fn, tn = self.true_pos, self.false_pos, self.false_neg, self.true_neg
        both_empty = tp + fp + fn == 0

        def ratio(numerator: float, denominator: float, when_empty: float = 1.0) -> float:
            if both_empty:
                return when_empty
            return numerator / denominator if denominator else 0.0

        return {
            "dice": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn),
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "specificity": tn / (tn + fp) if tn + fp else 1.0,
        }


def _binary_pair(truth: np.ndarray, pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    truth, pred = np.asarray(truth) > 0, np.asarray(pred) > 0
    if truth.shape != pred.shape:
        raise ValueError(f"truth {truth.shape} and prediction {pred.shape} differ in shape")
    return truth, pred


def overlap_scores(truth: np.ndarray, pred: np.ndarray) -> dict[str, float]:
    """:meth:`ConfusionCounts.scores` of two binary arrays of equal shape (any dimension)."""
    return ConfusionCounts.from_masks(truth, pred).scores()


# BraTS 2023 lesion-wise parameters of the metastasis challenge (BraTS-MET)
BRATS_MET_DILATION = 1  # iterations of the dilation that merges nearby truth fragments
BRATS_MET_MIN_VOLUME = 2.0  # truth lesions of at most this volume (voxels, or mm^3 with spacing) are left out
BRATS_MISS_DISTANCE = 374.0  # HD95 of a missed lesion, a false positive or an empty mask (mm; BraTS's diagonal)


def hausdorff_distance(
    truth: np.ndarray, pred: np.ndarray, percentile: float = 95.0, spacing: Sequence[float] | None = None,
    empty_distance: float = BRATS_MISS_DISTANCE,
) -> float:
    """Symmetric percentile Hausdorff distance between the surfaces of two binary masks (2D or 3D).

    ``max(P_q(truth -> pred), P_q(pred -> truth))`` with ``q = percentile`` over surface elements weighted
    by their area (:func:`~metaseg_tf.evaluation.surfaces.percentile_hausdorff`, the definition of the BraTS
    2023 evaluation), distances scaled by ``spacing`` (default 1 per axis). ``percentile=100`` gives the
    Hausdorff distance between the surfaces. Both masks empty: 0; exactly one: ``empty_distance`` (BraTS:
    374).
    """
    truth, pred = _binary_pair(truth, pred)
    if not truth.any() and not pred.any():
        return 0.0
    if not truth.any() or not pred.any():
        return float(empty_distance)
    return percentile_hausdorff(truth, pred, percentile, spacing)


@dataclass(frozen=True)
class LesionWiseScores:
    """Lesion-level detection and segmentation scores of one case (see :func:`lesion_wise_scores`)."""

    truth_lesions: int
    detected: int
    false_positives: int
    lesion_dice: float
    lesion_hd95: float

    @property
    def sensitivity(self) -> float:
        return self.detected / self.truth_lesions if self.truth_lesions else float("nan")


def lesion_wise_scores(
    truth: np.ndarray,
    pred: np.ndarray,
    dilation: int = BRATS_MET_DILATION,
    min_volume: float = BRATS_MET_MIN_VOLUME,
    spacing: Sequence[float] | None = None,
    miss_distance: float = BRATS_MISS_DISTANCE,
) -> LesionWiseScores:
    """Lesion-wise Dice and HD95 of one case as the BraTS 2023 metastasis challenge defines them.

    Definition (BraTS-2023-Metrics, BraTS-MET parameters; implemented from its description):

    1. Truth and prediction are split into connected components with full connectivity (26 neighbours in 3D,
       8 in 2D). The truth is dilated ``dilation`` times with ``generate_binary_structure(ndim, 2)`` (18
       neighbours in 3D); truth components that fall into one dilated blob are merged into one lesion.
    2. A truth lesion's match is every predicted component that touches the lesion dilated the same way; its
       Dice and HD95 are taken against the union of those components. A lesion with no match scores Dice 0
       and HD95 ``miss_distance`` (374).
    3. Truth lesions whose volume is at most ``min_volume`` (voxels; mm^3 when ``spacing`` is given) are left
       out of numerator and denominator; predicted components touching them are not false positives.
    4. Every predicted component that touches no (dilated) truth lesion is a false positive, whatever its
       size, scoring Dice 0 and HD95 ``miss_distance``.
    5. Lesion-wise score = sum over counted truth lesions / (counted truth lesions + false positives). No
       counted truth lesion and no false positive (e.g. both empty): Dice 1, HD95 0.

    ``truth`` and ``pred`` are binary arrays of one shape (a 3D case ``(slices, H, W)``, or 2D); ``spacing``
    is the voxel size per axis (default 1: volumes in voxels, distances in voxels). ``detected`` counts the
    counted truth lesions with a match; ``sensitivity`` is ``detected / truth_lesions`` (NaN with none).
    """
    truth, pred = _binary_pair(truth, pred)
    spacing = tuple(spacing) if spacing is not None else (1.0,) * truth.ndim
    voxel_volume = float(np.prod(spacing))
    components = ndimage.generate_binary_structure(truth.ndim, truth.ndim)
    dilation_structure = ndimage.generate_binary_structure(truth.ndim, 2)

    def dilate(mask: np.ndarray) -> np.ndarray:
        return ndimage.binary_dilation(mask, dilation_structure, iterations=dilation) if dilation else mask

    blobs, n_blobs = ndimage.label(dilate(truth), components)
    pred_labels, n_pred = ndimage.label(pred, components)
    matched = np.zeros(n_pred + 1, bool)
    dice_sum, hd_sum, counted, detected = 0.0, 0.0, 0, 0
    for blob in range(1, n_blobs + 1):
        lesion = truth & (blobs == blob)  # the truth fragments merged by this dilated blob
        touching = np.unique(pred_labels[dilate(lesion)])
        touching = touching[touching > 0]
        matched[touching] = True
        if np.count_nonzero(lesion) * voxel_volume <= min_volume:
            continue
        counted += 1
        if touching.size:
            detected += 1
            found = np.isin(pred_labels, touching)
            dice_sum += ConfusionCounts.from_masks(lesion, found).scores()["dice"]
            hd_sum += hausdorff_distance(lesion, found, 95.0, spacing)
        else:
            hd_sum += miss_distance
    false_positives = int(np.count_nonzero(~matched[1:]))
    denominator = counted + false_positives
    if denominator == 0:
        return LesionWiseScores(0, 0, 0, 1.0, 0.0)
    return LesionWiseScores(counted, detected, false_positives, dice_sum / denominator,
                            (hd_sum + miss_distance * false_positives) / denominator)


@dataclass
class Evaluation:
    """Scores of a set of slices: one row per image, one row per patient, and pooled-pixel global scores."""

    per_image: pd.DataFrame
    per_patient: pd.DataFrame
    global_scores: dict[str, float]

    def summary(self) -> dict[str, dict]:
        """``per_patient``: for each of :data:`SUMMARY_SCORES` the mean, sample sd, 95 % bootstrap CI of the
        mean (:func:`bootstrap_ci`) and ``n`` over patients, NaNs (an undefined score) left out; ``global``:
        the pooled-pixel scores."""
        per_patient = {}
        for score in SUMMARY_SCORES:
            values = self.per_patient[score].to_numpy(float)
            values = values[~np.isnan(values)]
            per_patient[score] = {"mean": float(values.mean()) if len(values) else float("nan"),
                                  "sd": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
                                  "ci95": list(bootstrap_ci(values)), "n": len(values)}
        return {"per_patient": per_patient, "global": self.global_scores}


def dice_per_case(truth: np.ndarray, pred: np.ndarray, case_ids: Sequence[str]) -> dict[str, float]:
    """Dice of each case over all its slices together (3D) of binary ``(N, H, W)`` masks, slice ``k``
    belonging to ``case_ids[k]``; cases in sorted order; 1.0 where both are empty (module conventions)."""
    case_ids = np.asarray(case_ids)
    return {str(case): overlap_scores(truth[case_ids == case], pred[case_ids == case])["dice"]
            for case in np.unique(case_ids)}


MAX_GAP_SLICES = 8  # wider gaps in a case's slice numbering are stored as this many empty slices


def stack_slices(masks: np.ndarray, slice_indices: Sequence[int], case: str = "") -> np.ndarray:
    """A case's slices ``(n, H, W)`` placed at their slice numbers in a volume ``(last - first + 1, H, W)``;
    missing slice numbers stay empty, so slices on either side of a gap are not neighbours. A gap wider than
    :data:`MAX_GAP_SLICES` (sparse numbering, e.g. dates) is stored as that many empty slices: as far apart
    for the lesion-wise scores, and the volume stays small. Two slices with one number raise ``ValueError``."""
    offsets = slice_offsets(slice_indices, case)
    volume = np.zeros((int(offsets.max()) + 1, *masks.shape[1:]), masks.dtype)
    volume[offsets] = masks
    return volume


def slice_offsets(slice_indices: Sequence[int], case: str = "") -> np.ndarray:
    """Where :func:`stack_slices` puts each slice of a case in its volume: ``volume[offsets] = masks`` and
    ``volume[offsets]`` gives the slices back in their input order."""
    positions = np.asarray(slice_indices, int)
    if len(np.unique(positions)) != len(positions):
        raise ValueError(f"case {case!r} has several slices with the same slice number")
    order = np.argsort(positions)
    steps = np.minimum(np.diff(positions[order]), MAX_GAP_SLICES + 1)
    offsets = np.empty_like(positions)
    offsets[order] = np.concatenate([[0], np.cumsum(steps)])
    return offsets


def evaluate_masks(
    truth: np.ndarray,
    pred: np.ndarray,
    case_ids: Sequence[str],
    slice_indices: Sequence[int] | None = None,
    spacing: Sequence[float] | Mapping[str, Sequence[float] | None] | None = None,
) -> Evaluation:
    """Score binary predictions ``pred`` against ``truth``, both ``(N, H, W)``, slice ``k`` of case
    ``case_ids[k]`` at slice number ``slice_indices[k]`` (default: the given order). Per patient, the slices
    are placed by their numbers (:func:`stack_slices`): a gap in the numbering is a gap in the volume.

    ``spacing`` is the voxel size ``(slice, row, column)`` in mm used for HD95 and the lesion-wise scores,
    one for all cases or a mapping case id -> spacing (None, the default: 1 each, distances in pixels and
    volumes in voxels).
    """
    truth, pred = _binary_pair(truth, pred)
    if truth.ndim != 3 or len(case_ids) != len(truth):
        raise ValueError(f"expected (N, H, W) masks and N case ids, got {truth.shape} and {len(case_ids)}")
    case_ids = np.asarray(case_ids)
    slice_indices = np.arange(len(truth)) if slice_indices is None else np.asarray(slice_indices)

    def case_spacing(case: str) -> Sequence[float] | None:
        return spacing.get(str(case)) if isinstance(spacing, Mapping) else spacing

    image_rows = []
    for k in range(len(truth)):
        counts = ConfusionCounts.from_masks(truth[k], pred[k])
        image_rows.append({
            "case_id": case_ids[k], "slice_index": int(slice_indices[k]),
            "truth_pixels": counts.true_pos + counts.false_neg, "pred_pixels": counts.true_pos + counts.false_pos,
            **counts.scores(), "hd95": hausdorff_distance(truth[k], pred[k], 95.0, None if case_spacing(case_ids[k])
                                                          is None else case_spacing(case_ids[k])[1:]),
        })

    patient_rows = []
    for case in dict.fromkeys(case_ids):
        members = np.flatnonzero(case_ids == case)
        volume_truth = stack_slices(truth[members], slice_indices[members], str(case))
        volume_pred = stack_slices(pred[members], slice_indices[members], str(case))
        lesions = lesion_wise_scores(volume_truth, volume_pred, spacing=case_spacing(case))
        patient_rows.append({
            "case_id": case, "slices": len(members),
            "truth_voxels": int(volume_truth.sum()), "pred_voxels": int(volume_pred.sum()),
            **overlap_scores(volume_truth, volume_pred),
            "hd95": hausdorff_distance(volume_truth, volume_pred, 95.0, case_spacing(case)),
            "truth_lesions": lesions.truth_lesions, "detected_lesions": lesions.detected,
            "false_positive_lesions": lesions.false_positives, "lesion_sensitivity": lesions.sensitivity,
            "lesion_dice": lesions.lesion_dice, "lesion_hd95": lesions.lesion_hd95,
        })

    pooled = ConfusionCounts.from_masks(truth, pred)
    return Evaluation(pd.DataFrame(image_rows), pd.DataFrame(patient_rows), pooled.scores())


BOOTSTRAP_STATISTICS = ("mean", "median")


def bootstrap_ci(
    values: Sequence[float], confidence: float = 0.95, n_resamples: int = 2000, seed: int = 0,
    statistic: str = "mean",
) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (or, with ``statistic="median"``, the median) of
    ``values`` (NaNs dropped).

    Resamples with replacement ``n_resamples`` times from a seeded generator, so the interval is
    reproducible; returns ``(nan, nan)`` for fewer than two values.
    """
    if statistic not in BOOTSTRAP_STATISTICS:
        raise ValueError(f"statistic must be one of {BOOTSTRAP_STATISTICS}, got {statistic!r}")
    values = np.asarray(values, float)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    resamples = values[rng.integers(0, len(values), size=(n_resamples, len(values)))]
    estimates = np.median(resamples, axis=1) if statistic == "median" else resamples.mean(axis=1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(estimates, [tail, 100 - tail])
    return float(low), float(high)
