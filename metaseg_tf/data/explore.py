"""Exploratory statistics of a dataset and of its preprocessing (what the EDA and CLAHE notebooks show).

Lesion statistics are taken from the masks at their **native** resolution, before any resizing, and
lesions are 8-connected components of a slice's mask (scikit-image), so a count or an area here is what a
radiologist would count on that slice. For volume layouts (:func:`volume_statistics`) lesions are
26-connected components of each region in 3D, with volumes in mm^3 where the voxel spacing is known.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd
from skimage import measure
from tqdm.auto import tqdm

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.discover import DataError, DiscoveryReport, SlicePair
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.preprocess import apply_clahe, window_to_uint8
from metaseg_tf.data.targets import resolve_target
from metaseg_tf.data.volumes import canonical_spacing, CaseFiles, read_case, read_case_labels, resolve_sequences, VolumeReport


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
    """``channel`` of a slice after CLAHE with each clip limit and tile grid: ``{(clip_limit, tile_grid):
    uint8 (H, W)}``. ``image``: a windowed ``uint8 (H, W, C)`` slice, or a float one in ``[0, 1]`` that is
    windowed per slice first."""
    windowed = image if image.dtype == np.uint8 else window_to_uint8(image)
    return {(clip, tiles): apply_clahe(windowed, clip, tiles)[..., channel]
            for clip in clip_limits for tiles in tile_grids}



def example_slice(report: DiscoveryReport | VolumeReport, config: ExperimentConfig, progress: bool = True
                  ) -> tuple[str, np.ndarray]:
    """One slice to show preprocessing on, windowed as training windows it (``uint8 (H, W, C)``): of a volume
    layout the first case's axial slice with most of the config's target region (volume window), of a 2D
    layout the slice with most lesion (per-slice window); and its title."""
    if isinstance(report, VolumeReport):
        region = config.target if config.target in ("wt", "tc", "et") else "wt"
        sequences = resolve_sequences(config.sequences, config.channels)
        case_id, z, image, _ = volume_examples(report, sequences, 1, config.fill_missing, region)[0]
        return f"{case_id} axial slice {z} ({', '.join(sequences)})", np.round(image * 255).astype(np.uint8)
    slices, _ = lesion_statistics(report.pairs, progress=progress)
    pair = example_pairs(report.pairs, slices, n=1)[0]
    return f"{pair.case_id} slice {pair.slice_index}", window_to_uint8(read_image(pair.image_path, config.channels))


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


def volume_statistics(report: VolumeReport, sequences: Sequence[str], progress: bool = True
                      ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-case and per-lesion tables of a volume layout's labelled cases, in 3D.

    ``cases``: ``case_id``, ``shape`` (canonical ``Z x H x W``), ``spacing_mm``, the sequences present, the
    voxels of every label, and per region of the dataset's convention its volume (mm^3, or voxels where the
    spacing is unknown), lesion count and axial slices with lesion. ``lesions``: one row per 26-connected component of each region
    (``case_id``, ``region``, ``volume``, ``equivalent_diameter``: the diameter of a sphere of that volume).
    Cases that cannot be read are listed in ``cases.attrs["skipped"]`` with the reason.
    """
    target = resolve_target("multilabel", report.convention) if report.convention != "binary" \
        else resolve_target("any", report.convention)
    case_rows, lesion_rows, skipped = [], [], {}
    for case in tqdm(report.labelled_cases, desc="volume statistics", unit="case", disable=not progress):
        try:
            labels = read_case_labels(case)
            spacing = _spacing(case)
        except DataError as error:
            skipped[case.case_id] = str(error)
            continue
        voxel = float(np.prod(spacing)) if spacing else 1.0
        row = {"case_id": case.case_id, "shape": "x".join(map(str, labels.shape)),
               "spacing_mm": "x".join(f"{s:.2f}" for s in spacing) if spacing else "unknown",
               "sequences": " ".join(name for name in sequences if name in case.sequences) or "none"}
        values, counts = np.unique(labels, return_counts=True)
        row.update({f"label_{int(v)}_voxels": int(c) for v, c in zip(values, counts) if v})
        for region, masks in zip(target.names, np.moveaxis(target.masks(labels), -1, 0)):
            components = measure.label(masks, connectivity=3)
            sizes = np.bincount(components.ravel())[1:]
            row[f"{region}_volume"] = float(masks.sum() * voxel)
            row[f"{region}_lesions"] = len(sizes)
            row[f"{region}_slices"] = int(masks.reshape(len(masks), -1).any(axis=1).sum())  # axial slices with it
            lesion_rows += [{"case_id": case.case_id, "region": region, "volume": float(size * voxel),
                             "equivalent_diameter": float((6 * size * voxel / np.pi) ** (1 / 3))} for size in sizes]
        case_rows.append(row)
    cases = pd.DataFrame(case_rows).fillna(0)
    cases.attrs["skipped"] = skipped
    cases.attrs["unit"] = "mm" if all(r["spacing_mm"] != "unknown" for r in case_rows) else "voxels"
    return cases, pd.DataFrame(lesion_rows, columns=["case_id", "region", "volume", "equivalent_diameter"])


def _spacing(case: CaseFiles) -> tuple[float, float, float] | None:
    """The case's voxel size in mm along the canonical axes, from its first sequence's header (None for slice
    images, whose spacing is unknown)."""
    import nibabel as nib

    source = next(iter(case.sequences.values()))
    if source.slice_files:
        return None
    try:
        return canonical_spacing(nib.load(str(source.path)).affine)
    except Exception as error:  # nibabel raises several types for headers it cannot parse
        raise DataError(f"cannot read the header of {source.path}: {error}") from error


def volume_examples(report: VolumeReport, sequences: Sequence[str], n: int = 3, fill_missing: str = "skip",
                    region: str = "tc") -> list[tuple[str, int, np.ndarray, np.ndarray]]:
    """Up to ``n`` labelled, readable cases to look at: of each, the axial slice with most ``region`` (in the
    dataset's convention), as ``(case_id, slice, images float32 (H, W, sequences) windowed, labels uint8 (H, W))``."""
    target = resolve_target(region, report.convention)
    examples = []
    for case in report.select(tuple(sequences), fill_missing).labelled_cases:
        if len(examples) == n:
            break
        try:
            volume = read_case(case, tuple(sequences), fill_missing)
        except DataError:  # listed by the data summary; an example is taken from the next case
            continue
        area = target.masks(volume.labels)[..., 0].reshape(len(volume.labels), -1).sum(axis=1)
        if not area.any():
            area = (volume.labels > 0).reshape(len(volume.labels), -1).sum(axis=1)
        z = int(np.argmax(area))
        examples.append((case.case_id, z, volume.images[z], volume.labels[z]))
    return examples
