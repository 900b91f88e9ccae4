"""Every check an upload passes before it reaches a model, and the service's limits.

Slices: the file type by its content (TIFF, PNG, JPEG, BMP, WebP, DICOM: its middle frame), the byte size, the header's pixel
dimensions and page count, all before a pixel is decoded. Volumes: the byte size while it is written to disk
under a sanitised name, the NIfTI signature, the header's shape (3D, at most ``max_voxels`` voxels) and the
affine, before a voxel is read. DICOM: at most ``max_dicom_files`` files (or the entries of one zip, unpacked by
:func:`~metaseg_tf.data.archives.extract_zip`: no path of the archive is used, a bomb or a path-traversal name
is refused) and ``max_dicom_bytes`` in all, each file starting like DICOM Part 10, before a header is parsed;
the series' voxels are checked from their headers (:func:`~metaseg_tf.data.dicom.series_geometry`). Request bodies: :class:`BodyLimit` refuses one over its limit before (declared
length) or while (chunked) it is received. Every refusal is an :class:`~fastapi.HTTPException` (413, 415 or 422)
whose ``detail`` says what was wrong.
"""

from __future__ import annotations

import io
import math
import re
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, UploadFile
from fastapi.responses import JSONResponse

from metaseg_tf.data.archives import ArchiveTooLarge, extract_zip
from metaseg_tf.data.dicom import is_dicom_bytes
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import JPEG_MAGIC, TIFF_MAGIC, read_image
from metaseg_tf.data.volumes import is_nifti, nifti_stem

# first bytes of each accepted format: TIFF (both byte orders, classic and BigTIFF), PNG, JPEG, BMP, WebP
SIGNATURES = {**dict.fromkeys(TIFF_MAGIC, "tiff"), b"\x89PNG": "png", JPEG_MAGIC: "jpeg", b"BM": "bmp"}
GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr of NIfTI-1 and NIfTI-2, the first 4 bytes (either byte order)


