"""Training and evaluation batches from a preprocessed dataset, as a ``keras.utils.PyDataset``.

The batches are NumPy arrays built with NumPy and OpenCV, so the same pipeline feeds a model under the
TensorFlow, JAX or PyTorch backend, and ``PyDataset`` can run it in worker threads or processes.

Shapes: ``x`` is ``float32 (batch, S, S, config.input_channels)`` (normalised as the config says; with
2.5D context the neighbouring slices' channels too, :mod:`metaseg_tf.data.context`) and ``y`` is
``float32 (batch, S, S, config.output_channels)`` holding 0 and 1: the config's target made from the stored
labels (:mod:`metaseg_tf.data.targets`; a tuple of ``target_copies`` such arrays for a model with several
outputs, e.g. U-Net++'s deep-supervision heads).

Data folders of a volume layout (:mod:`metaseg_tf.data.volumes`) and of a 2D slice layout
(:mod:`metaseg_tf.data.discover`) give the same :class:`ExperimentData`; :func:`discover_data` finds which.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.augment import (
    AugmentationSettings,
    fill_sequences,
    random_affine,
    random_gain_offset,
    random_gamma,
    warp_pair,
)
from metaseg_tf.data.context import context_rows, stack_context
from metaseg_tf.data.discover import DataError, DiscoveryReport, discover_pairs
from metaseg_tf.data.preprocess import (
    PreprocessedDataset,
    normalise,
    preprocess_dataset,
    preprocess_volumes,
)
from metaseg_tf.data.layouts import discover_volumes
from metaseg_tf.data.split import PatientSplit, missing_patients, split_for_config
from metaseg_tf.data.synthetic import is_phantom
from metaseg_tf.data.targets import Target, resolve_target
from metaseg_tf.data.volumes import VolumeReport
from metaseg_tf.paths import resolve

logger = logging.getLogger(__name__)


def _area_weights(areas: np.ndarray, case_ids: np.ndarray) -> np.ndarray:
    """``(n,)`` probabilities of ``n`` lesion slices with lesion ``areas`` ``(n,)`` of cases ``case_ids``
    ``(n,)``: each case ``1 / cases``, shared by its slices as ``(a_i + 0.1 mean(a)) / (1.1 sum(a))`` over the
    case's slices (Buda et al.'s PyTorch sampler; see :class:`SegmentationBatches`)."""
    weights = np.empty(len(areas))
    cases = np.unique(case_ids)
    for case in cases:
        rows = case_ids == case
        weights[rows] = (areas[rows] + 0.1 * areas[rows].mean()) / (1.1 * areas[rows].sum()) / len(cases)
    return weights


class SegmentationBatches(keras.utils.PyDataset):
    """Batches of the slices at ``indices`` of ``dataset``.

    With ``training=True`` the order is reshuffled every epoch and, if ``config.augment``, each slice is
    augmented jointly with its mask. With ``config.empty_slice_fraction < 1`` each training epoch draws
    that fraction of the slices without lesion (and every slice with one); with ``config.lesion_slice_repeats =
    k > 1`` every slice with a lesion appears ``k`` times in each training epoch (Buda et al., Comput. Biol. Med.
    2019: tumour slices shown twice), each copy augmented on its own; with ``config.lesion_slice_sampling =
    "area"`` those ``k n`` copies of the ``n`` lesion slices are instead drawn with replacement, after the
    area-proportional sampler of Buda et al.'s PyTorch version (``brain-segmentation-pytorch``): a patient
    uniformly, then one of its lesion slices ``i`` with probability ``(a_i + 0.1 mean(a)) / (1.1 sum(a))`` over
    that patient's lesion slices, ``a_i`` the slice's lesion area in pixels at model resolution (any region of
    the target). Buda et al. weigh every slice of the patient so; here the lesion-free slices are drawn as
    above. The random draws depend only on
    ``(seed, epoch, batch index, position in the batch)``, so batches are reproducible whether or not workers
    fetch them out of order, and a slice is augmented alike whichever process reads it.

    ``shard=(i, n)``: process ``i`` of ``n`` training together (:mod:`metaseg_tf.training.processes`) reads
    rows ``[i b, (i + 1) b)`` of every global batch of ``config.batch_size`` rows, ``b = batch_size / n``, so
    that the ``n`` shards side by side are the one-process batch. A training epoch then has only whole global
    batches (the last ``slices_per_epoch % batch_size`` slices of its shuffled order sit that epoch out:
    :attr:`dropped_per_epoch`); evaluation batches keep every slice and pad the last global batch with
    repeats of its first slice, which come with ``sample_weight`` 0: sharded batches are
    ``(x, y, sample_weight)`` with ``sample_weight float32 (b,)``.
    """

    def __init__(
        self,
        dataset: PreprocessedDataset,
        indices: np.ndarray,
        config: ExperimentConfig,
        training: bool = False,
        seed: int | None = None,
        target_copies: int = 1,
        shard: tuple[int, int] = (0, 1),
        **pydataset_kwargs,
    ) -> None:
        super().__init__(**pydataset_kwargs)
        if len(indices) == 0:
            raise ValueError("no slices to batch: the split part is empty")
        self.shard_index, self.shard_count = shard
        if not 0 <= self.shard_index < self.shard_count or config.batch_size % self.shard_count:
            raise ValueError(f"shard {shard}: the batch size {config.batch_size} must be a multiple of the "
                             f"{self.shard_count} processes, and the shard one of them")
        self.dataset = dataset
        self.indices = np.asarray(indices)
        self.target = resolve_target(config.target, dataset.convention)
        self.rows = (context_rows(dataset.case_ids, dataset.slice_indices, config.context_slices)
                     if config.context_slices else None)
        masks = self.target.masks(dataset.masks[self.indices])  # (n, S, S, R)
        truth = masks.reshape(len(self.indices), masks.shape[1] * masks.shape[2], -1).any(axis=2)  # (n, S S)
        lesion = truth.any(axis=1)
        self.lesion_indices, self.empty_indices = self.indices[lesion], self.indices[~lesion]
        self.lesion_weights = (None if config.lesion_slice_sampling == "uniform" or not lesion.any() else
                               _area_weights(truth[lesion].sum(axis=1, dtype=np.float64),
                                             dataset.case_ids[self.lesion_indices]))
        self.empty_per_epoch = (round(config.empty_slice_fraction * len(self.empty_indices))
                                if training else len(self.empty_indices))
        self.lesion_repeats = config.lesion_slice_repeats if training else 1
        self.batch_size = config.batch_size
        self.normalisation = config.normalisation
        self.training = training
        self.augmentation = AugmentationSettings.from_config(config) if training and config.augment else None
        self.seed = config.seed if seed is None else seed
        self.target_copies = target_copies
        self.epoch = 0
        self._order = self._epoch_order()

    def start_at_epoch(self, epoch: int) -> None:
        """Continue the shuffling sequence at ``epoch`` (used when a training run resumes)."""
        self.epoch = epoch
        self._order = self._epoch_order()

    def __len__(self) -> int:
        if self.shard_count > 1 and self.training:
            return self.slices_per_epoch // self.batch_size
        return math.ceil(self.slices_per_epoch / self.batch_size)

    @property
    def dropped_per_epoch(self) -> int:
        """Slices a sharded training epoch leaves out (those after its last whole global batch)."""
        return self.slices_per_epoch - len(self) * self.batch_size if self.shard_count > 1 and self.training else 0

    @property
    def slices_per_epoch(self) -> int:
        return self.lesion_repeats * len(self.lesion_indices) + self.empty_per_epoch

    def _epoch_order(self) -> np.ndarray:
        if not self.training:
            return self.indices
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.lesion_weights is not None:
            lesion = rng.choice(self.lesion_indices, self.lesion_repeats * len(self.lesion_indices),
                                p=self.lesion_weights)
            empty = rng.choice(self.empty_indices, self.empty_per_epoch, replace=False)
            return rng.permutation(np.concatenate([lesion, empty]))
        if self.empty_per_epoch < len(self.empty_indices) or self.lesion_repeats > 1:
            empty = rng.choice(self.empty_indices, self.empty_per_epoch, replace=False)
            return rng.permutation(np.concatenate([np.tile(self.lesion_indices, self.lesion_repeats), empty]))
        return rng.permutation(self.indices)

    def model_inputs(self, chosen: np.ndarray) -> np.ndarray:
        """``uint8 (B, S, S, input_channels)``: the slices at ``chosen`` with their 2.5D context."""
        return self.dataset.images[chosen] if self.rows is None else stack_context(self.dataset.images,
                                                                                    self.rows[chosen])

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._order = self._epoch_order()

    def __getitem__(self, batch_index: int):
        if not 0 <= batch_index < len(self):
            raise IndexError(f"batch {batch_index} out of range [0, {len(self)})")
        chosen = self._order[batch_index * self.batch_size : (batch_index + 1) * self.batch_size]
        weights = None
        if self.shard_count > 1:
            local = self.batch_size // self.shard_count
            start = self.shard_index * local
            weights = (np.arange(start, start + local) < len(chosen)).astype(np.float32)
            chosen = np.resize(chosen, self.batch_size)[start : start + local]  # padded: repeats, weight 0
            chosen[weights == 0] = self._order[batch_index * self.batch_size]
        x, y = self._batch(batch_index, chosen, first_position=self.shard_index * len(chosen))
        targets = y if self.target_copies == 1 else (y,) * self.target_copies
        return (x, targets) if weights is None else (x, targets, weights)

    def _batch(self, batch_index: int, chosen: np.ndarray, first_position: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """The slices ``chosen`` of batch ``batch_index``, the first at ``first_position`` in the global batch."""
        images = self.model_inputs(chosen)
        labels = self.dataset.masks[chosen]
        if self.augmentation is None:
            return normalise(images, self.normalisation), self.target.masks(labels).astype(np.float32)
        size = images.shape[1]
        x = np.empty(images.shape, np.float32)
        warped_labels = np.empty_like(labels)
        for k in range(len(chosen)):
            rng = np.random.default_rng([self.seed, self.epoch, batch_index, first_position + k])
            image, warped_labels[k] = warp_pair(images[k], labels[k], random_affine(rng, self.augmentation, size))
            image = fill_sequences(image, rng, self.augmentation)
            image = random_gamma(image.astype(np.float32) / 255.0, rng, self.augmentation.intensity_jitter)
            image = normalise(image, self.normalisation)
            x[k] = random_gain_offset(image, rng, self.augmentation.intensity_jitter)
        return x, self.target.masks(warped_labels).astype(np.float32)


def split_batches(
    dataset: PreprocessedDataset, split: PatientSplit, config: ExperimentConfig, **pydataset_kwargs
) -> dict[str, SegmentationBatches]:
    """Training (shuffled, augmented), validation and test batches for the non-empty parts of ``split``."""
    batches = {}
    for part in ("train", "val", "test"):
        indices = split.indices(dataset.case_ids, part)
        if len(indices):
            batches[part] = SegmentationBatches(dataset, indices, config, training=part == "train",
                                                **pydataset_kwargs)
    return batches


@dataclass
class ExperimentData:
    """Everything a run needs from its data folder: the discovery report (slice pairs or volume cases), the
    preprocessed slices and the patient split."""

    report: DiscoveryReport | VolumeReport
    dataset: PreprocessedDataset
    split: PatientSplit

    def target(self, config: ExperimentConfig) -> Target:
        """The config's target in this data's label convention."""
        return resolve_target(config.target, self.dataset.convention)

    def truth(self, config: ExperimentConfig, indices: np.ndarray) -> np.ndarray:
        """``uint8 (n, S, S, regions)`` target masks of the slices at ``indices``."""
        return self.target(config).masks(self.dataset.masks[indices])

    def model_inputs(self, config: ExperimentConfig, indices: np.ndarray) -> np.ndarray:
        """``uint8 (n, S, S, input_channels)``: the slices at ``indices`` with their 2.5D context."""
        if not config.context_slices:
            return self.dataset.images[indices]
        rows = context_rows(self.dataset.case_ids, self.dataset.slice_indices, config.context_slices)
        return stack_context(self.dataset.images, rows[indices])

    def part_sizes(self) -> dict[str, tuple[int, int]]:
        """``{part: (patients, slices)}`` for train, val and test."""
        return {part: (len(cases), len(self.split.indices(self.dataset.case_ids, part)))
                for part, cases in self.split.to_dict().items()}

    def to_dict(self) -> dict:
        """The data report of a run directory: what was found, what was skipped and why, the label
        convention, the volumes' geometry, the split."""
        if isinstance(self.report, VolumeReport):
            found = {"cases_found": len(self.report.cases) + len(self.report.skipped),
                     "slices_used": len(self.dataset),
                     "skipped_at_discovery": {"ignored files": [str(p) for p in self.report.ignored_files]}}
        else:
            found = {"pairs_found": len(self.report.pairs), "pairs_used": len(self.dataset),
                     "skipped_at_discovery": {reason: [str(p) for p in paths]
                                              for reason, paths in self.report.skipped_reasons().items()}}
        return {
            "root": str(self.report.root),
            "layout": self.report.layout,
            "synthetic_phantom": is_phantom(self.report.root),
            **found,
            "skipped_at_reading": self.dataset.skipped,
            "label_convention": self.dataset.convention,
            "geometry": self.dataset.geometry,
            "split": self.split.to_dict(),
            "slices_per_part": {part: sizes[1] for part, sizes in self.part_sizes().items()},
        }


