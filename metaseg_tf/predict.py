"""Prediction with a trained run: a slice array, an image file, a folder of images, NIfTI volumes or cases of a
volume layout (BraTS-METS, MSD, BrainMetShare, generic NIfTI).

This module owns model loading (:func:`load_model`, :func:`predict_probabilities`): evaluation, the
notebooks and the web app load and run models through it, so inference does not pull in the reporting code.

Each slice goes through the run's own preprocessing (window, CLAHE, resize, normalisation), the model
(optionally with horizontal-flip test-time augmentation: the mean of the image's and its mirror's
probabilities), back to the slice's original size (bilinear), is thresholded, and loses connected
components smaller than ``min_component_pixels``. Written outputs per slice: ``<stem>_mask.png`` (0/255),
``<stem>_probability.png`` (0-255) and ``<stem>_overlay.png``.

Volumes are read like training data (:mod:`metaseg_tf.data.volumes`): reoriented to the canonical axial
orientation from the affine, windowed per volume and sequence, each axial slice predicted with its 2.5D
context, and the result put back into the input's own voxel grid. Written per case, BraTS-style:
``<case>-seg.nii.gz`` (``uint8``; a binary mask for one region, the labels of the dataset's convention for a
``multilabel`` run) and ``<case>-probability.nii.gz`` (``float32``, one volume per region), both with the
input's affine and header so they overlay in any NIfTI viewer, and ``<case>-overlay.png`` (the slices with
most predicted lesion). Components smaller than ``min_component_pixels`` voxels (3D, 26-connected) are
removed. Where the case has a segmentation the per-case scores are computed too. Given NIfTI files by
themselves: one volume fills every input channel, or one co-registered volume per sequence of the run, in
its order.

Unreadable files in a folder are skipped, counted and listed with the reason in ``predictions.csv``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import keras
import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm.auto import tqdm

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.context import context_rows, stack_context, volume_context
from metaseg_tf.data.discover import IMAGE_EXTENSIONS, MASK_SUFFIX, DataError, split_case_and_slice
from metaseg_tf.data.io import read_image, to_channels
from metaseg_tf.data.preprocess import normalise, preprocess_slice, preprocess_volume_slices
from metaseg_tf.data.targets import Target, resolve_target
from metaseg_tf.data.volumes import (
    CaseVolume,
    SequenceSource,
    VolumeCase,
    discover_volumes,
    from_canonical,
    is_nifti,
    nifti_stem,
    read_case,
    resolve_sequences,
)
from metaseg_tf.engines import Engine, KerasEngine, load_engine
from metaseg_tf.evaluation.scores import evaluate_masks, slice_offsets, stack_slices
from metaseg_tf.paths import resolve
from metaseg_tf.training.runs import load_run_config, new_dir, read_json, run_model_path

logger = logging.getLogger(__name__)
# canonical (slice, row, column) = (S, P, L) axes as an affine: for volumes that came as slice images
CANONICAL_AFFINE = np.array([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])


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
    """Drop components (8-connected in 2D, 26-connected in 3D) below ``min_pixels``; return the mask and the
    kept components' sizes."""
    labels, count = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, bool))
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    keep = np.flatnonzero(areas >= max(min_pixels, 1)) + 1
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


def load_model(run_dir: Path | str, which: str = "best") -> keras.Model:
    """The run's ``best`` (default) or ``last`` model, without its training state."""
    import metaseg_tf.training.losses  # noqa: F401  (registers the custom loss and metric for deserialisation)
    import metaseg_tf.training.metrics  # noqa: F401

    return keras.saving.load_model(run_model_path(run_dir, which), compile=False)


def batch_probabilities(model: keras.Model, batch: np.ndarray, normalisation: str) -> np.ndarray:
    """Probabilities ``float32 (B, S, S, R)`` (one channel per output region) of one preprocessed batch
    ``(B, S, S, C)``, read at the model's last output (for U-Net++ with deep supervision the deepest head, the
    output its validation Dice was monitored on)."""
    return KerasEngine(model).predict(normalise(batch, normalisation))