@dataclass(frozen=True)
class ServeSettings:
    """The service's settings: its limits (defaults: 20 MB slice uploads, 4096 px per side; 200 MB and 40
    million voxels per uploaded volume; 1000 DICOM files, Starlette's own limit, and 800 MB per DICOM upload), the engine, the access token and the admission of work
    (:mod:`metaseg_tf.serve.guard`: ``volume_jobs`` volume predictions at once, default from the machine's
    memory and ``max_voxels``; ``slice_jobs`` slices, default the machine's cores; ``queue`` more of each may
    wait; a volume request is answered within ``volume_timeout_s``, a slice request within
    ``slice_timeout_s``). The threshold is each run's own unless a request sets one."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_side_pixels: int = 4096
    max_volume_bytes: int = 200 * 1024 * 1024
    max_voxels: int = 40_000_000
    max_dicom_files: int = 1000  # Starlette parses at most 1000 files per multipart request
    max_dicom_bytes: int = 800 * 1024 * 1024
    engine: str = "keras"  # keras, onnx or openvino (metaseg_tf.inference.engines)
    level: int | None = None  # serve U-Net++ pruned to this level (other architectures whole)
    token: str | None = field(default=None, repr=False)  # None: no access control (loopback, or --no-auth)
    volume_jobs: int | None = None
    slice_jobs: int | None = None
    queue: int = 64
    volume_timeout_s: float = 900.0
    slice_timeout_s: float = 120.0


def file_type(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in SIGNATURES.items() if head.startswith(magic)), None)


def decode_slice_upload(data: bytes, settings: ServeSettings) -> np.ndarray:
    """Validated pixels of an upload as float32 ``(H, W, 3)`` in ``[0, 1]``. The header (Pillow) is read before
    anything is decoded: an image with several pages or frames, more than ``max_side_pixels`` a side, or a
    header that Pillow itself calls a decompression bomb is refused, so one request decodes at most one
    ``max_side_pixels`` square image, whatever its file size."""
    from PIL import Image

    if not data:
        raise HTTPException(422, "the uploaded file is empty")
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"the upload is larger than the limit of {settings.max_upload_bytes} bytes")
    if is_dicom_bytes(data):
        return _decode_dicom_slice(data, settings)
    kind = file_type(data[:16])
    if kind is None:
        raise HTTPException(415, "not a supported image: send a TIFF, PNG, JPEG, BMP or WebP slice")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            frames = getattr(header, "n_frames", 1)  # pages of a TIFF, frames of an animated PNG/WebP
    except Image.DecompressionBombError:
        raise HTTPException(413, f"the image is too large: its header declares more pixels than the limit of "
                                 f"{settings.max_side_pixels} px a side") from None
    except Exception:  # Pillow raises several types for headers it cannot parse
        raise HTTPException(422, f"cannot read the {kind.upper()} header: the file is damaged") from None
    if frames > 1:
        raise HTTPException(422, f"the {kind.upper()} holds {frames} pages or frames; send one 2D slice")
    if max(width, height) > settings.max_side_pixels:
        raise HTTPException(413, f"the image is {width}x{height} px; the limit is {settings.max_side_pixels} px a side")
    try:
        return read_image(data, channels=3)
    except DataError as error:
        raise HTTPException(422, f"cannot decode the {kind.upper()} upload ({error}); is it truncated?") from None


def _decode_dicom_slice(data: bytes, settings: ServeSettings) -> np.ndarray:
    """A DICOM slice upload (its middle frame when it has several) as ``read_image`` reads it, after its header's
    size was checked against ``max_side_pixels``."""
    import pydicom

    try:
        header = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        rows, columns = int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)
        frames = int(header.get("NumberOfFrames", 1) or 1)
    except Exception:  # pydicom raises several types for headers it cannot parse
        raise HTTPException(422, "cannot read the DICOM header: the file is damaged") from None
    if max(rows, columns) > settings.max_side_pixels or rows * columns * frames > settings.max_side_pixels ** 2:
        raise HTTPException(413, f"the image is {columns}x{rows} px x {frames} frame(s); the limit is "
                                 f"{settings.max_side_pixels} px a side and as many pixels in all frames together")
    try:
        return read_image(data, channels=3)
    except DataError as error:
        raise HTTPException(422, f"cannot use the DICOM upload: {error}") from None


def upload_name(filename: str | None, gzipped: bool, fallback: str) -> str:
    """A safe file name for an upload: the client's base name (never its folders) reduced to letters, digits,
    ``.``, ``_`` and ``-``, with ``.nii.gz`` or ``.nii`` after its content (gzip or not)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    stem = nifti_stem(Path(base)) if is_nifti(Path(base)) else base.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")[:100] or fallback
    return stem + (".nii.gz" if gzipped else ".nii")