def discover_data(root: Path | str, convention: str | None = None) -> DiscoveryReport | VolumeReport:
    """The volume layout of ``root`` (:func:`~metaseg_tf.data.layouts.discover_volumes`, in the label
    ``convention`` named, else the dataset's), else its 2D slice layout
    (:func:`~metaseg_tf.data.discover.discover_pairs`, which raises :class:`DataError` naming every layout
    tried when there is none)."""
    return discover_volumes(root, convention) or discover_pairs(root)


def load_experiment_data(config: ExperimentConfig, progress: bool = True, split: PatientSplit | None = None,
                         external: bool = False) -> ExperimentData:
    """Discover ``config.data_dir``, preprocess it (or load the cache) and split it by patient: with
    ``split`` (a run's recorded split) that one; with ``external`` every patient is test (an external test
    set is scored whole, never split, whatever the config's k-fold says); else the split the config asks
    for."""
    report = discover_data(resolve(config.data_dir), config.label_convention or None)
    dataset = (preprocess_volumes(report, config, progress=progress) if isinstance(report, VolumeReport)
               else preprocess_dataset(report, config, progress=progress))
    if external:
        split = PatientSplit.only_test(dataset.case_ids)
    return ExperimentData(report, dataset, split or split_for_config(dataset.case_ids, config))


