"""The Predictor: the one way a trained model's probabilities become masks, for prediction, the web app and
evaluation alike.

A :class:`Predictor` holds one or more members (a network as an engine, :mod:`metaseg_tf.inference.engines`,
with its run's config) and the inference settings. Each slice goes through its member's own preprocessing
(window, CLAHE, resize, 2.5D context, normalisation), the engine (optionally with horizontal-flip test-time
augmentation: the mean of the image's and its mirror's probabilities), the members' mean (an ensemble:
nnU-Net's way to predict with the models of a cross-validation's folds), back to the slice's original size
(bilinear), is thresholded, loses predicted lesions below ``min_lesion_voxels`` and keeps those ``keep_lesions``
names (:mod:`metaseg_tf.inference.postprocess`: all, the largest, those over two or more slices; 3D components
per case where the slices' case and slice numbers are known, as the evaluation scores them; 2D components of a
slice given by itself, where ``persistent`` keeps every lesion).

:meth:`Predictor.from_run` builds one from a run folder (any engine, a pruned U-Net++ level) or from a
cross-validation folder (its fold models as one ensemble); :meth:`Predictor.from_runs` from several runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from tqdm.auto import tqdm

from metaseg_tf.config import INFERENCE_FIELDS, KEEP_LESIONS, ConfigError, ExperimentConfig
from metaseg_tf.data.context import context_rows, stack_context, volume_context
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import to_channels
from metaseg_tf.data.preprocess import normalise, preprocess_slice, preprocess_volume_slices
from metaseg_tf.data.targets import Target, resolve_target
from metaseg_tf.data.volumes import CaseVolume
from metaseg_tf.inference.engines import Engine, KerasEngine, flip_averaged
from metaseg_tf.inference.export import load_engine
from metaseg_tf.inference.loading import load_model
from metaseg_tf.inference.postprocess import select_components, select_lesions
from metaseg_tf.runs.folders import load_run_config, read_json
from metaseg_tf.runs.records import crossval_runs, is_crossval_dir, run_threshold

logger = logging.getLogger(__name__)
Inputs = np.ndarray | Callable[[ExperimentConfig], np.ndarray]  # preprocessed slices, or how a member's are made


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


@dataclass
class VolumePrediction:
    """One case's prediction in canonical orientation: ``probabilities`` ``float32 (Z, H, W, R)``, ``masks``
    ``uint8 (Z, H, W, R)`` (one channel per region of the run's target) and ``labels`` ``uint8 (Z, H, W)``
    (:meth:`~metaseg_tf.data.targets.Target.to_labels`)."""

    probabilities: np.ndarray
    masks: np.ndarray
    labels: np.ndarray


@dataclass
class Member:
    """One network of a predictor: its run's ``config`` (the preprocessing its inputs need), the ``engine``
    that runs it, the Keras ``model`` it came from and its ``run_dir`` (None when built from a model)."""

    config: ExperimentConfig
    engine: Engine
    model: Any
    run_dir: Path | None = None


def _resized(probabilities: np.ndarray, height: int, width: int) -> np.ndarray:
    """``(S, S, R)`` -> ``(height, width, R)``, bilinear."""
    if probabilities.shape[:2] == (height, width):
        return probabilities
    return cv2.resize(probabilities, (width, height), interpolation=cv2.INTER_LINEAR).reshape(height, width, -1)


# members of an ensemble must agree on these: their outputs are averaged pixel by pixel and thresholded once
ENSEMBLE_SETTINGS = ("target", "image_size", "threshold", *INFERENCE_FIELDS)


class Predictor:
    """Trained network(s) with their runs' preprocessing and the inference settings; call
    :meth:`predict_slices` on ``(H, W, C)`` images, :meth:`predict_volume` on a case read with
    :func:`~metaseg_tf.data.volumes.read_case`, or :meth:`probabilities` and :meth:`masks` on preprocessed
    slices (what the evaluation does). ``label_convention`` is the training data's (a run's ``data.json``
    records it). ``threshold``, ``flip_tta``, ``min_lesion_voxels`` and ``keep_lesions`` default to the config's; ``engine``
    defaults to Keras on ``model``; ``level`` records which pruned U-Net++ level the engine runs."""

    def __init__(self, model: Any, config: ExperimentConfig, threshold: float | None = None,
                 flip_tta: bool | None = None, min_lesion_voxels: int | None = None, keep_lesions: str | None = None,
                 batch_size: int = 16,
                 label_convention: str = "binary", engine: Engine | None = None, level: int | None = None,
                 members: Sequence[Member] | None = None) -> None:
        self.members = list(members) if members else [Member(config, engine or KerasEngine(model), model)]
        self.model, self.config = self.members[0].model, self.members[0].config
        self.engine: Engine = self.members[0].engine
        self.level = level
        self.threshold = config.threshold if threshold is None else threshold
        self.threshold_source = "config" if threshold is None else "given"
        self.flip_tta = config.flip_tta if flip_tta is None else flip_tta
        self.min_lesion_voxels = config.min_lesion_voxels if min_lesion_voxels is None else min_lesion_voxels
        self.keep_lesions = config.keep_lesions if keep_lesions is None else keep_lesions
        if self.keep_lesions not in KEEP_LESIONS:
            raise ConfigError(f"keep_lesions must be one of {', '.join(KEEP_LESIONS)}, got {self.keep_lesions!r}")
        self.batch_size = batch_size
        self.target: Target = resolve_target(config.target, label_convention)

    @property
    def concurrent(self) -> bool:
        """Whether every member's engine may be called from several threads at once."""
        return all(member.engine.concurrent for member in self.members)

    @property
    def engine_name(self) -> str:
        return self.engine.name

    def inference_record(self) -> dict[str, Any]:
        """How this predictor makes masks, as an evaluation's ``summary.json`` records it."""
        return {"engine": self.engine_name, "level": self.level, "flip_tta": self.flip_tta,
                "threshold": self.threshold, "threshold_source": self.threshold_source,
                "min_lesion_voxels": self.min_lesion_voxels, "keep_lesions": self.keep_lesions,
                "members": len(self.members)}

    @classmethod
    def from_run(cls, run_dir: Path | str, which: str = "best", engine: str = "keras", level: int | None = None,
                 models: Sequence[str] | None = None, threads: int | None = None, **options: Any) -> Predictor:
        """The run's model with its preprocessing; ``engine`` ``keras``, ``onnx`` or ``openvino``
        (:func:`~metaseg_tf.inference.export.load_engine`: the run's newest export of that format, exported
        first if needed); ``level``: a U-Net++ pruned to that level (faster, usually less accurate; None: the
        whole network); ``threads``: the most threads each ONNX Runtime / OpenVINO model uses. A
        cross-validation folder gives the ensemble of its fold runs (of ``models``, default
        every model it trained; :meth:`from_runs`).

        A run trained with ``threshold_from_validation`` predicts at the threshold its newest test evaluation
        chose on the validation patients (``threshold_source`` ``validation``); before any evaluation it warns
        and uses the config's threshold, and it warns when flip TTA or the level differ from the settings the
        threshold was chosen with. A ``threshold`` in ``options`` wins over both."""
        if is_crossval_dir(run_dir):
            return cls.from_runs(crossval_runs(run_dir, tuple(models) if models else None), which, engine, level,
                                 threads, **options)
        convention = read_json(Path(run_dir) / "data.json").get("label_convention", "binary")
        config = load_run_config(run_dir)
        chosen = None
        if options.get("threshold") is None and config.threshold_from_validation:
            threshold, source = run_threshold(run_dir, which)  # warns where none is chosen yet
            if source == "validation":
                chosen = options["threshold"] = threshold
                changed = []
                if options.get("flip_tta") not in (None, config.flip_tta):
                    changed.append(f"flip TTA {'on' if options['flip_tta'] else 'off'}")
                if level is not None:
                    changed.append(f"the network pruned to level {level}")
                if changed:
                    logger.warning("%s: its threshold %g was chosen on validation with the run's own settings, "
                                   "not with %s", run_dir, chosen, " and ".join(changed))
        model = load_model(run_dir, which)
        member = Member(config, load_engine(run_dir, engine, which, model, level, threads), model, Path(run_dir))
        predictor = cls(model, config, label_convention=convention, level=level, members=[member], **options)
        if chosen is not None:
            predictor.threshold_source = "validation"
        return predictor

    @classmethod
    def from_runs(cls, run_dirs: Sequence[Path | str], which: str = "best", engine: str = "keras",
                  level: int | None = None, threads: int | None = None, **options: Any) -> Predictor:
        """The ensemble of ``run_dirs``: the mean of their probabilities (each run with its own preprocessing
        and engine), thresholded once. The runs must share target, image size, threshold and inference
        settings (:data:`ENSEMBLE_SETTINGS`) and label convention, else :class:`ConfigError`. The ensemble
        predicts at the runs' config threshold (or ``options``'); one run gives :meth:`from_run`."""
        run_dirs = [Path(run_dir) for run_dir in run_dirs]
        if not run_dirs:
            raise ConfigError("an ensemble needs at least one run")
        if len(run_dirs) == 1:
            return cls.from_run(run_dirs[0], which, engine, level, threads=threads, **options)
        configs = [load_run_config(run_dir) for run_dir in run_dirs]
        conventions = {read_json(run_dir / "data.json").get("label_convention", "binary") for run_dir in run_dirs}
        for run_dir, config in zip(run_dirs[1:], configs[1:]):
            for setting in ENSEMBLE_SETTINGS:
                mine, theirs = getattr(config, setting), getattr(configs[0], setting)
                if mine != theirs:
                    raise ConfigError(f"the ensemble's runs must share {setting}: {run_dir} has {mine!r}, "
                                      f"{run_dirs[0]} {theirs!r}")
        if len(conventions) > 1:
            raise ConfigError(f"the ensemble's runs were trained on data of different label conventions: "
                              f"{', '.join(sorted(conventions))}")
        if configs[0].threshold_from_validation and options.get("threshold") is None:
            logger.warning("the ensemble's runs choose their thresholds on validation one by one; the ensemble "
                           "predicts at their config threshold %g (evaluate the ensemble to choose its own)",
                           configs[0].threshold)
        members = []
        for run_dir, config in zip(run_dirs, configs):
            model = load_model(run_dir, which)
            members.append(Member(config, load_engine(run_dir, engine, which, model, level, threads), model, run_dir))
        return cls(members[0].model, configs[0], label_convention=conventions.pop(), level=level, members=members,
                   **options)

    # --- probabilities -----------------------------------------------------------------------------------
    def _member_probabilities(self, member: Member, batch: np.ndarray) -> np.ndarray:
        return flip_averaged(lambda slices: member.engine.predict(normalise(slices, member.config.normalisation)),
                             batch, self.flip_tta)

    def _probabilities(self, batch: np.ndarray) -> np.ndarray:
        """``(B, S, S, R)`` probabilities of a batch of preprocessed slices (with their context channels), the
        same for every member: the members' mean, flip TTA included."""
        total = sum(self._member_probabilities(member, batch).astype(np.float64) for member in self.members)
        return (total / len(self.members)).astype(np.float32)

    def probabilities(self, inputs: Inputs, progress: bool = False, description: str = "predicting") -> np.ndarray:
        """Probabilities ``float32 (N, S, S, R)`` of preprocessed slices ``uint8 (N, S, S, input_channels)`` in
        batches of ``batch_size``: each member's engine (flip TTA included), then the members' mean. ``inputs``
        is the slices, or a function giving a member's slices from its config (members preprocessed
        differently: another CLAHE or 2.5D context)."""
        total: np.ndarray | None = None
        prepared: dict[tuple[str, int], np.ndarray] = {}
        for member in self.members:
            config = member.config
            if callable(inputs):
                key = (config.preprocessing_key(), config.context_slices)
                images = prepared[key] = prepared[key] if key in prepared else inputs(config)
            else:
                images = inputs
            starts = range(0, len(images), self.batch_size)
            chunks = [self._member_probabilities(member, images[start : start + self.batch_size])
                      for start in tqdm(starts, desc=description, unit="batch", disable=not progress)]
            if not chunks:
                return np.zeros((0, *images.shape[1:3], len(self.target.names)), np.float32)
            member_probabilities = np.concatenate(chunks).astype(np.float64)
            total = member_probabilities if total is None else total + member_probabilities
        return (total / len(self.members)).astype(np.float32)

    # --- masks -------------------------------------------------------------------------------------------
    def masks(self, probabilities: np.ndarray, case_ids: Sequence[str] | None = None,
              slice_indices: Sequence[int] | None = None, threshold: float | None = None) -> np.ndarray:
        """Masks ``uint8 (N, H, W, R)`` of probabilities ``(N, H, W, R)``: thresholded (``threshold``, default
        the predictor's), then with the predicted lesions ``min_lesion_voxels`` and ``keep_lesions`` keep
        (:mod:`~metaseg_tf.inference.postprocess`), per region: 3D components of each case, its slices placed by
        number (:func:`~metaseg_tf.inference.postprocess.select_lesions`) where ``case_ids`` and
        ``slice_indices`` are given, else 2D components of each slice."""
        threshold = self.threshold if threshold is None else threshold
        masks = (np.asarray(probabilities) >= threshold).astype(np.uint8)
        if (not self.min_lesion_voxels and self.keep_lesions == "all") or len(masks) == 0:
            return masks
        if case_ids is None:
            return np.stack([np.stack([select_components(m[..., r], self.min_lesion_voxels, self.keep_lesions)[0]
                                       for r in range(m.shape[-1])], axis=-1) for m in masks])
        return np.stack([select_lesions(masks[..., r], case_ids, slice_indices, self.min_lesion_voxels,
                                        self.keep_lesions) for r in range(masks.shape[-1])], axis=-1)

    # --- inputs ------------------------------------------------------------------------------------------
    def prepare_slice(self, image: np.ndarray, alone: bool = True, config: ExperimentConfig | None = None) -> np.ndarray:
        """A 2D slice ``float (H, W[, C])`` in ``[0, 1]`` preprocessed as the run's (``config``'s, default the
        first member's) were: grey repeated or alpha dropped as when files are read, window, CLAHE, resize:
        ``uint8 (S, S, channels)``; ``alone``: with the slice as its own 2.5D neighbours, ``(S, S,
        input_channels)``. A model of other than 1 or 3 sequences cannot take a slice image (:class:`DataError`:
        predict the case's volumes instead)."""
        config = config or self.config
        channels, copies = config.channels, 2 * config.context_slices + 1
        if channels not in (1, 3):
            raise DataError(f"this model takes {channels} sequences ({', '.join(config.sequences)}); a slice "
                            "image gives 1 or 3 channels: predict the case's NIfTI volumes instead")
        slice_ = preprocess_slice(to_channels(np.asarray(image, np.float32), channels), config)
        return np.concatenate([slice_] * copies, axis=-1) if alone and copies > 1 else slice_

    def _slice_inputs(self, images: Sequence[np.ndarray], case_ids: Sequence[str] | None,
                      slice_indices: Sequence[int] | None) -> Callable[[ExperimentConfig], np.ndarray]:
        def inputs(config: ExperimentConfig) -> np.ndarray:
            if config.context_slices and case_ids is not None and len(images) > 1:
                slices = np.stack([self.prepare_slice(image, alone=False, config=config) for image in images])
                rows = context_rows(np.asarray(case_ids), np.asarray(slice_indices), config.context_slices)
                return stack_context(slices, rows)
            return np.stack([self.prepare_slice(image, config=config) for image in images])
        return inputs

    # --- predictions -------------------------------------------------------------------------------------
    def predict_volume(self, volume: CaseVolume, progress: bool = False,
                       convention: str | None = None) -> VolumePrediction:
        """Every axial slice of ``volume`` with its 2.5D context, back at the volume's in-plane size
        (bilinear), thresholded; 3D lesions selected (``min_lesion_voxels``, ``keep_lesions``); ``labels`` in the label
        ``convention`` of the volume's data (default: the training data's)."""
        probabilities = self.probabilities(
            lambda config: volume_context(preprocess_volume_slices(volume.images, config), config.context_slices),
            progress, f"predicting {volume.case_id}")
        height, width = volume.images.shape[1:3]
        probabilities = np.stack([_resized(p, height, width) for p in probabilities])
        slices = np.arange(len(probabilities))
        masks = self.masks(probabilities, np.full(len(slices), volume.case_id), slices)
        return VolumePrediction(probabilities, masks, self.target.to_labels(masks, convention))

    def predict_slices(self, images: Sequence[np.ndarray], progress: bool = False,
                       threshold: float | None = None, case_ids: Sequence[str] | None = None,
                       slice_indices: Sequence[int] | None = None) -> list[SlicePrediction]:
        """``images``: ``float (H, W)`` or ``(H, W, C)`` in ``[0, 1]``, any size; one prediction each, of the
        run's first region. ``case_ids`` and ``slice_indices`` say which slices are neighbours (as at training:
        by slice number within a case): a model trained with 2.5D context reads them, and lesions are selected
        (``min_lesion_voxels``, ``keep_lesions``) in 3D per case as the evaluation selects them (where a case's slices
        share one size; else, and without them, per slice in 2D). ``threshold`` overrides the predictor's own
        for this call."""
        if len(images) == 0:
            return []
        probabilities = self.probabilities(self._slice_inputs(images, case_ids, slice_indices), progress)[..., :1]
        resized = [_resized(p, *np.asarray(image).shape[:2]) for p, image in zip(probabilities, images)]
        masks: list[np.ndarray | None] = [None] * len(images)
        if case_ids is not None and (self.min_lesion_voxels or self.keep_lesions != "all"):
            case_array = np.asarray(case_ids)
            for case in dict.fromkeys(case_ids):
                rows = np.flatnonzero(case_array == case)
                if len({resized[k].shape for k in rows}) == 1:
                    kept = self.masks(np.stack([resized[k] for k in rows]), case_array[rows],
                                      np.asarray(slice_indices)[rows], threshold)
                    for k, mask in zip(rows, kept):
                        masks[k] = mask
        results = []
        for k, probability in enumerate(resized):
            mask = masks[k] if masks[k] is not None else self.masks(probability[None], threshold=threshold)[0]
            mask, areas = select_components(mask[..., 0], 1)
            results.append(SlicePrediction(probability[..., 0], mask, areas))
        return results