def nifti_signature(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a NIfTI-1 or NIfTI-2 file, plain or gzip-compressed."""
    if head[:2] == GZIP_MAGIC:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4)
        except zlib.error:
            return False
    return len(head) >= 4 and any(int.from_bytes(head[:4], order) in NIFTI_HEADER_SIZES for order in ("little", "big"))


def save_volume_upload(upload: UploadFile, folder: Path, role: str, settings: ServeSettings) -> Path:
    """Write one NIfTI upload into ``folder`` under a safe name, after checking that it is not empty, starts
    like a NIfTI file and stays within ``max_volume_bytes``."""
    head = upload.file.read(64 * 1024)
    if not head:
        raise HTTPException(422, f"the {role} upload is empty")
    if not nifti_signature(head):
        raise HTTPException(415, f"the {role} upload is not a NIfTI volume: send a .nii or .nii.gz file")
    folder.mkdir(parents=True)
    path = folder / upload_name(upload.filename, head[:2] == GZIP_MAGIC, folder.name)
    total = 0
    with path.open("wb") as out:
        while head:
            total += len(head)
            if total > settings.max_volume_bytes:
                raise HTTPException(413, f"the {role} upload is larger than the limit of {settings.max_volume_bytes} "
                                         "bytes per volume")
            out.write(head)
            head = upload.file.read(1024 * 1024)
    return path


def _copy_limited(upload: UploadFile, head: bytes, path: Path, budget: int) -> int:
    """Write ``head`` and the rest of ``upload`` to ``path``; 413 once more than ``budget`` bytes came."""
    total = 0
    with path.open("wb") as out:
        while head:
            total += len(head)
            if total > budget:
                raise HTTPException(413, "the DICOM upload is larger than its limit in bytes")
            out.write(head)
            head = upload.file.read(1024 * 1024)
    return total


def save_dicom_uploads(uploads: list[UploadFile], folder: Path, settings: ServeSettings) -> Path:
    """DICOM files (several), or one zip of them, written under numbered names into ``folder/series`` (its
    name becomes the case id) after the checks of the module docstring; returns that folder."""
    if not uploads:
        raise HTTPException(422, "no file uploaded")
    if len(uploads) > settings.max_dicom_files:
        raise HTTPException(413, f"{len(uploads)} files; the limit is {settings.max_dicom_files} per DICOM upload")
    series = folder / "series"
    budget = settings.max_dicom_bytes
    heads = [upload.file.read(132) for upload in uploads]
    if len(uploads) == 1 and heads[0].startswith(ZIP_MAGIC):
        folder.mkdir(parents=True, exist_ok=True)
        _copy_limited(uploads[0], heads[0], folder / "upload.zip", budget)
        try:
            return extract_zip(folder / "upload.zip", series, settings.max_dicom_files, budget)
        except ArchiveTooLarge as error:
            raise HTTPException(413, str(error)) from None
        except DataError as error:
            raise HTTPException(422, str(error)) from None
    series.mkdir(parents=True)
    for number, (upload, head) in enumerate(zip(uploads, heads), start=1):
        if not is_dicom_bytes(head):
            kind = "a zip (send a zip alone)" if head.startswith(ZIP_MAGIC) else "not a DICOM file"
            raise HTTPException(415, f"upload {number} of {len(uploads)} is {kind}: send DICOM Part 10 files "
                                     "(DICM at byte 128) or one zip of them")
        budget -= _copy_limited(upload, head, series / f"{number:05d}.dcm", budget)
    return series


def volume_grid(path: Path, role: str, settings: ServeSettings) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel grid (3D shape, affine) of a saved upload, from its header alone (nibabel reads the voxels
    lazily): a volume that is not 3D, has more than ``max_voxels`` voxels or voxels that are not real numbers
    (complex, RGB) is refused before it is read."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape, affine = tuple(int(n) for n in image.shape), np.asarray(image.affine, np.float64)
    except Exception:  # nibabel raises several types for headers it cannot parse
        raise HTTPException(422, f"cannot read the NIfTI header of the {role}: the file is damaged") from None
    dtype = image.get_data_dtype()
    if dtype.kind not in "biuf":  # complex, or RGB / structured voxels: not an MRI intensity
        kind = "complex-valued" if dtype.kind == "c" else f"{dtype} (not scalar)"
        raise HTTPException(422, f"the {role} holds {kind} voxels; send the magnitude image as real numbers")
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        several = " (several volumes in one file: send one 3D file per sequence)" if len(shape) == 4 else ""
        raise HTTPException(422, f"the {role} has shape {shape}: a 3D volume is expected{several}")
    voxels = math.prod(shape)
    if voxels == 0 or not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise HTTPException(422, f"the {role} has an empty grid or an invalid affine (shape {shape}; the voxel axes "
                                 "must map to three independent directions)")
    if voxels > settings.max_voxels:
        raise HTTPException(413, f"the {role} has {voxels} voxels ({'x'.join(map(str, shape))}); the limit is "
                                 f"{settings.max_voxels} voxels per volume")
    return shape, affine


class BodyLimit:
    """ASGI middleware: 413 with a JSON ``detail`` for a request body over ``limit`` bytes (``path_limits``:
    another limit for the paths named there), from the declared Content-Length before anything is read, or,
    for a body sent without one (chunked), as soon as the bytes received pass the limit, so no upload is
    spooled beyond it."""

    def __init__(self, app: Any, limit: int, path_limits: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.path_limits = app, limit, dict(path_limits or {})

    @staticmethod
    def _too_large(limit: int) -> HTTPException:
        return HTTPException(413, f"the upload is larger than the limit of {limit} bytes")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": self._too_large(limit).detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # raised inside the body parser: FastAPI answers it as this 413
                raise self._too_large(limit)
            return message

        await self.app(scope, counted, send)
