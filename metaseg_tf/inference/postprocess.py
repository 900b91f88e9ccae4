"""Post-processing of thresholded masks: which predicted lesions to keep.

A lesion is a connected component of a mask: 8-connected within a 2D slice, 26-connected in 3D. Two settings
of :class:`~metaseg_tf.config.ExperimentConfig`, one name each everywhere:

* ``min_lesion_voxels``: lesions below this size are dropped (on a slice given by itself a voxel is a pixel);
* ``keep_lesions`` (:data:`KEEP_LESIONS`): ``all`` of those left; ``largest``, the largest one alone (the 3D
  largest-connected-component filter of Buda et al., "Association of genomic subtypes of lower-grade gliomas
  with shape features automatically extracted by a deep learning algorithm", Comput. Biol. Med. 2019, their
  PyTorch repository's post-processing); or ``persistent``, the lesions that span at least two neighbouring
  slices (a one-slice component in a stack of 2D predictions is most often a false positive; a slice given by
  itself, or the only slice of its case, has no neighbours, so there it keeps every lesion).

With several regions (``target="multilabel"``: WT, TC, ET) each region is selected on its own; a label map
made from the nested regions afterwards (:meth:`~metaseg_tf.data.targets.Target.to_labels`) can bring an inner
region's lesion back into WT where WT's selection dropped it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage

from metaseg_tf.config import KEEP_LESIONS
from metaseg_tf.evaluation.scores import slice_offsets, stack_slices


def select_components(mask: np.ndarray, min_voxels: int, keep: str = "all") -> tuple[np.ndarray, list[int]]:
    """The components (8-connected in 2D, 26-connected in 3D, slices along axis 0) of ``mask`` of at least
    ``min_voxels`` that ``keep`` (:data:`KEEP_LESIONS`) keeps; return the mask, ``uint8`` of ``mask``'s shape,
    and the kept components' sizes, in label order."""
    if keep not in KEEP_LESIONS:
        raise ValueError(f"keep must be one of {', '.join(KEEP_LESIONS)}, got {keep!r}")
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    kept = areas >= max(min_voxels, 1)
    if keep == "persistent" and mask.ndim == 3 and mask.shape[0] > 1:
        kept &= np.array([box[0].stop - box[0].start >= 2 for box in ndimage.find_objects(labels)], bool)
    if keep == "largest" and kept.any():
        kept = np.arange(count) == np.argmax(np.where(kept, areas, -1))
    labels_kept = np.flatnonzero(kept) + 1
    return np.isin(labels, labels_kept).astype(np.uint8), [int(areas[k - 1]) for k in labels_kept]


def select_lesions(masks: np.ndarray, case_ids: Sequence[str], slice_indices: Sequence[int], min_voxels: int,
                   keep: str = "all") -> np.ndarray:
    """Post-processing per case in 3D: the slices ``(N, H, W)`` of each case are placed by their slice numbers
    as the evaluation places them (:func:`~metaseg_tf.evaluation.scores.stack_slices`: a gap in the numbers is
    empty, so components never bridge it), the lesions :func:`select_components` keeps are kept, and the masks
    come back in their input order, ``uint8 (N, H, W)``."""
    masks = np.asarray(masks).astype(np.uint8)
    if (min_voxels <= 0 and keep == "all") or len(masks) == 0:
        return masks
    case_ids, slice_indices = np.asarray(case_ids), np.asarray(slice_indices, int)
    kept = np.zeros_like(masks)
    for case in np.unique(case_ids):
        rows = np.flatnonzero(case_ids == case)
        volume = stack_slices(masks[rows], slice_indices[rows], str(case))
        kept[rows] = select_components(volume, min_voxels, keep)[0][slice_offsets(slice_indices[rows], str(case))]
    return kept
