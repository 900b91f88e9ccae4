"""The geometry and voxels of a DICOM series (:mod:`metaseg_tf.data.dicom` finds the series): each frame's
image plane (DICOM PS3.3 C.7.6.2: ``ImagePositionPatient``, ``ImageOrientationPatient``, ``PixelSpacing``, in
classic files or the functional groups of enhanced and legacy-converted multi-frame MR images), the frames
sorted along the slice normal (never by ``InstanceNumber``), the affine from LPS to NIfTI's RAS, the rescale,
and one frame for the 2D models. Every check is made from the headers before a pixel is decoded; what fails
one is a :class:`~metaseg_tf.data.discover.DataError` in one line (see :mod:`metaseg_tf.data.dicom`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from metaseg_tf.data.dicom import (DICOM_EXTENSIONS, MIN_VOLUME_FRAMES, ORIENTATION_TOLERANCE, SECONDARY_CAPTURE,
                                   SPACING_TOLERANCE, DicomSeries, read_header, integer_value)
from metaseg_tf.data.discover import DataError


@dataclass(frozen=True)
class Frame:
    """One 2D frame of a series: where it comes from (file, frame index in that file) and its plane."""

    path: Path
    index: int
    position: tuple[float, float, float]
    orientation: tuple[float, ...]
    spacing: tuple[float, float]
    slope: float
    intercept: float


@dataclass(frozen=True)
class SeriesGeometry:
    """A series' frames sorted along the slice normal, its affine (voxel ``(column, row, slice)`` -> RAS mm,
    NIfTI's convention) and its shape ``(columns, rows, slices)``."""

    frames: tuple[Frame, ...]
    affine: np.ndarray
    shape: tuple[int, int, int]


def _item(group, sequence: str, attribute: str):
    """``attribute`` of the first item of ``sequence`` inside a functional-groups item, or None."""
    items = group.get(sequence) if group is not None else None
    return items[0].get(attribute) if items else None


def _numbers(value, count: int, what: str) -> tuple[float, ...]:
    """A multi-valued DS header value as ``count`` finite floats; :class:`DataError` otherwise."""
    try:
        numbers = tuple(float(v) for v in ([value] if isinstance(value, (str, bytes, int, float)) else list(value)))
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not all(math.isfinite(v) for v in numbers):
        raise DataError(f"{what} is {value!r}: {count} finite numbers are expected")
    return numbers


def _frames_of(path: Path, header) -> list[Frame]:
    """The frames of one file with their planes: a classic image has one, an enhanced or legacy-converted
    multi-frame image one per item of its per-frame functional groups (shared groups filling in); malformed
    or non-finite geometry, a pixel spacing not above 0 and direction cosines that are not two orthogonal unit
    vectors are a :class:`DataError`."""
    count = integer_value(header.get("NumberOfFrames"), 1)
    per_frame = header.get("PerFrameFunctionalGroupsSequence")
    shared = header.get("SharedFunctionalGroupsSequence")
    shared = shared[0] if shared else None
    frames = []
    for index in range(count):
        item = per_frame[index] if per_frame is not None and index < len(per_frame) else None

        def value(sequence: str, attribute: str, default=None):
            found = _item(item, sequence, attribute)
            found = _item(shared, sequence, attribute) if found is None else found
            return header.get(attribute, default) if found is None else found

        where = f"{path.name}, frame {index + 1}"
        position, orientation = value("PlanePositionSequence", "ImagePositionPatient"), \
            value("PlaneOrientationSequence", "ImageOrientationPatient")
        spacing = value("PixelMeasuresSequence", "PixelSpacing")
        if position is None or orientation is None or spacing is None:
            raise DataError(f"{where} has no ImagePositionPatient, ImageOrientationPatient or PixelSpacing: its place "
                            "in the patient is unknown")
        position = _numbers(position, 3, f"{where}: ImagePositionPatient")
        orientation = _numbers(orientation, 6, f"{where}: ImageOrientationPatient")
        spacing = _numbers(spacing, 2, f"{where}: PixelSpacing")
        row, column = np.array(orientation[:3]), np.array(orientation[3:])
        if min(spacing) <= 0 or abs(np.linalg.norm(row) - 1) > ORIENTATION_TOLERANCE or \
                abs(np.linalg.norm(column) - 1) > ORIENTATION_TOLERANCE or abs(row @ column) > ORIENTATION_TOLERANCE:
            raise DataError(f"{where}: PixelSpacing {spacing} or ImageOrientationPatient {orientation} is not a valid "
                            "image plane (spacings above 0, two orthogonal unit directions)")
        slope = value("PixelValueTransformationSequence", "RescaleSlope", 1.0)
        intercept = value("PixelValueTransformationSequence", "RescaleIntercept", 0.0)
        slope = 1.0 if slope in (None, "") else _numbers(slope, 1, f"{where}: RescaleSlope")[0]
        intercept = 0.0 if intercept in (None, "") else _numbers(intercept, 1, f"{where}: RescaleIntercept")[0]
        frames.append(Frame(path, index, position, orientation, (spacing[0], spacing[1]), slope, intercept))
    return frames


