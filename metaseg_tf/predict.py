"""Prediction with a trained run: a slice array, an image file, a folder of images, or a NIfTI volume.

This module owns model loading (:func:`load_model`, :func:`predict_probabilities`): evaluation, the
notebooks and the web app load and run models through it, so inference does not pull in the reporting code.

Each slice goes through the run's own preprocessing (window, CLAHE, resize, normalisation), the model
(optionally with horizontal-flip test-time augmentation: the mean of the image's and its mirror's
probabilities), back to the slice's original size (bilinear), is thresholded, and loses connected
components smaller than ``min_component_pixels``. Written outputs per slice: ``<stem>_mask.png`` (0/255),
``<stem>_probability.png`` (0-255) and ``<stem>_overlay.png``; for a NIfTI volume ``<stem>_mask.nii.gz`` and
``<stem>_probability.nii.gz`` with the input's affine and header, so they overlay in any NIfTI viewer.

NIfTI volumes are cut along their axial axis, found from the affine (the voxel axis that points
superior/inferior, ``nibabel.aff2axcodes``). Intensities are scaled to ``[0, 1]`` between the volume's
0.5th and 99.5th percentiles; one volume fills every input channel, or several co-registered volumes
(e.g. pre-contrast, FLAIR, post-contrast for a model trained on kaggle_3m) fill one channel each.

Unreadable files in a folder are skipped, counted and listed with the reason in ``predictions.csv``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.discover import IMAGE_EXTENSIONS, MASK_SUFFIX, DataError
from metaseg_tf.data.io import read_image, to_channels
from metaseg_tf.data.preprocess import normalise, preprocess_slice
from metaseg_tf.paths import resolve
from metaseg_tf.training.runs import load_run_config, new_dir, run_model_path

logger = logging.getLogger(__name__)
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


@dataclass
class SlicePrediction:
    """Probability ``float32 (H, W)`` and mask ``uint8 (H, W)`` in {0, 1} at the input's size, and the
    lesions (connected components of the mask) with their areas in pixels."""

    probability: np.ndarray
    mask: np.ndarray
    lesion_areas: list[int] = field(default_factory=list)

    @property
    def lesion_count(self) -> int:
        return len(self.lesion_areas)


def remove_small_components(mask: np.ndarray, min_pixels: int) -> tuple[np.ndarray, list[int]]:
    """Drop 8-connected components below ``min_pixels``; return the mask and the kept components' areas."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(areas >= max(min_pixels, 1)) + 1
    return np.isin(labels, keep).astype(np.uint8), [int(areas[k - 1]) for k in keep]


def load_model(run_dir: Path | str, which: str = "best") -> keras.Model:
    """The run's ``best`` (default) or ``last`` model, without its training state."""
    import metaseg_tf.training.losses  # noqa: F401  (registers the custom loss and metric for deserialisation)
    import metaseg_tf.training.metrics  # noqa: F401

    return keras.saving.load_model(run_model_path(run_dir, which), compile=False)


def batch_probabilities(model: keras.Model, batch: np.ndarray, normalisation: str) -> np.ndarray:
    """Foreground probabilities ``float32 (B, S, S)`` of one preprocessed batch ``(B, S, S, C)``, read at the
    model's last output (for U-Net++ with deep supervision the deepest head, the output its validation Dice
    was monitored on)."""
    output = model.predict_on_batch(normalise(batch, normalisation))
    output = output[-1] if isinstance(output, (list, tuple)) else output
    return np.asarray(keras.ops.convert_to_numpy(output), np.float32)[..., 0]


def predict_probabilities(model: keras.Model, images: np.ndarray, normalisation: str,
                          batch_size: int = 16, progress: bool = False) -> np.ndarray:
    """Foreground probabilities ``float32 (N, S, S)`` for preprocessed ``uint8 (N, S, S, C)`` slices, in
    batches of ``batch_size`` (see :func:`batch_probabilities`)."""
    starts = range(0, len(images), batch_size)
    chunks = [batch_probabilities(model, images[start : start + batch_size], normalisation)
              for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress)]
    return np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:3]), np.float32)