def flip_averaged(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, flip_tta: bool = True) -> np.ndarray:
    """``predict(batch)`` for a batch ``(B, S, S, C)``; with ``flip_tta`` its mean with the prediction of the
    horizontally flipped batch, flipped back (test-time augmentation), ``(B, S, S, R)``."""
    probabilities = predict(batch)
    if not flip_tta:
        return probabilities
    flipped = predict(np.ascontiguousarray(batch[:, :, ::-1]))
    return (probabilities + flipped[:, :, ::-1]) / 2


def predict_probabilities(model: keras.Model, images: np.ndarray, normalisation: str,
                          batch_size: int = 16, progress: bool = False, flip_tta: bool = False) -> np.ndarray:
    """Probabilities ``float32 (N, S, S, R)`` for preprocessed ``uint8 (N, S, S, C)`` slices, in batches of
    ``batch_size`` (see :func:`batch_probabilities`); ``flip_tta``: the mean with the prediction of the
    horizontally flipped slices, flipped back."""
    def probabilities(batch: np.ndarray) -> np.ndarray:
        return batch_probabilities(model, batch, normalisation)

    starts = range(0, len(images), batch_size)
    chunks = [flip_averaged(probabilities, images[start : start + batch_size], flip_tta)
              for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress)]
    outputs = model.outputs[-1].shape[-1]
    return np.concatenate(chunks) if chunks else np.zeros((0, *images.shape[1:3], outputs), np.float32)


@dataclass
class VolumePrediction:
    """One case's prediction in canonical orientation: ``probabilities`` ``float32 (Z, H, W, R)``, ``masks``
    ``uint8 (Z, H, W, R)`` (one channel per region of the run's target) and ``labels`` ``uint8 (Z, H, W)``
    (:meth:`~metaseg_tf.data.targets.Target.to_labels`)."""

    probabilities: np.ndarray
    masks: np.ndarray
    labels: np.ndarray


