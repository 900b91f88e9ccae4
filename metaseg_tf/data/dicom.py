"""DICOM MR input: the series of a folder (or a zip) and which sequence each one is; their geometry and
voxels, in the same canonical orientation as a NIfTI volume (:mod:`metaseg_tf.data.volumes`), are
:mod:`metaseg_tf.data.dicom_planes`.

**Series.** Files are recognised by their content (``DICM`` at byte 128; a ``.dcm``/``.ima`` file without
the preamble is read too) and grouped by ``SeriesInstanceUID``; only the headers are read
(``stop_before_pixels``). Each series is mapped to a sequence name (``t1c``, ``t1n``, ``t2f``, ``t2w``) from
the tokens of its ``SeriesDescription`` and ``ProtocolName`` (:func:`sequence_of_text`: FLAIR -> ``t2f``, but a
T1 FLAIR is a T1; T1 with ``post``/``gd``/``+c``/``contrast``/``ce`` -> ``t1c``, unless ``pre``, ``w/o``,
``without``, ``non`` ... says otherwise; other T1 (MPRAGE, SPGR) -> ``t1n``; T2 -> ``t2w``),
or as the user names it (``--series t1c=UID_or_text``: the series whose ``SeriesInstanceUID`` is that, or whose
description or protocol contains that text). Two series that claim a sequence the model reads are refused with
their names, never chosen between silently (two series of a sequence it does not read are left unused).
:meth:`DicomScan.lines` reports every series found and what it was used for.

**Geometry** (:mod:`metaseg_tf.data.dicom_planes`; DICOM PS3.3 C.7.6.2, the Image Plane module): each frame's
``ImagePositionPatient``, ``ImageOrientationPatient`` and ``PixelSpacing`` (classic single-frame files, or the per-frame and shared
functional groups of an enhanced or legacy-converted multi-frame MR file). Frames are sorted by their position
along the slice normal ``row direction x column direction``, never by ``InstanceNumber``. The affine maps voxel
``(column, row, slice)`` to LPS millimetres, then to NIfTI's RAS (x and y negated), so the volume goes through
:func:`~metaseg_tf.data.volumes.to_canonical` like any NIfTI. ``RescaleSlope``/``RescaleIntercept`` are applied.

**Refused with one line** (:class:`~metaseg_tf.data.discover.DataError`): no pixel data, a secondary capture or
another non-MR object, frames of mixed sizes, orientations or pixel spacings, two frames at one position,
frames that do not stack along their normal (gantry tilt), uneven spacing or a gap (where it is said), a
DICOMDIR without the files it lists, a series over the voxel limit (checked from the headers, before a pixel is
decoded). Compressed transfer syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through the pylibjpeg plugins.

Series of one ``FrameOfReferenceUID`` on different grids are resampled onto the first sequence's when a case is
read (:func:`~metaseg_tf.data.volumes.read_case`). No patient identifier (name, id, birth date) is read into a
case id, a log line or a report: a case is named after its folder.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from metaseg_tf.data.discover import DataError

logger = logging.getLogger(__name__)

MR_STORAGE = {"1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
              "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
              "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage"}
DICOMDIR_CLASS = "1.2.840.10008.1.3.10"
SECONDARY_CAPTURE = re.compile(r"1\.2\.840\.10008\.5\.1\.4\.1\.1\.7(\.[1-4])?")  # SC, and its multi-frame kinds
DICOM_EXTENSIONS = (".dcm", ".dicom", ".ima")
ORIENTATION_TOLERANCE = 1e-3  # direction cosines of one series agree to this
SPACING_TOLERANCE = 0.02  # slice steps may differ by this fraction of the median step (plus 0.01 mm)
MIN_VOLUME_FRAMES = 3

_CONTRAST_TOKENS = {"post", "postcontrast", "gd", "gad", "gado", "gadolinium", "contrast", "ce", "c", "t1c", "t1ce",
                    "t1gd", "t1post", "t1wce", "mprage+c"}
_PRE_TOKENS = {"pre", "precontrast", "native", "nativ", "t1n", "t1pre", "wo", "without", "non", "noncontrast",
               "before", "unenhanced", "plain"}
_T1_TOKENS = {"t1", "t1w", "t1wi", "t1n", "t1pre", "t1native", "mprage", "spgr", "bravo", "tfl", "t1c", "t1ce",
              "t1gd", "t1post", "t1wce"}
_FLAIR_TOKENS = {"flair", "t2f", "t2flair", "darkfluid"}
_T2_TOKENS = {"t2", "t2w", "t2wi", "t2tse", "tse"}


def sequence_of_text(text: str) -> str | None:
    """The BraTS 2023 sequence name a series description or protocol name stands for (see the module
    docstring), or None: ``"AX T1 POST GD"`` -> ``t1c``, ``"AX T1 W/O GAD"`` and ``"t1_mprage_sag"`` -> ``t1n``,
    ``"T2 FLAIR AX"`` -> ``t2f``, ``"AX T1 FLAIR POST"`` -> ``t1c``, ``"T2W TSE"`` -> ``t2w``, ``"DWI b1000"`` -> None."""
    lower = text.lower()
    tokens = {t for t in re.split(r"[^a-z0-9]+", lower) if t}
    if tokens & _FLAIR_TOKENS and not tokens & _T1_TOKENS:  # a T1-weighted FLAIR is a T1
        return "t2f"
    contrast = bool(tokens & _CONTRAST_TOKENS) or bool(re.search(r"\+\s*(c|gd|gad|contrast)\b", lower))
    if tokens & _PRE_TOKENS or re.search(r"\bw\s*/\s*o\b", lower):
        contrast = False
    if tokens & _T1_TOKENS:
        return "t1c" if contrast else "t1n"
    if tokens & _T2_TOKENS:
        return "t2w"
    return None


# --- finding series ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class DicomSeries:
    """One series: its ``SeriesInstanceUID``, ``StudyInstanceUID``, number, description (``SeriesDescription``,
    else ``ProtocolName``), SOP class, its files (as found; :func:`series_geometry` sorts the frames), the
    number of frames and the pixel size of the first file."""

    uid: str
    study: str
    number: int | None
    description: str
    protocol: str
    sop_class: str
    files: tuple[Path, ...]
    frames: int
    rows: int
    columns: int
    localizer: bool = False
    frame_of_reference: str = ""

    @property
    def sequence(self) -> str | None:
        return sequence_of_text(self.description) or sequence_of_text(self.protocol)

    @property
    def label(self) -> str:
        number = f"#{self.number} " if self.number is not None else ""
        return f"{number}'{self.description or self.protocol or '(no description)'}'"

    def problem(self) -> str | None:
        """Why this series cannot be a volume of an MR sequence, or None."""
        if SECONDARY_CAPTURE.fullmatch(self.sop_class):
            return "a secondary capture (a picture of an image, without geometry), not an MR acquisition"
        if self.sop_class not in MR_STORAGE:
            return f"not an MR image (SOP class {self.sop_class})"
        if self.localizer:
            return "a localizer"
        return None


@dataclass
class DicomScan:
    """The DICOM series under ``root`` and every file that was not used, with the reason."""

    root: Path
    series: list[DicomSeries] = field(default_factory=list)
    ignored: dict[Path, str] = field(default_factory=dict)

    def lines(self, chosen: dict[str, DicomSeries] | None = None) -> list[str]:
        """One line per series: number, description, SOP class, frames and pixel size, what it maps to and,
        with ``chosen`` (sequence -> series), whether it was used."""
        used = {series.uid: name for name, series in (chosen or {}).items()}
        lines = []
        for series in self.series:
            problem = series.problem()
            kind = MR_STORAGE.get(series.sop_class, series.sop_class)
            role = (f"used as {used[series.uid]}" if series.uid in used else f"not used: {problem}" if problem
                    else f"looks like {series.sequence}" + (", not used" if chosen is not None else "")
                    if series.sequence else "no sequence recognised in its description")
            lines.append(f"series {series.label} ({kind}, {series.frames} frame(s) of {series.rows}x{series.columns}, "
                         f"uid {series.uid}): {role}")
        return lines


def is_dicom_file(path: Path) -> bool:
    """Whether ``path`` holds a DICOM Part 10 file (``DICM`` at byte 128) or is named as one."""
    try:
        with path.open("rb") as handle:
            head = handle.read(132)
    except OSError:
        return False
    return is_dicom_bytes(head) or path.suffix.lower() in DICOM_EXTENSIONS


def is_dicom_bytes(raw: bytes) -> bool:
    """Whether ``raw`` (a file's first 132 bytes or more) starts a DICOM Part 10 file: ``DICM`` at byte 128."""
    return raw[128:132] == b"DICM"


def read_header(path: Path):
    import pydicom

    return pydicom.dcmread(str(path), stop_before_pixels=True, force=path.suffix.lower() in DICOM_EXTENSIONS)


def integer_value(value, default: int) -> int:
    """An IS header value as an int (``default`` when absent); :class:`ValueError` for anything malformed."""
    return default if value in (None, "") else int(float(str(value)))


def _file_summary(path: Path) -> tuple[str, dict] | str:
    """``(SeriesInstanceUID, what the series needs of this file)``, or why the file is not used."""
    header = read_header(path)
    sop_class = str(getattr(header, "file_meta", {}).get("MediaStorageSOPClassUID", "") or header.get("SOPClassUID", ""))
    if sop_class == DICOMDIR_CLASS or path.name.upper() == "DICOMDIR":
        return "a DICOMDIR (an index of files; the files themselves are read)"
    if "SeriesInstanceUID" not in header:
        return "no SeriesInstanceUID"
    frames = integer_value(header.get("NumberOfFrames"), 1)
    if frames < 1:
        return f"NumberOfFrames {frames}"
    image_type = header.get("ImageType") or []
    image_type = [image_type] if isinstance(image_type, str) else list(image_type)
    return str(header.SeriesInstanceUID), {
        "study": str(header.get("StudyInstanceUID", "")), "number": integer_value(header.get("SeriesNumber"), -1),
        "description": str(header.get("SeriesDescription", "") or ""), "protocol": str(header.get("ProtocolName", "") or ""),
        "sop_class": str(header.get("SOPClassUID", "")), "frames": frames, "rows": integer_value(header.get("Rows"), 0),
        "columns": integer_value(header.get("Columns"), 0), "localizer": "LOCALIZER" in [str(v).upper() for v in image_type],
        "frame_of_reference": str(header.get("FrameOfReferenceUID", ""))}


def scan_dicom(root: Path | str, max_files: int | None = None) -> DicomScan:
    """Every DICOM series under ``root`` (a folder, searched recursively, or one file), headers only; files that
    are not DICOM or not usable (unreadable, malformed header values) go to ``ignored`` with the reason.
    ``max_files``: refuse a folder with more DICOM files than that before reading any."""
    root = Path(root)
    paths = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file()
                                                 and not any(part.startswith(".") for part in p.relative_to(root).parts))
    scan = DicomScan(root)
    candidates = [p for p in paths if is_dicom_file(p)]
    chosen = set(candidates)
    scan.ignored.update({p: "not a DICOM file" for p in paths if p not in chosen})
    if max_files is not None and len(candidates) > max_files:
        raise DataError(f"{len(candidates)} DICOM files: more than the limit of {max_files}")
    groups: dict[str, list[tuple[Path, dict]]] = {}
    dicomdir = False
    for path in candidates:
        try:
            summary = _file_summary(path)
        except Exception as error:  # pydicom raises many types for damaged files and malformed values
            scan.ignored[path] = f"not a readable DICOM file ({type(error).__name__})"
            continue
        if isinstance(summary, str):
            dicomdir = dicomdir or summary.startswith("a DICOMDIR")
            scan.ignored[path] = summary
            continue
        groups.setdefault(summary[0], []).append((path, summary[1]))
    for uid, members in groups.items():
        first = members[0][1]
        scan.series.append(DicomSeries(
            uid=uid, study=first["study"], number=first["number"] if first["number"] >= 0 else None,
            description=first["description"], protocol=first["protocol"], sop_class=first["sop_class"],
            files=tuple(path for path, _ in members), frames=sum(summary["frames"] for _, summary in members),
            rows=first["rows"], columns=first["columns"], localizer=first["localizer"],
            frame_of_reference=first["frame_of_reference"]))
    scan.series.sort(key=lambda s: (s.study, s.number if s.number is not None else math.inf, s.uid))
    if dicomdir and not scan.series:
        raise DataError(f"{root.name} holds a DICOMDIR but none of the image files it lists: copy the whole folder "
                        "the DICOMDIR came in")
    return scan