class Predictor:
    """A trained model with its run's preprocessing; call :meth:`predict_slices` on ``(H, W, C)`` images."""

    def __init__(self, model: keras.Model, config: ExperimentConfig, threshold: float | None = None,
                 flip_tta: bool = False, min_component_pixels: int = 0, batch_size: int = 16) -> None:
        self.model, self.config = model, config
        self.threshold = config.threshold if threshold is None else threshold
        self.flip_tta, self.min_component_pixels, self.batch_size = flip_tta, min_component_pixels, batch_size

    @classmethod
    def from_run(cls, run_dir: Path | str, which: str = "best", **options) -> Predictor:
        return cls(load_model(run_dir, which), load_run_config(run_dir), **options)

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        return batch_probabilities(self.model, batch, self.config.normalisation)

    def predict_slices(self, images: Sequence[np.ndarray], progress: bool = False,
                       threshold: float | None = None) -> list[SlicePrediction]:
        """``images``: ``float (H, W)`` or ``(H, W, C)`` in ``[0, 1]``, any size; one prediction each.
        ``threshold`` overrides the predictor's own for this call."""
        threshold = self.threshold if threshold is None else threshold
        channels = self.config.channels
        prepared = []
        for image in images:  # grey repeated, alpha dropped, as when files are read
            prepared.append(preprocess_slice(to_channels(np.asarray(image, np.float32), channels), self.config))
        results = []
        starts = range(0, len(prepared), self.batch_size)
        for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress):
            batch = np.stack(prepared[start : start + self.batch_size])
            probabilities = self._probabilities(batch)
            if self.flip_tta:
                probabilities = (probabilities + self._probabilities(batch[:, :, ::-1])[:, :, ::-1]) / 2
            for offset, probability in enumerate(probabilities):
                height, width = np.asarray(images[start + offset]).shape[:2]
                probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
                mask, areas = remove_small_components(probability >= threshold, self.min_component_pixels)
                results.append(SlicePrediction(probability, mask, areas))
        return results


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    grey = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
    grey = cv2.normalize(grey.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(colour, contours, -1, (0, 0, 255), 1)


def _write_slice(out_dir: Path, stem: str, image: np.ndarray, prediction: SlicePrediction) -> None:
    (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_dir / f"{stem}_mask.png"), prediction.mask * 255)
    cv2.imwrite(str(out_dir / f"{stem}_probability.png"), np.round(prediction.probability * 255).astype(np.uint8))
    cv2.imwrite(str(out_dir / f"{stem}_overlay.png"), _overlay(image, prediction.mask))


def _scaled_volume(path: Path) -> tuple[np.ndarray, object, int]:
    """The volume scaled to ``[0, 1]`` between the 0.5th and 99.5th percentiles of its finite voxels, its
    NIfTI image, and how many voxels were NaN or infinite (they become 0, background)."""
    import nibabel as nib

    try:
        volume = nib.load(str(path))
        data = np.asarray(volume.get_fdata(dtype=np.float32))
    except Exception as error:  # nibabel raises several types for broken files
        raise DataError(f"cannot read NIfTI {path}: {error}") from error
    if data.ndim != 3:
        raise DataError(f"{path} has {data.ndim} dimensions; a 3D volume is expected")
    finite = np.isfinite(data)
    if not finite.any():
        raise DataError(f"{path} holds no finite voxel")
    low, high = np.percentile(data[finite], [0.5, 99.5])
    scaled = np.clip((data - low) / (high - low if high > low else 1.0), 0, 1)
    scaled[~finite] = 0.0
    return scaled, volume, int(finite.size - np.count_nonzero(finite))


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis whose direction is superior/inferior in world space."""
    import nibabel as nib

    return [code in ("S", "I") for code in nib.aff2axcodes(affine)].index(True)


def predict_nifti(predictor: Predictor, paths: Sequence[Path | str], out_dir: Path, progress: bool = True) -> dict:
    """Predict every axial slice of one volume (or co-registered volumes, one per channel); write NIfTI
    mask and probability volumes with the first input's affine, and a per-slice CSV."""
    import nibabel as nib

    paths = [Path(p) for p in paths]
    channels = predictor.config.channels
    if len(paths) not in (1, channels):
        raise DataError(f"the model takes {channels} channel(s): give 1 volume or {channels}, not {len(paths)}")
    scaled = [_scaled_volume(p) for p in paths]
    reference = scaled[0][1]
    if any(v.shape != reference.shape for _, v, _ in scaled):
        raise DataError("the NIfTI volumes differ in shape; they must be co-registered")
    axis = axial_axis(reference.affine)
    stacked = np.stack([np.moveaxis(data, axis, 0) for data, _, _ in scaled], axis=-1)  # (slices, H, W, volumes)
    non_finite = sum(count for _, _, count in scaled)
    if non_finite:
        logger.warning("%d NaN or infinite voxel(s) in %s were set to 0 (background)", non_finite,
                       ", ".join(p.name for p in paths))
    predictions = predictor.predict_slices(list(stacked), progress=progress)
    mask = np.moveaxis(np.stack([p.mask for p in predictions]), 0, axis)
    probability = np.moveaxis(np.stack([p.probability for p in predictions]), 0, axis)
    stem = paths[0].name.split(".nii")[0]
    for name, array, dtype in (("mask", mask, np.uint8), ("probability", probability, np.float32)):
        image = nib.Nifti1Image(array.astype(dtype), reference.affine, reference.header)
        image.set_data_dtype(dtype)
        nib.save(image, str(out_dir / f"{stem}_{name}.nii.gz"))
    rows = [{"file": stem, "slice": k, "lesions": p.lesion_count, "lesion_pixels": int(sum(p.lesion_areas)),
             "max_probability": float(p.probability.max()), "status": "ok"} for k, p in enumerate(predictions)]
    pd.DataFrame(rows).to_csv(out_dir / "predictions.csv", index=False)
    return {"volume": str(paths[0]), "axial_axis": axis, "slices": len(predictions),
            "slices_with_lesion": int(sum(p.lesion_count > 0 for p in predictions)),
            "lesion_voxels": int(mask.sum()), "non_finite_voxels": non_finite}


