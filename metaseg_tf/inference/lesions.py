"""The lesion report of a predicted case: every lesion of every region with its size, as a radiologist reads it.

A lesion is a connected component of one region's mask with full connectivity (26 neighbours in 3D), the
definition of the BraTS-MET 2023 lesion-wise evaluation (:func:`~metaseg_tf.evaluation.scores.lesion_wise_scores`).
Of each (:data:`LESION_COLUMNS`):

* ``voxels`` and ``volume_mm3`` (voxels x the voxel's volume);
* ``largest_axial_diameter_mm``: the longest in-plane distance across the lesion on any of its axial slices,
  the "longest diameter in the axial plane" of RECIST 1.1 (Eisenhauer et al. 2009) and RANO-BM (Lin et al.
  2015). Measured as the maximum Feret (caliper) diameter of the union of the lesion's pixels on the slice,
  i.e. the largest distance between two of their corners (``sqrt(2)`` pixel sides for a single pixel), with
  the in-plane spacing;
* ``centre_slice``: the axial slice of the lesion's centroid, ``first_slice`` / ``last_slice`` the axial slices it
  spans, counted from 0 in canonical orientation (inferior to superior), as the web app's slice slider counts.

Without a spacing (a stack of slice images) the millimetre columns are NaN and the sizes stand in voxels.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import ndimage
from scipy.spatial import ConvexHull, QhullError

LESION_COLUMNS = ("region", "lesion", "voxels", "volume_mm3", "largest_axial_diameter_mm", "centre_slice",
                  "first_slice", "last_slice")


def feret_diameter(mask: np.ndarray, spacing: tuple[float, float] = (1.0, 1.0)) -> float:
    """Maximum Feret diameter of the pixels of a 2D ``bool (H, W)`` mask: the largest distance between two
    corners of its pixels, in the units of ``spacing`` (row, column). 0 for an empty mask."""
    rows, cols = np.nonzero(mask)
    if rows.size == 0:
        return 0.0
    corners = np.concatenate([np.stack([rows + dr, cols + dc], axis=1) for dr in (0, 1) for dc in (0, 1)])
    corners = np.unique(corners, axis=0) * np.asarray(spacing, np.float64)
    try:
        corners = corners[ConvexHull(corners).vertices]
    except QhullError:  # all corners on one line (a row or a column of pixels)
        pass
    differences = corners[:, None, :] - corners[None, :, :]
    return float(np.sqrt((differences**2).sum(-1)).max())


def lesion_table(masks: np.ndarray, names: Sequence[str],
                 spacing: tuple[float, float, float] | None = None) -> pd.DataFrame:
    """One row per lesion (:data:`LESION_COLUMNS`) of ``masks`` ``(Z, H, W, R)`` (one binary channel per region
    of ``names``); ``spacing``: mm per axis ``(z, y, x)``, None if unknown. Lesions are numbered per region from 1,
    largest first."""
    if masks.ndim != 4 or masks.shape[-1] != len(names):
        raise ValueError(f"masks of shape {masks.shape} for regions {list(names)}: expected (Z, H, W, {len(names)})")
    voxel_mm3 = float(np.prod(spacing)) if spacing is not None else float("nan")
    in_plane = (spacing[1], spacing[2]) if spacing is not None else (1.0, 1.0)
    rows = []
    for channel, region in enumerate(names):
        components, count = ndimage.label(masks[..., channel] > 0, structure=np.ones((3, 3, 3), bool))
        found = []
        for number, box in enumerate(ndimage.find_objects(components), start=1):
            lesion = components[box] == number
            voxels = int(lesion.sum())
            z = np.nonzero(lesion.any(axis=(1, 2)))[0]
            centre = float(np.nonzero(lesion)[0].mean()) + box[0].start
            diameter = max(feret_diameter(lesion[k], in_plane) for k in z)
            found.append({"region": region, "voxels": voxels, "volume_mm3": voxels * voxel_mm3,
                          "largest_axial_diameter_mm": diameter if spacing is not None else float("nan"),
                          "centre_slice": int(np.floor(centre + 0.5)), "first_slice": int(z[0] + box[0].start),
                          "last_slice": int(z[-1] + box[0].start)})
        found.sort(key=lambda row: -row["voxels"])
        rows += [{**row, "lesion": k} for k, row in enumerate(found, start=1)]
    return pd.DataFrame(rows, columns=list(LESION_COLUMNS))


def lesion_counts(table: pd.DataFrame, names: Sequence[str]) -> dict[str, float]:
    """Per region of ``names``: ``<region>_lesions`` (count), ``<region>_lesion_volume_mm3`` (their sum) and
    ``<region>_largest_lesion_diameter_mm`` (0 where there is no lesion), for a case's row of predictions.csv."""
    summary: dict[str, float] = {}
    for region in names:
        own = table[table["region"] == region]
        summary[f"{region}_lesions"] = len(own)
        summary[f"{region}_lesion_volume_mm3"] = float(own["volume_mm3"].sum(min_count=1)) if len(own) else 0.0
        summary[f"{region}_largest_lesion_diameter_mm"] = (float(own["largest_axial_diameter_mm"].max())
                                                           if len(own) else 0.0)
    return summary


def lesion_table_text(table: pd.DataFrame, rows: int = 20) -> str:
    """A lesion report (``lesions.csv``: a ``case_id`` column and :data:`LESION_COLUMNS`) as text for a terminal:
    each case's ``rows`` largest lesions, sizes to 0.1."""
    if table.empty:
        return "lesions: none predicted"
    shown = table.sort_values(["case_id", "voxels"], ascending=[True, False]).groupby("case_id").head(rows)
    return (f"lesions ({len(table)} in {table['case_id'].nunique()} case(s); the {rows} largest per case shown):\n"
            + shown.to_string(index=False, float_format=lambda value: f"{value:.1f}"))
