"""Brain-metastasis datasets as they are published: multi-sequence volumes and their label maps.

The published layouts and how they are found are :mod:`metaseg_tf.data.layouts`; this module holds what
they share: sequence names, the files of a case (:class:`CaseFiles`) and its arrays (:class:`CaseVolume`),
reading and orientation; the intensity window (:mod:`metaseg_tf.data.intensity`) is part of reading a volume:
every reader of a case, the web app's viewer included, gets the same ``[0, 1]`` intensities.

Sequence names follow BraTS 2023: ``t1c`` (T1 post-contrast), ``t1n`` (T1 native), ``t2f`` (T2-FLAIR),
``t2w`` (T2-weighted). A case that lacks a requested sequence is skipped and reported, or, when the config
asks (``fill_missing``), filled with zeros or with the first requested sequence it has. Nothing is dropped
silently: :class:`VolumeReport` lists every skipped case and ignored file with the reason.

**Canonical orientation.** Every volume is read into one voxel order, whatever its affine, at training and
prediction alike: ``(slice, row, column)`` with slices from inferior to superior, rows from anterior to
posterior and columns from the patient's right to left (axis codes ``S P L``: an axial slice shown as a
radiologist sees it). :func:`to_canonical` / :func:`from_canonical` reorient with nibabel's orientation
tools from the affine (never by assuming the third array axis is axial), and predictions go back to the
input's own voxel grid.

**Intensities** are windowed per volume and per sequence: the 0.5th-99.5th percentile of the brain (the
non-zero finite voxels) maps to ``[0, 1]`` (NaN-safe: non-finite voxels are counted and become 0).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from metaseg_tf.data.dicom import DicomSeries
from metaseg_tf.data.dicom_planes import read_series
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.intensity import window_volume
from metaseg_tf.data.io import read_image, read_mask_labels
from metaseg_tf.data.targets import LABEL_CONVENTIONS, REGION_LABELS, unknown_labels

SEQUENCE_NAMES = ("t1c", "t1n", "t2f", "t2w", "t1c_se")  # every name a layout can give a sequence
DEFAULT_SEQUENCES = ("t1c", "t2f", "t1n")
SEQUENCE_ALIASES = {
    "t1c": ("t1c", "t1ce", "t1gd", "t1post", "t1wce", "ce"),
    "t1n": ("t1n", "t1", "t1pre", "t1w", "t1native"),
    "t2f": ("t2f", "flair", "t2flair"),
    "t2w": ("t2w", "t2"),
}
CANONICAL_AXCODES = ("S", "P", "L")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
BRATS_SUFFIXES = ("t1c", "t1n", "t2f", "t2w")
# the label convention of each layout unless its files say otherwise (metaseg_tf.data.layouts decides per dataset)
LAYOUT_CONVENTIONS = {"msd": "msd", "brats_mets": "brats", "brats2021": "brats2021", "brainmetshare": "binary",
                      "generic": "brats", "dicom": "brats"}
GRID_TOLERANCE_MM = 0.01  # two volumes share a grid when their shapes agree and their affines within this

logger = logging.getLogger(__name__)


def is_nifti(path: Path) -> bool:
    return path.name.lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: Path) -> str:
    """``case-t1c.nii.gz`` -> ``case-t1c`` (a name without a NIfTI suffix is returned whole)."""
    name = path.name
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def case_name(path: Path) -> str:
    """The case a sequence file given by itself belongs to: its name without the NIfTI suffix and without a
    last token that names a sequence (``BraTS-MET-00110-000-t1c.nii.gz`` -> ``BraTS-MET-00110-000``,
    ``BraTS2021_00000_flair.nii.gz`` -> ``BraTS2021_00000``; ``case.nii.gz`` stays ``case``), so what is
    written for it is named as the case is."""
    stem = nifti_stem(path)
    match = re.fullmatch(r"(.+?)[_\-. ]+([A-Za-z0-9]+)", stem)
    aliases = {alias for names in SEQUENCE_ALIASES.values() for alias in names}
    return match[1] if match and match[2].lower() in aliases else stem


def name_tokens(path: Path) -> list[str]:
    return [t for t in re.split(r"[_\-. ]+", nifti_stem(path).lower()) if t]


def sequence_of(path: Path) -> str | None:
    """The BraTS 2023 sequence name a file's name stands for (see the module docstring), or None."""
    tokens = name_tokens(path)
    for name, aliases in SEQUENCE_ALIASES.items():
        if any(token in aliases for token in tokens):
            return name
    return None