def _output_stems(relative: Sequence[Path]) -> list[str]:
    """Where each input's outputs go, relative to the predictions folder: its path relative to the input
    folder (a file given by itself: its name) without the extension. Inputs that would share one (``x.png``
    beside ``x.tif``, or ``x.png`` in two input folders) keep their extension in it (``x-tif``), then a
    counter, so no output ever overwrites another."""
    stems = [path.with_suffix("").as_posix() for path in relative]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    taken: set[str] = set()
    result = []
    for path, stem in zip(relative, stems):
        stem = f"{stem}-{path.suffix.lstrip('.').lower()}" if stem in shared else stem
        candidate, number = stem, 2
        while candidate in taken:
            candidate, number = f"{stem}-{number}", number + 1
        taken.add(candidate)
        result.append(candidate)
    return result


def predict_path(predictor: Predictor, inputs: Sequence[Path | str], out_root: Path | str,
                 progress: bool = True) -> tuple[Path, dict]:
    """Predict an image file, a folder of images (masks named ``*_mask.*`` are left out) or NIfTI
    volume(s) into a new folder ``<out_root>/predictions``; returns the folder and a summary. Outputs mirror
    the inputs' paths inside their folders (:func:`_output_stems`), so none overwrites another."""
    inputs = [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise DataError(f"input not found: {', '.join(missing)}")
    out_dir = new_dir(resolve(out_root), "predictions")
    if all(is_nifti(p) for p in inputs):
        return out_dir, predict_nifti(predictor, inputs, out_dir, progress)
    files: list[Path] = []
    relative: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.stem.endswith(MASK_SUFFIX))
            files += found
            relative += [f.relative_to(path) for f in found]
        else:
            files.append(path)
            relative.append(Path(path.name))
    rows, images, stems = [], [], []
    for path, stem in zip(files, _output_stems(relative)):
        try:
            images.append(read_image(path, predictor.config.channels))
            stems.append((path, stem))
        except DataError as error:
            rows.append({"file": str(path), "status": f"skipped: {error}"})
    if not images:
        raise DataError(f"no readable image among {len(files)} file(s): {rows[0]['status'] if rows else 'none found'}")
    for (path, stem), image, prediction in zip(stems, images, predictor.predict_slices(images, progress)):
        _write_slice(out_dir, stem, image, prediction)
        rows.append({"file": str(path), "output": stem, "lesions": prediction.lesion_count, "lesion_pixels": int(sum(prediction.lesion_areas)),
                     "max_probability": float(prediction.probability.max()), "status": "ok"})
    pd.DataFrame(rows).to_csv(out_dir / "predictions.csv", index=False)
    return out_dir, {"predicted": len(images), "skipped": len(files) - len(images)}