def load_recorded_data(config: ExperimentConfig, recorded: PatientSplit, parts: tuple[str, ...],
                       allow_missing: bool = False, data: ExperimentData | None = None,
                       progress: bool = True) -> tuple[ExperimentData, list[str]]:
    """``config.data_dir`` (or ``data`` already loaded from it) with a run's recorded split, and the patients
    of ``parts`` that the data no longer holds.

    Missing patients stop with a :class:`DataError` naming them, unless ``allow_missing``: then they are left
    out and returned. Patients in the folder that the split does not know are not used (a warning says so).
    """
    data = data or load_experiment_data(config, progress, split=recorded)
    missing = missing_patients(recorded, data.dataset.case_ids, parts)
    if missing and not allow_missing:
        raise DataError(f"{len(missing)} of the run's {'/'.join(parts)} patients are not in {data.report.root} any "
                        f"more ({', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}); the run's split is "
                        "fixed, so the data must still hold them (evaluation can score the rest with "
                        "--allow-missing-patients)")
    unknown = sorted(set(data.dataset.case_ids.tolist()) - {c for part in recorded.to_dict().values() for c in part})
    if unknown:
        logger.warning("%d patient(s) in %s are not in the run's recorded split and are not used: %s",
                       len(unknown), data.report.root, ", ".join(unknown[:5]))
    return ExperimentData(data.report, data.dataset, recorded.without(set(missing))), missing