class Predictor:
    """A trained model with its run's preprocessing; call :meth:`predict_slices` on ``(H, W, C)`` images or
    :meth:`predict_volume` on a case read with :func:`~metaseg_tf.data.volumes.read_case`. ``label_convention``
    is the training data's (a run's ``data.json`` records it)."""

    def __init__(self, model: keras.Model, config: ExperimentConfig, threshold: float | None = None,
                 flip_tta: bool | None = None, min_component_pixels: int | None = None, batch_size: int = 16,
                 label_convention: str = "binary", engine: Engine | None = None) -> None:
        self.model, self.config = model, config
        self.engine: Engine = engine if engine is not None else KerasEngine(model)
        self.threshold = config.threshold if threshold is None else threshold
        self.threshold_source = "config" if threshold is None else "given"
        self.flip_tta = config.flip_tta if flip_tta is None else flip_tta
        # a volume's lesions are 3D: the run's min_lesion_voxels applies to them unless this is given; a slice's
        # are 2D, and a voxel count does not translate into pixels of one slice, so slices use only this
        self.min_component_pixels = min_component_pixels
        self.batch_size = batch_size
        self.target: Target = resolve_target(config.target, label_convention)

    @classmethod
    def from_run(cls, run_dir: Path | str, which: str = "best", engine: str = "keras", level: int | None = None,
                 **options) -> Predictor:
        """The run's model with its preprocessing; ``engine`` ``keras``, ``onnx`` or ``openvino``
        (:mod:`metaseg_tf.engines`: the run's newest export of that format, exported first if needed);
        ``level``: a U-Net++ pruned to that level (faster, usually less accurate; None: the whole network).
        A run trained with ``threshold_from_validation`` predicts at the threshold its newest test evaluation
        chose on the validation patients (``threshold_source`` ``validation``); before any evaluation it warns
        and uses the config's threshold, and it warns when flip TTA or the level differ from the settings the
        threshold was chosen with. A ``threshold`` in ``options`` wins over both."""
        convention = read_json(Path(run_dir) / "data.json").get("label_convention", "binary")
        config = load_run_config(run_dir)
        chosen = None
        if options.get("threshold") is None and config.threshold_from_validation:
            from metaseg_tf.evaluation.report import chosen_threshold  # the reporting code, only where needed

            chosen = chosen_threshold(run_dir, which)
            if chosen is None:
                logger.warning("%s chooses its threshold on the validation patients, but no evaluation has chosen "
                               "it yet (run `metaseg evaluate %s`): predicting at the config's %g", run_dir,
                               run_dir, config.threshold)
            else:
                options["threshold"] = chosen
                changed = []
                if options.get("flip_tta") not in (None, config.flip_tta):
                    changed.append(f"flip TTA {'on' if options['flip_tta'] else 'off'}")
                if level is not None:
                    changed.append(f"the network pruned to level {level}")
                if changed:
                    logger.warning("%s: its threshold %g was chosen on validation with the run's own settings, "
                                   "not with %s", run_dir, chosen, " and ".join(changed))
        model = load_model(run_dir, which)
        predictor = cls(model, config, label_convention=convention,
                        engine=load_engine(run_dir, engine, which, model, level), **options)
        if chosen is not None:
            predictor.threshold_source = "validation"
        return predictor

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """``(B, S, S, R)`` probabilities of preprocessed slices (with their context channels) from the
        predictor's engine, flip TTA included."""
        return flip_averaged(lambda slices: self.engine.predict(normalise(slices, self.config.normalisation)), batch,
                             self.flip_tta)

    def prepare_slice(self, image: np.ndarray, alone: bool = True) -> np.ndarray:
        """A 2D slice ``float (H, W[, C])`` in ``[0, 1]`` preprocessed as the run's were: grey repeated or alpha
        dropped as when files are read, window, CLAHE, resize: ``uint8 (S, S, channels)``; ``alone``: with the
        slice as its own 2.5D neighbours, ``(S, S, input_channels)``. A model of other than 1 or 3 sequences
        cannot take a slice image (:class:`DataError`: predict the case's volumes instead)."""
        channels, copies = self.config.channels, 2 * self.config.context_slices + 1
        if channels not in (1, 3):
            raise DataError(f"this model takes {channels} sequences ({', '.join(self.config.sequences)}); a slice "
                            "image gives 1 or 3 channels: predict the case's NIfTI volumes instead")
        slice_ = preprocess_slice(to_channels(np.asarray(image, np.float32), channels), self.config)
        return np.concatenate([slice_] * copies, axis=-1) if alone and copies > 1 else slice_

    def predict_volume(self, volume: CaseVolume, progress: bool = False) -> VolumePrediction:
        """Every axial slice of ``volume`` with its 2.5D context, back at the volume's in-plane size
        (bilinear), thresholded; 3D components below ``min_component_pixels`` voxels (default: the run's
        ``min_lesion_voxels``) removed."""
        slices = volume_context(preprocess_volume_slices(volume.images, self.config), self.config.context_slices)
        starts = range(0, len(slices), self.batch_size)
        chunks = [self._probabilities(slices[start : start + self.batch_size])
                  for start in tqdm(starts, desc=f"predicting {volume.case_id}", unit="batch", disable=not progress)]
        height, width = volume.images.shape[1:3]
        probabilities = np.stack([cv2.resize(p, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)
                                  for p in np.concatenate(chunks)])
        minimum = self.config.min_lesion_voxels if self.min_component_pixels is None else self.min_component_pixels
        masks = np.stack([remove_small_components(probabilities[..., r] >= self.threshold, minimum)[0]
                          for r in range(probabilities.shape[-1])], axis=-1)
        return VolumePrediction(probabilities, masks, self.target.to_labels(masks))

    def predict_slices(self, images: Sequence[np.ndarray], progress: bool = False,
                       threshold: float | None = None, case_ids: Sequence[str] | None = None,
                       slice_indices: Sequence[int] | None = None) -> list[SlicePrediction]:
        """``images``: ``float (H, W)`` or ``(H, W, C)`` in ``[0, 1]``, any size; one prediction each, of the
        run's first region. For a model trained with 2.5D context, ``case_ids`` and ``slice_indices`` say which
        slices are neighbours (as at training: by slice number within a case); without them each slice is its
        own neighbour. ``threshold`` overrides the predictor's own for this call."""
        threshold = self.threshold if threshold is None else threshold
        if self.config.context_slices and case_ids is not None and len(images) > 1:
            slices = np.stack([self.prepare_slice(image, alone=False) for image in images])
            rows = context_rows(np.asarray(case_ids), np.asarray(slice_indices), self.config.context_slices)
            prepared = list(stack_context(slices, rows))
        else:
            prepared = [self.prepare_slice(image) for image in images]
        results = []
        starts = range(0, len(prepared), self.batch_size)
        for start in tqdm(starts, desc="predicting", unit="batch", disable=not progress):
            batch = np.stack(prepared[start : start + self.batch_size])
            probabilities = self._probabilities(batch)[..., 0]  # a slice: the first region (WT when multilabel)
            for offset, probability in enumerate(probabilities):
                height, width = np.asarray(images[start + offset]).shape[:2]
                probability = cv2.resize(probability, (width, height), interpolation=cv2.INTER_LINEAR)
                mask, areas = remove_small_components(probability >= threshold, self.min_component_pixels or 0)
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