def series_geometry(series: DicomSeries, max_voxels: int | None = None) -> SeriesGeometry:
    """The frames of ``series`` sorted along the normal and its affine, from the headers alone; every check of
    the module docstring, and ``max_voxels`` (columns x rows x frames), before any pixel is decoded."""
    problem = series.problem()
    if problem:
        raise DataError(f"series {series.label} is {problem}")
    try:
        headers = [(path, read_header(path)) for path in series.files]
        sizes = {(integer_value(h.get("Rows"), 0), integer_value(h.get("Columns"), 0)) for _, h in headers}
    except Exception as error:  # pydicom raises many types for damaged files and malformed values
        raise DataError(f"series {series.label}: a file cannot be read again ({type(error).__name__})") from error
    if len(sizes) != 1:
        raise DataError(f"series {series.label} mixes frame sizes {sorted(sizes)}: one volume needs one size")
    rows, columns = sizes.pop()
    if max_voxels is not None and rows * columns * series.frames > max_voxels:
        raise DataError(f"series {series.label} has {rows}x{columns}x{series.frames} = {rows * columns * series.frames} "
                        f"voxels; the limit is {max_voxels}")
    try:
        frames = [frame for path, header in headers for frame in _frames_of(path, header)]
    except DataError:
        raise
    except Exception as error:  # malformed functional groups or values: pydicom raises many types
        raise DataError(f"series {series.label}: malformed image-plane attributes ({type(error).__name__})") from error
    if max_voxels is not None and rows * columns * len(frames) > max_voxels:
        raise DataError(f"series {series.label} has {rows}x{columns}x{len(frames)} voxels; the limit is {max_voxels}")
    if len(frames) < MIN_VOLUME_FRAMES:
        raise DataError(f"series {series.label} has {len(frames)} frame(s); a volume needs at least {MIN_VOLUME_FRAMES}")
    orientation = np.array(frames[0].orientation)
    if any(not np.allclose(f.orientation, orientation, atol=ORIENTATION_TOLERANCE) for f in frames):
        raise DataError(f"series {series.label} mixes image orientations: its frames are not one stack")
    if any(not np.allclose(f.spacing, frames[0].spacing, rtol=1e-4, atol=1e-4) for f in frames):
        raise DataError(f"series {series.label} mixes pixel spacings")
    row_direction, column_direction = orientation[:3], orientation[3:]
    normal = np.cross(row_direction, column_direction)
    positions = np.array([f.position for f in frames])
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    frames = [frames[k] for k in order]
    positions, along = positions[order], along[order]
    steps = np.diff(along)
    if (steps < 1e-3).any():
        k = int(np.flatnonzero(steps < 1e-3)[0])
        raise DataError(f"series {series.label}: two frames at one position ({along[k]:.2f} mm along the normal; "
                        f"{frames[k].path.name} and {frames[k + 1].path.name}): several echoes or time points in one "
                        "series, or a duplicate file")
    step = float(np.median(steps))
    uneven = np.abs(steps - step) > SPACING_TOLERANCE * step + 0.01
    if uneven.any():
        k = int(np.flatnonzero(uneven)[0])
        raise DataError(f"series {series.label}: uneven slice spacing between frames {k + 1} and {k + 2} of "
                        f"{len(frames)} (at {along[k]:.2f} and {along[k + 1]:.2f} mm along the normal: a step of "
                        f"{steps[k]:.2f} mm where the others are {step:.2f} mm): a missing slice?")
    in_plane = positions - positions[0] - np.outer(along - along[0], normal)
    if np.abs(in_plane).max() > max(0.05 * step, 0.01):
        raise DataError(f"series {series.label}: its frames do not stack along their normal (shifted in-plane by "
                        f"up to {np.abs(in_plane).max():.2f} mm: a tilted gantry?); resample it first")
    row_spacing, column_spacing = frames[0].spacing  # PixelSpacing: between rows, then between columns
    lps = np.eye(4)
    lps[:3, 0] = row_direction * column_spacing  # voxel axis 0: the column index, along a row
    lps[:3, 1] = column_direction * row_spacing  # voxel axis 1: the row index, down a column
    lps[:3, 2] = (positions[-1] - positions[0]) / (len(frames) - 1)
    lps[:3, 3] = positions[0]
    affine = np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps  # DICOM's LPS -> NIfTI's RAS
    return SeriesGeometry(tuple(frames), affine, (columns, rows, len(frames)))


