"""One experiment configuration: every setting of a run lives in :class:`ExperimentConfig`.

The dataclass is flat on purpose (one place to look, one JSON/YAML file per run). Groups of fields are
separated by comments: data, preprocessing, split, augmentation, model, training, inference. Functions that
need only a few settings still take the whole config, so that a run directory's ``config.json`` is enough to
redo any step. A ``config.json`` written before a field existed reads with that field's default.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from metaseg_tf import paths

MODEL_NAMES = ("unet", "nested_unet", "attention_unet")
LOSS_NAMES = ("bce", "dice", "dice_batch", "bce_dice", "focal", "tversky", "focal_tversky")
NORMALISATIONS = ("zscore", "minmax", "none")
OPTIMIZERS = ("adam", "adamw", "sgd")
LR_SCHEDULES = ("constant", "plateau", "cosine")
AUTO_SWITCH = ("auto", "on", "off")
REGION_TARGETS = ("any", "wt", "tc", "et", "multilabel")  # or "labels:1,3" (any label set)
# the label conventions of metaseg_tf.data.targets (its LABEL_CONVENTIONS; a test keeps the two equal)
LABEL_CONVENTION_NAMES = ("brats", "brats_post", "brats2021", "msd", "binary")
FILL_RULES = ("skip", "zeros", "repeat")
# settings of how a trained model's probabilities become masks: evaluation and prediction, never training
INFERENCE_FIELDS = ("flip_tta", "min_lesion_voxels", "keep_lesions", "threshold_from_validation")
KEEP_LESIONS = ("all", "largest", "persistent")  # metaseg_tf.inference.postprocess says what each keeps
LESION_SLICE_SAMPLING = ("uniform", "area")  # metaseg_tf.data.batches.SegmentationBatches says what each draws


class ConfigError(ValueError):
    """A configuration value is missing, unknown or out of range."""


@dataclass
class ExperimentConfig:
    """All settings of one experiment.

    Image tensors follow Keras' channels-last convention: a batch is ``(batch, image_size, image_size,
    input_channels)`` with ``input_channels = channels * (2 * context_slices + 1)``, and a target batch
    ``(batch, image_size, image_size, output_channels)`` (1, or 3 regions for ``target="multilabel"``).
    """

    # --- data ------------------------------------------------------------------------------------
    data_dir: str = paths.PHANTOM_DIR
    cache_dir: str = paths.CACHE_DIR
    channels: int = 3
    # volume layouts (BraTS-METS, MSD, BrainMetShare, generic NIfTI): which sequences, in channel order
    # (empty: the first ``channels`` of t1c, t2f, t1n); ``channels`` follows
    sequences: tuple[str, ...] = ()
    fill_missing: str = "skip"  # a case without a requested sequence: skip it, or fill it with zeros / repeat
    # what the model segments: "any" non-zero label (2D masks as today), a region "wt" / "tc" / "et" in the
    # dataset's label convention, "labels:1,3" (any label set), or "multilabel" (one sigmoid per region)
    target: str = "any"
    # the label convention of a volume dataset (brats, brats_post, brats2021, msd, binary; empty: decided
    # from the dataset, metaseg_tf.data.layouts) and how case ids group into patients for the split (a
    # regular expression whose first group is the patient; empty: BraTS ids by patient, else one per case)
    label_convention: str = ""
    patient_pattern: str = ""
    context_slices: int = 0  # 2.5D: k neighbouring slices on each side of every sequence as extra channels
    empty_slice_fraction: float = 1.0  # fraction of lesion-free training slices drawn each epoch
    lesion_slice_repeats: int = 1  # each training epoch shows every slice with a lesion this many times (Buda et al.: 2)
    lesion_slice_sampling: str = "uniform"  # or "area": those copies drawn in proportion to the lesion's area

    # --- preprocessing (every field here changes the preprocessing cache key) ---------------------
    image_size: int = 128
    clahe: bool = True
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: int = 8
    normalisation: str = "zscore"

    # --- patient-level split -------------------------------------------------------------------------
    split_seed: int = 42
    test_fraction: float = 0.2
    val_fraction: float = 0.2
    n_folds: int = 0
    fold: int = 0

    # --- joint image/mask augmentation (training batches only) -----------------------------------
    augment: bool = True
    rotation_degrees: float = 15.0
    zoom_range: float = 0.1
    horizontal_flip: bool = True
    vertical_flip: bool = False
    intensity_jitter: float = 0.1
    # missing-sequence fill: a training slice's sequences all become sequence `sequence_fill_channel` (e.g. 1, the
    # FLAIR of the Kaggle LGG set) with this probability (metaseg_tf.data.augment.fill_sequences)
    sequence_fill_probability: float = 0.0
    sequence_fill_channel: int = 1

    # --- model ---------------------------------------------------------------------------------------
    model: str = "nested_unet"
    filters: tuple[int, ...] = (16, 32, 64, 128, 256)
    deep_supervision: bool = True
    # U-Net++ deep supervision: the loss weights of heads head_1 .. head_depth (shallowest first), normalised to
    # sum 1; () weighs them equally, as Zhou et al. (2018) average the heads' losses
    deep_supervision_weights: tuple[float, ...] = ()
    init_from: str = ""  # a run folder whose trained weights start this training (metaseg_tf.training.transfer)

    # --- training ------------------------------------------------------------------------------------
    loss: str = "bce_dice"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    lr_schedule: str = "plateau"
    warmup_epochs: int = 0
    early_stopping_patience: int = 10
    epochs: int = 30
    batch_size: int = 16
    seed: int = 0
    max_train_minutes: float = 0.0
    mixed_precision: str = "auto"
    jit_compile: str = "auto"
    devices: int = 1
    backend: str = "tensorflow"

    # --- inference: from probabilities to masks (evaluation and prediction; training ignores them) -----
    threshold: float = 0.5
    flip_tta: bool = False  # average the probabilities with those of the horizontally flipped slice
    min_lesion_voxels: int = 0  # drop predicted lesions (3D components per case) smaller than this
    keep_lesions: str = "all"  # then keep all, the largest, or those over >= 2 neighbouring slices (persistent)
    threshold_from_validation: bool = False  # evaluation: the threshold that scores best on the validation patients

    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        try:
            self.filters = tuple(int(f) for f in self.filters)
            self.deep_supervision_weights = tuple(float(w) for w in self.deep_supervision_weights)
        except (TypeError, ValueError):
            raise ConfigError(f"filters and deep_supervision_weights take lists of numbers, got {self.filters!r} "
                              f"and {self.deep_supervision_weights!r}") from None
        self.sequences = tuple(str(s).lower() for s in self.sequences)
        if self.sequences:
            self.channels = len(self.sequences)
        self.validate()

    @property
    def input_channels(self) -> int:
        """Channels the model reads: every sequence (or image channel) at the slice and its 2.5D neighbours."""
        return self.channels * (2 * self.context_slices + 1)

    @property
    def output_channels(self) -> int:
        """One sigmoid output per region: 3 (WT, TC, ET) for ``multilabel``, else 1."""
        return 3 if self.target == "multilabel" else 1

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the first invalid field."""
        for setting in dataclasses.fields(self):
            if isinstance(setting.default, bool) and not isinstance(getattr(self, setting.name), bool):
                raise ConfigError(f"{setting.name} must be true or false, got {getattr(self, setting.name)!r}")
        if not self.sequences and self.channels not in (1, 3):
            raise ConfigError(f"channels must be 1 or 3 (or follow sequences), got {self.channels}")
        if len(set(self.sequences)) != len(self.sequences):
            raise ConfigError(f"sequences must be distinct, got {self.sequences}")
        if self.fill_missing not in FILL_RULES:
            raise ConfigError(f"fill_missing must be one of {FILL_RULES}, got {self.fill_missing!r}")
        if self.label_convention and self.label_convention not in LABEL_CONVENTION_NAMES:
            raise ConfigError(f"label_convention must be one of {', '.join(LABEL_CONVENTION_NAMES)} (or empty: "
                              f"decided from the dataset), got {self.label_convention!r}")
        try:
            re.compile(self.patient_pattern)
        except re.error as error:
            raise ConfigError(f"patient_pattern is not a regular expression: {error}") from None
        if self.target not in REGION_TARGETS and not re.fullmatch(r"labels:\d+(,\d+)*", self.target):
            raise ConfigError(f"target must be one of {', '.join(REGION_TARGETS)} or labels:1,3 (a label set), "
                              f"got {self.target!r}")
        if not 0 <= self.context_slices <= 8:
            raise ConfigError(f"context_slices must lie in [0, 8], got {self.context_slices}")
        if not 0 < self.empty_slice_fraction <= 1:
            raise ConfigError(f"empty_slice_fraction must lie in (0, 1], got {self.empty_slice_fraction}")
        if not 0 <= self.sequence_fill_probability <= 1:
            raise ConfigError(f"sequence_fill_probability must lie in [0, 1], got {self.sequence_fill_probability}")
        if self.sequence_fill_probability and not 0 <= self.sequence_fill_channel < self.channels:
            raise ConfigError(f"sequence_fill_channel must name one of the {self.channels} sequences (0 to "
                              f"{self.channels - 1}), got {self.sequence_fill_channel}")
        if self.keep_lesions not in KEEP_LESIONS:
            raise ConfigError(f"keep_lesions must be one of {', '.join(KEEP_LESIONS)}, got {self.keep_lesions!r}")
        if not 1 <= self.lesion_slice_repeats <= 8:
            raise ConfigError(f"lesion_slice_repeats must lie in [1, 8], got {self.lesion_slice_repeats}")
        weights = self.deep_supervision_weights
        if weights and (len(weights) != len(self.filters) - 1 or min(weights) < 0 or not sum(weights) > 0
                        or not all(math.isfinite(weight) for weight in weights)):
            raise ConfigError(f"deep_supervision_weights must give one weight >= 0 per U-Net++ head "
                              f"({len(self.filters) - 1} for {len(self.filters)} filter levels), not all 0, "
                              f"got {list(weights)}")
        if self.lesion_slice_sampling not in LESION_SLICE_SAMPLING:
            raise ConfigError(f"lesion_slice_sampling must be one of {', '.join(LESION_SLICE_SAMPLING)}, got "
                              f"{self.lesion_slice_sampling!r}")
        if self.image_size < 16 or self.image_size % 16:
            raise ConfigError(f"image_size must be a multiple of 16 and >= 16, got {self.image_size}")
        if self.clahe_clip_limit <= 0 or self.clahe_tile_grid < 1:
            raise ConfigError("clahe_clip_limit must be > 0 and clahe_tile_grid >= 1")
        if self.normalisation not in NORMALISATIONS:
            raise ConfigError(f"normalisation must be one of {NORMALISATIONS}, got {self.normalisation!r}")
        if not 0 <= self.test_fraction < 1 or not 0 <= self.val_fraction < 1:
            raise ConfigError("test_fraction and val_fraction must lie in [0, 1)")
        if self.n_folds == 1 or self.n_folds < 0:
            raise ConfigError(f"n_folds must be 0 (no k-fold) or >= 2, got {self.n_folds}")
        if self.n_folds and not 0 <= self.fold < self.n_folds:
            raise ConfigError(f"fold must lie in [0, {self.n_folds}), got {self.fold}")
        if not 0 <= self.zoom_range < 1:
            raise ConfigError(f"zoom_range must lie in [0, 1), got {self.zoom_range}")
        if self.batch_size < 1 or self.epochs < 0:
            raise ConfigError("batch_size must be >= 1 and epochs >= 0")
        if self.model not in MODEL_NAMES:
            raise ConfigError(f"unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.loss not in LOSS_NAMES:
            raise ConfigError(f"unknown loss {self.loss!r}; choose one of {', '.join(LOSS_NAMES)}")
        if self.optimizer not in OPTIMIZERS:
            raise ConfigError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise ConfigError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.learning_rate <= 0 or self.warmup_epochs < 0 or self.early_stopping_patience < 0:
            raise ConfigError("learning_rate must be > 0; warmup_epochs and early_stopping_patience >= 0")
        if not 0 < self.threshold < 1:
            raise ConfigError(f"threshold must lie in (0, 1), got {self.threshold}")
        if self.min_lesion_voxels < 0:
            raise ConfigError(f"min_lesion_voxels must be >= 0, got {self.min_lesion_voxels}")
        for name in ("mixed_precision", "jit_compile"):
            if getattr(self, name) not in AUTO_SWITCH:
                raise ConfigError(f"{name} must be one of {AUTO_SWITCH}, got {getattr(self, name)!r}")
        if self.devices < 1 or self.max_train_minutes < 0:
            raise ConfigError("devices must be >= 1 and max_train_minutes >= 0 (0: no limit)")

    # --- serialisation -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["filters"] = list(self.filters)
        data["deep_supervision_weights"] = list(self.deep_supervision_weights)
        data["sequences"] = list(self.sequences)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExperimentConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(unknown)}")
        return cls(**data)

    def replace(self, **changes: Any) -> ExperimentConfig:
        """A copy with ``changes`` applied (validated like a new config)."""
        return self.from_dict({**self.to_dict(), **changes})

    def save(self, path: str | Path) -> Path:
        """Write the config as JSON (``.json``) or YAML (``.yml``/``.yaml``)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix in (".yml", ".yaml"):
            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExperimentConfig:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        text = path.read_text()
        data = yaml.safe_load(text) if path.suffix in (".yml", ".yaml") else json.loads(text)
        if not isinstance(data, dict):
            raise ConfigError(f"{path} does not hold a mapping of config fields")
        return cls.from_dict(data)

    # --- inference ------------------------------------------------------------------------------------
    def inference_settings(self) -> dict[str, Any]:
        """How this config turns probabilities into masks: its :data:`INFERENCE_FIELDS`."""
        return {name: getattr(self, name) for name in INFERENCE_FIELDS}

    def with_inference(self, inference: dict[str, Any] | None) -> ExperimentConfig:
        """A copy with the inference settings ``inference`` (only :data:`INFERENCE_FIELDS`; e.g.
        ``{"flip_tta": True}``: an inference ablation without retraining) applied; others are a
        :class:`ConfigError`."""
        unknown = sorted(set(inference or {}) - set(INFERENCE_FIELDS))
        if unknown:
            raise ConfigError(f"not inference settings: {', '.join(unknown)}; choose from {', '.join(INFERENCE_FIELDS)}")
        return self.replace(**inference) if inference else self

    # --- identity ------------------------------------------------------------------------------------
    def preprocessing_key(self) -> str:
        """Short hash of the fields that change preprocessed arrays (the cache key's config part)."""
        fields = ("channels", "image_size", "clahe", "clahe_clip_limit", "clahe_tile_grid", "sequences",
                  "fill_missing", "label_convention")
        payload = json.dumps({name: getattr(self, name) for name in fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:12]
