"""2.5D context: a slice's neighbours along the slice axis as extra input channels.

With ``context_slices = k`` the model reads, for every slice, the ``2k + 1`` slices ``-k .. +k`` around it
of the same case, each with all its channels (sequences). Neighbours are taken by slice number order within
the case (the next numbered slice of a kaggle_3m case, the next axial slice of a volume) and clamped at the
case's first and last slice (the end slice is repeated). The channel layout is offset-major:
``x[..., j * C + c]`` is channel ``c`` of the slice at offset ``j - k``, so the centre slice's channels are
the middle block and ``k = 0`` is the plain slice.

Reference: the 2.5D input of e.g. Isensee et al. 2021 (nnU-Net, "2D" with neighbouring slices) and of
Buda et al. 2019, who fed neighbouring FLAIR slices of the LGG set as channels.
"""

from __future__ import annotations

import numpy as np


def context_rows(case_ids: np.ndarray, slice_indices: np.ndarray, context_slices: int) -> np.ndarray:
    """``(N, 2k + 1)`` row numbers: for each slice ``i`` (rows of one case need not be contiguous), the rows
    of the slices at offsets ``-k .. k`` in its case's slice order, clamped at the case's ends."""
    case_ids, slice_indices = np.asarray(case_ids), np.asarray(slice_indices)
    offsets = np.arange(-context_slices, context_slices + 1)
    rows = np.empty((len(case_ids), len(offsets)), np.int64)
    for case in np.unique(case_ids):
        members = np.flatnonzero(case_ids == case)
        ordered = members[np.argsort(slice_indices[members], kind="stable")]
        position = np.arange(len(ordered))
        neighbours = np.clip(position[:, None] + offsets[None, :], 0, len(ordered) - 1)
        rows[ordered] = ordered[neighbours]
    return rows


def stack_context(images: np.ndarray, rows: np.ndarray) -> np.ndarray:
    """``images (N, H, W, C)`` and ``rows (M, 2k + 1)`` -> ``(M, H, W, (2k + 1) * C)``, offset-major."""
    gathered = images[rows]  # (M, 2k + 1, H, W, C)
    return np.ascontiguousarray(np.moveaxis(gathered, 1, 3).reshape(*gathered.shape[:1], *images.shape[1:3], -1))


def volume_context(slices: np.ndarray, context_slices: int) -> np.ndarray:
    """The slices ``(Z, H, W, C)`` of one volume, each with its neighbours: ``(Z, H, W, (2k + 1) * C)``."""
    if context_slices == 0:
        return slices
    rows = context_rows(np.zeros(len(slices)), np.arange(len(slices)), context_slices)
    return stack_context(slices, rows)