def _volume_overlay(volume: CaseVolume, labels: np.ndarray, count: int = 4) -> np.ndarray:
    """The ``count`` slices with most predicted lesion side by side (first channel, contours in red)."""
    per_slice = labels.reshape(len(labels), -1).astype(bool).sum(axis=1)
    chosen = sorted(np.argsort(per_slice)[::-1][:count]) if per_slice.any() else [len(labels) // 2]
    return np.concatenate([_overlay(volume.images[k][..., :1], labels[k] > 0) for k in chosen], axis=1)


def case_scores(volume: CaseVolume, prediction: VolumePrediction, target: Target) -> dict[str, dict]:
    """Per-case scores of each region of ``target`` (Dice, IoU, precision, recall, HD95 in mm when the
    volume's spacing is known, BraTS-MET 2023 lesion-wise scores; :func:`~metaseg_tf.evaluation.scores.
    evaluate_masks`) against the case's own labels, read with ``target``'s convention: pass the target in the
    convention of the case's dataset, which may differ from the training data's."""
    truth = target.masks(volume.labels)
    slices = np.arange(len(truth))
    case_ids = np.full(len(truth), volume.case_id)
    return {name: evaluate_masks(truth[..., r], prediction.masks[..., r], case_ids, slices,
                                 volume.spacing).per_patient.iloc[0].drop("case_id").to_dict()
            for r, name in enumerate(target.names)}


def write_case_prediction(volume: CaseVolume, prediction: VolumePrediction, out_dir: Path) -> dict[str, Path]:
    """``<case>-seg.nii.gz``, ``<case>-probability.nii.gz`` (in the input's voxel grid, with its affine and
    header) and ``<case>-overlay.png``; returns their paths."""
    import nibabel as nib

    reference = volume.reference
    affine = reference.affine if reference is not None else CANONICAL_AFFINE
    header = reference.header.copy() if reference is not None else None
    probabilities = prediction.probabilities[..., 0] if prediction.probabilities.shape[-1] == 1 \
        else prediction.probabilities
    written = {}
    for name, array, dtype in (("seg", prediction.labels, np.uint8), ("probability", probabilities, np.float32)):
        image = nib.Nifti1Image(from_canonical(array, affine).astype(dtype), affine, header)
        image.set_data_dtype(dtype)
        written[name] = out_dir / f"{volume.case_id}-{name}.nii.gz"
        nib.save(image, str(written[name]))
    written["overlay"] = out_dir / f"{volume.case_id}-overlay.png"
    cv2.imwrite(str(written["overlay"]), _volume_overlay(volume, prediction.labels))
    return written


def predict_cases(predictor: Predictor, cases: Sequence[VolumeCase], out_dir: Path, progress: bool = True,
                  convention: str | None = None) -> dict:
    """Predict every case (see the module docstring); cases whose images cannot be read are skipped and listed
    with the reason in ``predictions.csv`` (one row per case, with its scores where it has labels that can be
    read; a broken segmentation only costs the scores, and the row says why). ``convention``: the label
    convention of the cases' dataset, which the scores read their labels with (default: the run's)."""
    config = predictor.config
    sequences = resolve_sequences(config.sequences, config.channels)
    scoring = resolve_target(config.target, convention or predictor.target.convention)
    rows, taken = [], set()
    for case in cases:
        name, number = case.case_id, 2
        while name in taken:  # two input folders with one case id: never overwrite the first one's outputs
            name, number = f"{case.case_id}-{number}", number + 1
        taken.add(name)
        case = dataclasses.replace(case, case_id=name)
        labels_note = ""
        try:
            volume = read_case(case, sequences, config.fill_missing)
        except DataError as error:
            try:  # the images may be fine where the segmentation is not
                volume = read_case(case, sequences, config.fill_missing, with_labels=False)
                labels_note = f"not scored: {error}"
            except DataError:
                rows.append({"case_id": case.case_id, "status": f"skipped: {error}"})
                continue
        prediction = predictor.predict_volume(volume, progress)
        write_case_prediction(volume, prediction, out_dir)
        row = {"case_id": case.case_id, "status": "ok", "scores": labels_note, "slices": len(prediction.labels),
               "lesion_voxels": int((prediction.labels > 0).sum()), "non_finite_voxels": volume.non_finite_voxels,
               "filled_sequences": " ".join(volume.filled)}
        if volume.labels is not None:
            for region, scores in case_scores(volume, prediction, scoring).items():
                row.update({f"{region}_{name}": value for name, value in scores.items()
                            if name in ("dice", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions",
                                        "detected_lesions", "false_positive_lesions")})
        rows.append(row)
    pd.DataFrame(rows).to_csv(out_dir / "predictions.csv", index=False)
    done = [row for row in rows if row["status"] == "ok"]
    if not done:
        raise DataError(f"no case could be predicted: {rows[0]['status'] if rows else 'none given'}")
    return {"cases": len(done), "skipped": len(rows) - len(done),
            "lesion_voxels": int(sum(row["lesion_voxels"] for row in done))}


def nifti_case(predictor: Predictor, paths: Sequence[Path]) -> VolumeCase:
    """NIfTI files given by themselves as one case named after the first: one volume fills every sequence
    of the run, or one volume per sequence in the run's order."""
    sequences = resolve_sequences(predictor.config.sequences, predictor.config.channels)
    if len(paths) not in (1, len(sequences)):
        raise DataError(f"the model takes {len(sequences)} sequence(s) ({', '.join(sequences)}): give 1 volume or "
                        f"{len(sequences)}, not {len(paths)}")
    sources = [SequenceSource(p) for p in paths] * (len(sequences) if len(paths) == 1 else 1)
    return VolumeCase(nifti_stem(paths[0]), dict(zip(sequences, sources)))


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
    """Predict an image file, a folder of images (masks named ``*_mask.*`` are left out), NIfTI volume(s) of
    one case, or folders of a volume layout (a case folder, or a dataset of cases) into a new folder
    ``<out_root>/predictions``; returns the folder and a summary. Image outputs mirror the inputs' paths
    inside their folders (:func:`_output_stems`), so none overwrites another; volume outputs are named after
    their case. A model with 2.5D context reads each image with its neighbours as in training: the images of
    its folder with the same case id, in slice-number order (``<case>_<n>``, as kaggle_3m names them)."""
    inputs = [Path(p) for p in inputs]
    missing = [str(p) for p in inputs if not p.exists()]
    if missing:
        raise DataError(f"input not found: {', '.join(missing)}")
    out_dir = new_dir(resolve(out_root), "predictions")
    if all(is_nifti(p) for p in inputs):
        return out_dir, predict_cases(predictor, [nifti_case(predictor, inputs)], out_dir, progress)
    volume_reports = [discover_volumes(p) for p in inputs if p.is_dir()]
    if volume_reports and all(volume_reports) and len(volume_reports) == len(inputs):
        cases = [case for report in volume_reports for case in report.cases]
        conventions = {report.convention for report in volume_reports}
        return out_dir, predict_cases(predictor, cases, out_dir, progress,
                                      conventions.pop() if len(conventions) == 1 else None)
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
    cases = [(str(path.parent), *split_case_and_slice(path.stem)) for path, _ in stems]  # 2.5D neighbours
    predictions = predictor.predict_slices(images, progress, case_ids=[f"{folder}/{case}" for folder, case, _ in cases],
                                           slice_indices=[number for _, _, number in cases])
    for (path, stem), image, prediction in zip(stems, images, predictions):
        _write_slice(out_dir, stem, image, prediction)
        rows.append({"file": str(path), "output": stem, "lesions": prediction.lesion_count, "lesion_pixels": int(sum(prediction.lesion_areas)),
                     "max_probability": float(prediction.probability.max()), "status": "ok"})
    pd.DataFrame(rows).to_csv(out_dir / "predictions.csv", index=False)
    return out_dir, {"predicted": len(images), "skipped": len(files) - len(images)}