def _pixels(path: Path, cache: dict) -> np.ndarray:
    """The decoded frames of one file ``(frames, rows, columns)``; a multi-frame file's are kept in ``cache``
    for its next frames (a single frame is not: the series is not held twice in memory)."""
    import pydicom

    if path not in cache:
        try:
            dataset = pydicom.dcmread(str(path), force=path.suffix.lower() in DICOM_EXTENSIONS)
            if "PixelData" not in dataset and "FloatPixelData" not in dataset:
                raise DataError(f"{path.name} holds no pixel data")
            pixels = dataset.pixel_array
        except DataError:
            raise
        except Exception as error:  # pydicom and its plugins raise several types for data they cannot decode
            raise DataError(f"cannot decode the pixels of {path.name}: {error}") from error
        if int(dataset.get("SamplesPerPixel", 1) or 1) != 1:
            raise DataError(f"{path.name} is a colour image ({dataset.get('PhotometricInterpretation')}), not an MR "
                            "magnitude image")
        if pixels.ndim == 2:
            return pixels[None]
        cache[path] = pixels
    return cache[path]


def read_series(series: DicomSeries, max_voxels: int | None = None):
    """``series`` as a ``nibabel.Nifti1Image``: ``float32`` voxels ``(columns, rows, slices)`` with the rescale
    applied, and the RAS affine of :func:`series_geometry`; :class:`DataError` for what cannot be read."""
    import nibabel as nib

    geometry = series_geometry(series, max_voxels)
    cache: dict = {}
    data = np.empty(geometry.shape, np.float32)
    for k, frame in enumerate(geometry.frames):
        pixels = _pixels(frame.path, cache)
        if frame.index >= len(pixels):
            raise DataError(f"{frame.path.name} declares more frames than its pixel data holds")
        data[:, :, k] = (pixels[frame.index].astype(np.float32) * frame.slope + frame.intercept).T
    image = nib.Nifti1Image(data, geometry.affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(geometry.affine, code=1)
    image.set_sform(geometry.affine, code=1)
    return image


def _rescale(dataset, index: int) -> tuple[float, float]:
    """Frame ``index``'s rescale slope and intercept: its functional groups' (multi-frame), else the dataset's."""
    per_frame = dataset.get("PerFrameFunctionalGroupsSequence")
    shared = dataset.get("SharedFunctionalGroupsSequence")
    item = per_frame[index] if per_frame is not None and index < len(per_frame) else None
    values = []
    for attribute, default in (("RescaleSlope", 1.0), ("RescaleIntercept", 0.0)):
        found = _item(item, "PixelValueTransformationSequence", attribute)
        found = _item(shared[0] if shared else None, "PixelValueTransformationSequence", attribute) \
            if found is None else found
        found = dataset.get(attribute) if found is None else found
        values.append(default if found in (None, "") else _numbers(found, 1, attribute)[0])
    return values[0], values[1]


def read_dicom_slice(source: Path | bytes, frame: int | None = None) -> tuple[np.ndarray, int]:
    """One 2D frame of a DICOM file (a path or its bytes) for the 2D models, and the file's frame count:
    ``float32 (rows, columns)`` with the rescale applied (``frame``: which one, default the middle one of a
    multi-frame file; only that frame is decoded)."""
    import io

    import pydicom
    from pydicom.pixels import pixel_array

    name = "the uploaded DICOM file" if isinstance(source, bytes) else Path(source).name
    try:
        dataset = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes) else str(source), force=True)
        count = integer_value(dataset.get("NumberOfFrames"), 1)
        samples = integer_value(dataset.get("SamplesPerPixel"), 1)
    except Exception as error:  # pydicom raises several types for files it cannot parse
        raise DataError(f"not a readable DICOM file: {name} ({type(error).__name__})") from error
    if SECONDARY_CAPTURE.fullmatch(str(dataset.get("SOPClassUID", ""))):
        raise DataError(f"{name} is a secondary capture (a picture of an image), not an MR acquisition")
    if "PixelData" not in dataset and "FloatPixelData" not in dataset:
        raise DataError(f"{name} holds no pixel data")
    if samples != 1:
        raise DataError(f"{name} is a colour image, not an MR magnitude image")
    chosen = count // 2 if frame is None else frame
    if not 0 <= chosen < max(count, 1):
        raise DataError(f"{name} has {count} frame(s); there is no frame {chosen}")
    try:
        pixels = pixel_array(dataset, index=chosen if count > 1 else None)
        slope, intercept = _rescale(dataset, chosen)
    except DataError:
        raise
    except Exception as error:  # pydicom and its plugins raise several types for data they cannot decode
        raise DataError(f"cannot decode the pixels of {name}: {error}") from error
    if pixels.ndim != 2:
        raise DataError(f"{name}: frame {chosen} has shape {pixels.shape}, not a 2D image")
    return pixels.astype(np.float32) * slope + intercept, count