# A source of one sequence: a NIfTI file, a channel of a 4D NIfTI file, a stack of 2D slice files, or a DICOM
# series (``series``, a :class:`~metaseg_tf.data.dicom.DicomSeries`; ``path``: the folder it was found in).
@dataclass(frozen=True)
class SequenceSource:
    path: Path
    channel: int | None = None
    slice_files: tuple[Path, ...] = ()
    series: DicomSeries | None = None


@dataclass
class CaseFiles:
    """One case of a volume layout: where each sequence and the labels are (``labels`` None: no
    segmentation, prediction only; ``region_masks``: WT/TC/ET masks to combine, generic layout), and the label
    ``convention`` of its dataset (:mod:`metaseg_tf.data.targets`), which its labels are read in."""

    case_id: str
    sequences: dict[str, SequenceSource]
    labels: SequenceSource | None = None
    region_masks: dict[str, Path] = field(default_factory=dict)
    convention: str = "brats"

    @property
    def labelled(self) -> bool:
        return self.labels is not None or bool(self.region_masks)


@dataclass
class VolumeReport:
    """The cases found under ``root`` in one layout, and what was not used, with the reason; ``convention``:
    the label convention of the whole dataset (default: the layout's, :data:`LAYOUT_CONVENTIONS`), which
    every case is read in (:meth:`with_convention`), and what decided it (``convention_source``)."""

    root: Path
    layout: str
    cases: list[CaseFiles]
    skipped: dict[str, str] = field(default_factory=dict)
    ignored_files: list[Path] = field(default_factory=list)
    convention: str = ""
    convention_source: str = "layout"

    def __post_init__(self) -> None:
        self.convention = self.convention or LAYOUT_CONVENTIONS[self.layout]
        self.with_convention(self.convention, self.convention_source)

    def with_convention(self, convention: str, source: str) -> VolumeReport:
        """Set the label convention of the dataset and of each of its cases (``source``: what decided it)."""
        if convention not in LABEL_CONVENTIONS:
            raise DataError(f"unknown label convention {convention!r}; known: {', '.join(LABEL_CONVENTIONS)}")
        self.convention, self.convention_source = convention, source
        for case in self.cases:
            case.convention = convention
        return self

    @property
    def case_ids(self) -> list[str]:
        return [case.case_id for case in self.cases]

    @property
    def labelled_cases(self) -> list[CaseFiles]:
        return [case for case in self.cases if case.labelled]

    def summary_line(self) -> str:
        sequences = sorted({name for case in self.cases for name in case.sequences})
        return (f"{self.root}: layout {self.layout}, {len(self.cases)} cases ({len(self.labelled_cases)} with "
                f"labels), sequences {', '.join(sequences) or 'none'}; skipped {len(self.skipped)} cases; "
                f"ignored {len(self.ignored_files)} other files")

    def select(self, sequences: tuple[str, ...], fill_missing: str = "skip") -> VolumeReport:
        """The cases that have every one of ``sequences`` (or, with ``fill_missing`` ``zeros`` / ``repeat``,
        at least one of them); the others are moved to ``skipped`` with the sequences they lack."""
        unknown = [name for name in sequences if name not in SEQUENCE_NAMES]
        if unknown:
            raise DataError(f"unknown sequence name(s) {', '.join(unknown)}; the layouts name them "
                            f"{', '.join(SEQUENCE_NAMES)} (see metaseg_tf.data.volumes)")
        kept, skipped = [], dict(self.skipped)
        for case in self.cases:
            lacking = [name for name in sequences if name not in case.sequences]
            has_any = len(lacking) < len(sequences)
            if lacking and (fill_missing == "skip" or not has_any):
                skipped[case.case_id] = (f"missing sequence(s) {', '.join(lacking)} (has "
                                         f"{', '.join(sorted(case.sequences)) or 'none'})")
            else:
                kept.append(case)
        return VolumeReport(self.root, self.layout, kept, skipped, self.ignored_files, self.convention,
                            self.convention_source)


