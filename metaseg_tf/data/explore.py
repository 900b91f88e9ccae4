"""Exploratory statistics of a dataset and of its preprocessing (what the EDA and CLAHE notebooks show).

Lesion statistics are taken from the masks at their **native** resolution, before any resizing, and
lesions are 8-connected components of a slice's mask (scikit-image), so a count or an area here is what a
radiologist would count on that slice.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage import measure
from tqdm.auto import tqdm

from metaseg_tf.data.discover import DataError, SlicePair
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.preprocess import apply_clahe, window_to_uint8


def lesion_statistics(pairs: Sequence[SlicePair], progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-slice and per-lesion tables of ``pairs``' masks.

    Returns ``(slices, lesions)``: ``slices`` has one row per readable mask (``case_id``, ``slice_index``,
    ``height``, ``width``, ``lesion_pixels``, ``lesions``); ``lesions`` one row per connected component
    (``case_id``, ``slice_index``, ``area_px``, ``equivalent_diameter_px``). Unreadable masks are left out
    of both and listed in ``slices.attrs["skipped"]`` with the reason.
    """
    slice_rows, lesion_rows, skipped = [], [], {}
    for pair in tqdm(pairs, desc="lesion statistics", unit="mask", disable=not progress):
        try:
            mask = read_mask(pair.mask_path)
        except DataError as error:
            skipped[str(pair.mask_path)] = str(error)
            continue
        labels = measure.label(mask > 0, connectivity=2)
        regions = measure.regionprops(labels)
        slice_rows.append({"case_id": pair.case_id, "slice_index": pair.slice_index, "height": mask.shape[0],
                           "width": mask.shape[1], "lesion_pixels": int(np.count_nonzero(mask)),
                           "lesions": len(regions)})
        lesion_rows.extend({"case_id": pair.case_id, "slice_index": pair.slice_index, "area_px": int(r.area),
                            "equivalent_diameter_px": float(r.equivalent_diameter_area)} for r in regions)
    slices = pd.DataFrame(slice_rows, columns=["case_id", "slice_index", "height", "width", "lesion_pixels",
                                               "lesions"])
    slices.attrs["skipped"] = skipped
    lesions = pd.DataFrame(lesion_rows, columns=["case_id", "slice_index", "area_px", "equivalent_diameter_px"])
    return slices, lesions


def patient_table(slices: pd.DataFrame) -> pd.DataFrame:
    """One row per patient: slices, slices with lesion, lesion prevalence and total lesion pixels."""
    grouped = slices.assign(has_lesion=slices["lesion_pixels"] > 0).groupby("case_id")
    table = grouped.agg(slices=("slice_index", "size"), slices_with_lesion=("has_lesion", "sum"),
                        lesion_pixels=("lesion_pixels", "sum")).reset_index()
    table["prevalence"] = table["slices_with_lesion"] / table["slices"]
    return table


def channel_intensities(pairs: Sequence[SlicePair], channels: int = 3, sample: int = 64,
                        seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Intensities in ``[0, 1]`` of ``sample`` randomly chosen slices, split into brain-lesion and the rest.

    Returns ``(lesion, background)``, each ``(n_pixels, channels)`` float32; background excludes zero
    pixels (air outside the head), which would otherwise dominate every histogram.
    """
    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(pairs), size=min(sample, len(pairs)), replace=False)
    lesion, background = [], []
    for index in sorted(chosen):
        try:
            image, mask = read_image(pairs[index].image_path, channels), read_mask(pairs[index].mask_path)
        except DataError:
            continue
        if image.shape[:2] != mask.shape:
            continue
        inside = mask > 0
        lesion.append(image[inside])
        rest = image[~inside]
        background.append(rest[rest.max(axis=1) > 0])
    empty = np.empty((0, channels), np.float32)
    return (np.concatenate(lesion) if lesion else empty), (np.concatenate(background) if background else empty)


def clahe_variants(image: np.ndarray, clip_limits: Sequence[float], tile_grids: Sequence[int],
                   channel: int = 1) -> dict[tuple[float, int], np.ndarray]:
    """``channel`` of a float ``(H, W, C)`` slice after windowing and CLAHE with each clip limit and tile
    grid: ``{(clip_limit, tile_grid): uint8 (H, W)}``."""
    windowed = window_to_uint8(image)
    return {(clip, tiles): apply_clahe(windowed, clip, tiles)[..., channel]
            for clip in clip_limits for tiles in tile_grids}



def example_pairs(pairs: Sequence[SlicePair], slices: pd.DataFrame, n: int = 8) -> list[SlicePair]:
    """Up to ``n`` slices to look at, one per patient: each patient's slice with most lesion, the largest
    first (patients without any lesion come last)."""
    by_key = {(pair.case_id, pair.slice_index): pair for pair in pairs}
    ranked = slices.sort_values("lesion_pixels", ascending=False).drop_duplicates("case_id")
    return [by_key[(row.case_id, row.slice_index)] for row in ranked.head(n).itertuples()]


def slices_with_lesion(masks: np.ndarray, indices: np.ndarray, n: int) -> np.ndarray:
    """The first ``n`` of ``indices`` whose mask in ``masks`` ``(N, H, W)`` is not empty, largest lesion first."""
    indices = np.asarray(indices)
    areas = masks[indices].reshape(len(indices), -1).sum(axis=1)
    order = np.argsort(-areas, kind="stable")
    return indices[order[areas[order] > 0][:n]]