def choose_series(scan: DicomScan, named: dict[str, str] | None = None,
                  needed: tuple[str, ...] | None = None) -> dict[str, DicomSeries]:
    """Sequence name -> series: the user's ``named`` choices (sequence -> a SeriesInstanceUID, or text that
    one series' description or protocol contains), then every other usable series by its description
    (:func:`sequence_of_text`). ``needed``: the sequences a model reads (None: all); only those are returned,
    and only two series claiming one of them is refused (two T2 series do not stop a model that reads no T2).
    :class:`DataError` when a named choice matches no series or several, or for such a conflict."""
    chosen: dict[str, DicomSeries] = {}
    for name, wanted in (named or {}).items():
        matches = [s for s in scan.series if s.uid == wanted] or \
                  [s for s in scan.series if wanted.lower() in f"{s.description} {s.protocol}".lower()]
        if len(matches) != 1:
            found = "; ".join(series.label for series in matches) if matches else "none"
            raise DataError(f"--series {name}={wanted}: {len(matches)} series match ({found}); give a "
                            "SeriesInstanceUID or a text only one series description holds")
        problem = matches[0].problem()
        if problem:
            raise DataError(f"--series {name}={wanted}: series {matches[0].label} is {problem}")
        chosen[name] = matches[0]
    taken = {series.uid for series in chosen.values()}
    claims: dict[str, list[DicomSeries]] = {}
    for series in scan.series:
        if series.problem() is None and series.uid not in taken and series.sequence and series.sequence not in chosen:
            claims.setdefault(series.sequence, []).append(series)
    for name, series in claims.items():
        if len(series) > 1:
            if needed is None or name in needed:
                raise DataError(f"{len(series)} series look like {name}: {'; '.join(s.label for s in series)}; name "
                                f"the one to use with --series {name}=UID_or_text")
            continue
        chosen[name] = series[0]
    return chosen if needed is None else {name: chosen[name] for name in needed if name in chosen}


def dicom_frame_count(path: Path) -> int:
    """How many frames a DICOM file holds (its header's ``NumberOfFrames``; 1 when absent)."""
    try:
        return max(integer_value(read_header(path).get("NumberOfFrames"), 1), 1)
    except Exception:  # an unreadable file is reported when its pixels are read
        return 1
