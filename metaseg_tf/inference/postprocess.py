"""Post-processing of thresholded masks: removing predicted lesions below a size.

A lesion is a connected component of a mask: 8-connected within a 2D slice, 26-connected in 3D. The size limit
has one name everywhere, ``min_lesion_voxels`` (:class:`~metaseg_tf.config.ExperimentConfig`); on a slice given by
itself a voxel is a pixel.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from metaseg_tf.evaluation.scores import slice_offsets, stack_slices


def remove_small_components(mask: np.ndarray, min_voxels: int) -> tuple[np.ndarray, list[int]]:
    """Drop the components (8-connected in 2D, 26-connected in 3D) of ``mask`` below ``min_voxels``; return the
    mask, ``uint8`` of ``mask``'s shape, and the kept components' sizes."""
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(areas >= max(min_voxels, 1)) + 1
    return np.isin(labels, keep).astype(np.uint8), [int(areas[k - 1]) for k in keep]


def remove_small_lesions(masks: np.ndarray, case_ids: Sequence[str], slice_indices: Sequence[int],
                         min_voxels: int) -> np.ndarray:
    """Post-processing per case in 3D: the slices ``(N, H, W)`` of each case are placed by their slice numbers
    as the evaluation places them (:func:`~metaseg_tf.evaluation.scores.stack_slices`: a gap in the numbers is
    empty, so components never bridge it), components (26-connected) below ``min_voxels`` are dropped, and the
    masks come back in their input order, ``uint8 (N, H, W)``."""
    masks = np.asarray(masks).astype(np.uint8)
    if min_voxels <= 0 or len(masks) == 0:
        return masks
    case_ids, slice_indices = np.asarray(case_ids), np.asarray(slice_indices, int)
    kept = np.zeros_like(masks)
    for case in np.unique(case_ids):
        rows = np.flatnonzero(case_ids == case)
        volume = stack_slices(masks[rows], slice_indices[rows], str(case))
        kept[rows] = remove_small_components(volume, min_voxels)[0][slice_offsets(slice_indices[rows], str(case))]
    return kept