# --- orientation ------------------------------------------------------------------------------------
def _orientation_transform(affine: np.ndarray, inverse: bool = False) -> np.ndarray:
    from nibabel import orientations

    source, target = orientations.io_orientation(affine), orientations.axcodes2ornt(CANONICAL_AXCODES)
    return orientations.ornt_transform(target, source) if inverse else orientations.ornt_transform(source, target)


def to_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Voxels ``(X, Y, Z[, ...])`` in the file's order -> ``(slice, row, column[, ...])`` in the canonical
    orientation (``S P L``, see the module docstring), from the affine's closest axis directions."""
    from nibabel import orientations

    return np.ascontiguousarray(orientations.apply_orientation(data, _orientation_transform(affine)))


def from_canonical(data: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The inverse of :func:`to_canonical`: canonical ``(slice, row, column[, ...])`` -> the file's voxel order."""
    from nibabel import orientations

    return np.ascontiguousarray(orientations.apply_orientation(data, _orientation_transform(affine, inverse=True)))


def canonical_shape(shape: tuple[int, ...], affine: np.ndarray) -> tuple[int, int, int]:
    """A 3D grid's ``(slices, rows, columns)`` in the canonical orientation, from its shape in file order and
    its affine (as :func:`to_canonical` would reorder its voxels)."""
    order = _orientation_transform(affine)[:, 0].astype(int)  # file axis i goes to canonical axis order[i]
    sizes = [0, 0, 0]
    for axis in range(3):
        sizes[order[axis]] = int(shape[axis])
    return sizes[0], sizes[1], sizes[2]


def canonical_spacing(affine: np.ndarray) -> tuple[float, float, float]:
    """Voxel size in mm along the canonical ``(slice, row, column)`` axes."""
    from nibabel import affines

    sizes = affines.voxel_sizes(affine)
    order = _orientation_transform(affine)[:, 0].astype(int)  # file axis i goes to canonical axis order[i]
    spacing = np.empty(3)
    spacing[order[:3]] = sizes[:3]
    return float(spacing[0]), float(spacing[1]), float(spacing[2])


def axial_axis(affine: np.ndarray) -> int:
    """The file's voxel axis that points superior/inferior in world space."""
    return int(np.flatnonzero(_orientation_transform(affine)[:, 0] == 0)[0])


# --- reading ------------------------------------------------------------------------------------------
@dataclass
class CaseVolume:
    """One case in canonical orientation: ``images`` ``float32 (Z, H, W, C)`` windowed to ``[0, 1]`` (one
    channel per requested sequence), ``labels`` ``uint8 (Z, H, W)`` or None, ``spacing`` in mm per canonical
    axis (``None``: unknown, slice images), the reference image whose affine and header predictions are
    written with (None for slice images), and what was repaired on the way."""

    case_id: str
    images: np.ndarray
    labels: np.ndarray | None
    spacing: tuple[float, float, float] | None
    reference: object | None = None
    non_finite_voxels: int = 0
    filled: list[str] = field(default_factory=list)


def load_nifti(path: Path):
    import nibabel as nib

    try:
        image = nib.load(str(path))
    except Exception as error:  # nibabel raises several types for broken or truncated files
        raise DataError(f"cannot read NIfTI {path}: {error}") from error
    return image


def _read_slice_stack(files: tuple[Path, ...], labels: bool) -> np.ndarray:
    slices = [read_mask_labels(f).labels if labels else read_image(f, 1)[..., 0] for f in files]
    if len({s.shape for s in slices}) != 1:
        raise DataError(f"the slices of {files[0].parent} differ in size")
    return np.stack(slices)


def _read_source(source: SequenceSource, labels: bool = False, onto: object | None = None
                 ) -> tuple[np.ndarray, object | None]:
    """The source's voxels in canonical orientation ``(Z, H, W)`` and its NIfTI image (None: slice files; a DICOM
    series as the NIfTI image of its voxels and geometry, :func:`~metaseg_tf.data.dicom.read_series`). ``onto``:
    a NIfTI image whose grid a DICOM series of the same frame of reference is resampled onto (trilinear), when
    its own grid differs."""
    if source.slice_files:
        return _read_slice_stack(source.slice_files, labels), None
    image = read_series(source.series) if source.series is not None else load_nifti(source.path)
    if onto is not None and (image.shape[:3] != onto.shape[:3] or
                             not np.allclose(image.affine, onto.affine, rtol=0, atol=GRID_TOLERANCE_MM)):
        from nibabel.processing import resample_from_to

        logger.warning("series %s resampled (trilinear) onto the first sequence's grid %s", source.series.label,
                       "x".join(map(str, onto.shape[:3])))
        image = resample_from_to(image, (onto.shape[:3], onto.affine), order=1)
    data = np.asarray(image.dataobj) if labels else image.get_fdata(dtype=np.float32)
    if source.channel is not None:
        if data.ndim != 4 or source.channel >= data.shape[3]:
            raise DataError(f"{source.path} has shape {data.shape}: no channel {source.channel}")
        data = data[..., source.channel]
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise DataError(f"{source.path} has shape {data.shape}; a 3D volume is expected")
    return to_canonical(data, image.affine), image


def _label_map(data: np.ndarray, name: str, convention: str) -> np.ndarray:
    """Stored labels -> ``uint8`` labels of ``convention``: integers in 0..255 as they are (a seg holding only
    ET, 3, stays ET), except that a binary mask collapses to 0/1: any non-zero value in the ``binary``
    convention, and a 0/255 mask in any; a soft float mask is lesion (1) above 0.5."""
    data = np.asarray(data)
    if not (np.issubdtype(data.dtype, np.integer) or data.dtype == np.bool_):
        data = np.nan_to_num(data.astype(np.float64))
        if not np.array_equal(data, np.round(data)) and data.min() >= 0 and data.max() <= 1.0:
            return (data > 0.5).astype(np.uint8)
        if not np.array_equal(data, np.round(data)):
            raise DataError(f"{name}: labels must be integers in 0..255, got values in [{data.min()}, {data.max()}]")
    if data.size and (data.min() < 0 or data.max() > 255):
        raise DataError(f"{name}: labels must lie in 0..255, got values in [{data.min()}, {data.max()}]")
    labels = data.astype(np.uint8)
    values = np.unique(labels[labels > 0]) if labels.any() else np.zeros(0, np.uint8)
    if convention == "binary" or values.tolist() == [255]:
        return (labels > 0).astype(np.uint8)
    return labels


def read_case(case: CaseFiles, sequences: tuple[str, ...], fill_missing: str = "skip",
              with_labels: bool = True) -> CaseVolume:
    """Read ``sequences`` of ``case`` (and its labels) into a :class:`CaseVolume`; every volume must share
    one voxel grid, except DICOM series of one frame of reference (``FrameOfReferenceUID``: one scanner session's
    coordinates), which are resampled onto the first sequence's grid (trilinear, with a warning), as they come
    from PACS. Raises :class:`DataError` naming the file and the reason."""
    channels: list[np.ndarray | None] = []
    reference, non_finite, filled, read, grids = None, 0, [], {}, {}
    first_series = None
    for name in sequences:
        source = case.sequences.get(name)
        if source is None:
            if fill_missing == "skip":
                raise DataError(f"case {case.case_id} has no {name} sequence")
            channels.append(None)
            filled.append(name)
            continue
        if source not in read:  # one file may fill several channels: read (and count) it once
            onto = None
            if source.series is not None and first_series is not None and reference is not None and \
                    source.series.frame_of_reference and \
                    source.series.frame_of_reference == first_series.frame_of_reference:
                onto = reference
            data, image = _read_source(source, onto=onto)
            first_series = first_series or source.series
            windowed, bad = window_volume(data)
            read[source] = windowed
            non_finite += bad
            reference = reference or image
            grids[name] = (windowed.shape, None if image is None else image.affine)
        windowed = read[source]
        channels.append(windowed)
    present = [c for c in channels if c is not None]
    if not present:
        raise DataError(f"case {case.case_id} has none of the sequences {', '.join(sequences)}")
    check_one_grid(grids, case.case_id)
    fill = np.zeros_like(present[0]) if fill_missing != "repeat" else present[0]
    images = np.stack([fill if c is None else c for c in channels], axis=-1)
    labels = None
    if with_labels and case.labelled:
        labels, label_affine = _case_labels(case)
        check_one_grid({**grids, "labels": (labels.shape, label_affine)}, case.case_id)
    spacing = canonical_spacing(reference.affine) if reference is not None else None
    return CaseVolume(case.case_id, images, labels, spacing, reference, non_finite, filled)


def check_one_grid(grids: dict[str, tuple[tuple[int, ...], np.ndarray | None]], case_id: str = "") -> None:
    """:class:`DataError` unless every volume of ``grids`` (name -> shape, affine or None) has the first one's
    shape and, where known, affine within :data:`GRID_TOLERANCE_MM`: volumes of one shape on different affines
    would be reoriented differently and silently misaligned. Used for a case's files and for uploads alike."""
    prefix = f"case {case_id}: " if case_id else ""
    (first, (shape, affine)), *others = grids.items()
    for name, (other_shape, other_affine) in others:
        if other_shape != shape:
            raise DataError(f"{prefix}{name} is {other_shape} voxels but {first} {shape}; every volume must be "
                            "co-registered on one voxel grid")
        if affine is not None and other_affine is not None and \
                not np.allclose(other_affine, affine, rtol=0, atol=GRID_TOLERANCE_MM):
            raise DataError(f"{prefix}{name} has another affine than {first} (up to "
                            f"{np.abs(other_affine - affine).max():.3g} apart); every volume must be co-registered "
                            "on one voxel grid")


def _case_labels(case: CaseFiles) -> tuple[np.ndarray, np.ndarray | None]:
    if case.labels is not None:
        data, image = _read_source(case.labels, labels=True)
        labels = _label_map(data, str(case.labels.path), case.convention)
        unknown = unknown_labels(labels, case.convention)
        if unknown:
            logger.warning("case %s: label(s) %s (%s voxels) are not in the %s convention and belong to no region",
                           case.case_id, ", ".join(map(str, unknown)), ", ".join(map(str, unknown.values())),
                           case.convention)
        return labels, None if image is None else image.affine
    labels, affine = None, None
    for region in ("wt", "tc", "et"):  # innermost last: TC inside WT, ET inside TC
        if region in case.region_masks:
            data, image = _read_source(SequenceSource(case.region_masks[region]), labels=True)
            labels = np.zeros(data.shape, np.uint8) if labels is None else labels
            check_one_grid({"the first region mask": (labels.shape, affine),
                            f"the {region} mask": (data.shape, image.affine)}, case.case_id)
            affine = image.affine
            labels[_label_map(data, str(case.region_masks[region]), "binary") > 0] = \
                REGION_LABELS[case.convention][region]
    if labels is None:
        raise DataError(f"case {case.case_id} has no labels")
    return labels, affine


def read_case_labels(case: CaseFiles) -> np.ndarray:
    """``uint8 (Z, H, W)`` labels of a labelled case in canonical orientation, in the case's convention: its
    label map (:func:`_label_map`; labels outside the convention are kept, with a warning), or its WT / TC /
    ET masks combined into one label map (innermost region last)."""
    return _case_labels(case)[0]


def resolve_sequences(sequences: tuple[str, ...], channels: int) -> tuple[str, ...]:
    """A config's sequences, or (none given) the first ``channels`` of :data:`DEFAULT_SEQUENCES`."""
    return tuple(sequences) or DEFAULT_SEQUENCES[:channels]
