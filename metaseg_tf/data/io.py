"""Read slices and masks of any common format into arrays with a known shape and range.

* :func:`read_image` -> ``float32`` array ``(H, W, channels)`` in ``[0, 1]``. Integer images are divided by
  their type's maximum (255 for 8-bit, 65535 for 16-bit); float images are min-max scaled; a DICOM file (its
  middle frame, rescaled) is windowed as volumes are, its non-zero pixels' 0.5th-99.5th percentiles to 0 and 1. Colour order is
  the file's channel order (RGB: for the LGG set, pre-contrast, FLAIR, post-contrast).
* :func:`read_mask` -> ``uint8`` array ``(H, W)`` holding only 0 and 1: **any non-zero value is lesion**, so
  0/1, 0/255, 16-bit 0/255 or 0/65535 masks and label maps (BraTS-style 1/2/3) all keep their lesions.
  The one exception is JPEG, a lossy format whose compression leaves small non-zero values around every
  edge: JPEG masks are lesion where they reach half their own maximum (so 0/1 and 0/255 JPEGs both work).
  Float masks: integral values are labels; soft values in ``[0, 1]`` are lesion above 0.5. Colour masks are
  lesion where any colour channel is.
* :func:`read_mask_labels` -> the labels as stored (0 = background; binary masks as 0/1) and the name of
  the encoding that was seen (``binary 0/255``, ``label map``, ``lossy JPEG``...), for summaries and for
  multi-label targets.
* :func:`read_pair` reads both and checks that their sizes agree.

Every failure raises :class:`~metaseg_tf.data.discover.DataError` with the file name and the reason; the
callers that walk a whole dataset turn those into counted, reported skips.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import tifffile

from metaseg_tf.data.dicom import DICOM_EXTENSIONS, is_dicom_bytes
from metaseg_tf.data.discover import DataError, SlicePair

# Decoding failures are reported by our own DataError; OpenCV's console warnings would only add noise.
cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_SILENT)


ImageSource = str | Path | bytes
TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")
JPEG_MAGIC = b"\xff\xd8\xff"


def _decode_tiff(raw: bytes, name: str) -> np.ndarray | None:
    """TIFF pixels as stored (tifffile keeps 1-bit and MINISWHITE masks as written), or None when tifffile
    cannot decode them. A TIFF of several pages is refused before any page is decoded: a slice file holds
    one 2D image, and decoding every page of a small file can take gigabytes."""
    try:
        with tifffile.TiffFile(io.BytesIO(raw)) as tiff:
            pages = len(tiff.pages)
            if pages == 1:
                return tiff.pages[0].asarray()
    except Exception:  # tifffile raises many exception types for files it cannot decode
        return None
    raise DataError(f"the TIFF holds {pages} pages; a slice file must hold one 2D image: {name}")


def _raw_bytes(source: ImageSource) -> tuple[bytes, str]:
    """The encoded bytes of a file or an in-memory upload, and the name errors should give."""
    if isinstance(source, bytes):
        return source, "the uploaded image"
    path = Path(source)
    try:
        return path.read_bytes(), str(path)
    except OSError as error:
        raise DataError(f"cannot read {path}: {error.strerror or error}") from error


def _decode(source: ImageSource) -> tuple[np.ndarray, str, bool]:
    """Raw pixels as stored (any dtype, 2D or 3D, RGB(A) order), the source's name and whether it was stored
    lossily (JPEG), or :class:`DataError`."""
    raw, name = _raw_bytes(source)
    if len(raw) == 0:
        raise DataError(f"empty file: {name}")
    if is_dicom_bytes(raw) or name.lower().endswith(DICOM_EXTENSIONS):
        return _decode_dicom(source if isinstance(source, bytes) else Path(source)), name, False
    pixels = _decode_tiff(raw, name) if raw[:4] in TIFF_MAGIC else None
    if pixels is None:
        pixels = cv2.imdecode(np.frombuffer(raw, np.uint8), cv2.IMREAD_UNCHANGED)
        if pixels is None:
            raise DataError(f"unreadable or truncated image: {name}")
        if pixels.ndim == 3 and pixels.shape[2] in (3, 4):
            code = cv2.COLOR_BGR2RGB if pixels.shape[2] == 3 else cv2.COLOR_BGRA2RGBA
            pixels = cv2.cvtColor(pixels, code)
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[..., 0]
    if pixels.ndim not in (2, 3) or min(pixels.shape[:2]) < 2:
        raise DataError(f"not a 2D slice (shape {pixels.shape}): {name}")
    return pixels, name, raw.startswith(JPEG_MAGIC)


def _decode_dicom(source: Path | bytes) -> np.ndarray:
    """A DICOM file's middle frame (:func:`~metaseg_tf.data.dicom_planes.read_dicom_slice`), windowed as volumes are
    (the 0.5th-99.5th percentile of its non-zero pixels to ``[0, 1]``, :func:`~metaseg_tf.data.intensity.window_volume`)."""
    from metaseg_tf.data.dicom_planes import read_dicom_slice
    from metaseg_tf.data.intensity import window_volume

    return window_volume(read_dicom_slice(source)[0])[0]


def _to_unit_range(pixels: np.ndarray) -> np.ndarray:
    if pixels.dtype == np.bool_:
        return pixels.astype(np.float32)
    if np.issubdtype(pixels.dtype, np.integer):
        return pixels.astype(np.float32) / float(np.iinfo(pixels.dtype).max)
    pixels = pixels.astype(np.float32)
    if not np.all(np.isfinite(pixels)):
        raise DataError("image holds NaN or infinite values")
    low, high = float(pixels.min()), float(pixels.max())
    return (pixels - low) / (high - low) if high > low else np.zeros_like(pixels)


def to_channels(image: np.ndarray, channels: int) -> np.ndarray:
    """``(H, W)`` or ``(H, W, 1|2|3|4)`` -> ``(H, W, channels)``; alpha is dropped, grey is repeated."""
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[2] in (2, 4):  # grey+alpha or RGBA
        image = image[..., :-1]
    if image.shape[2] == channels:
        return image
    if channels == 3:
        return np.repeat(image[..., :1], 3, axis=2)
    return image.mean(axis=2, keepdims=True)


def read_image(source: ImageSource, channels: int = 3) -> np.ndarray:
    """Read one slice (a file, or the encoded bytes of one) as ``float32`` ``(H, W, channels)`` in ``[0, 1]``
    (see the module docstring)."""
    pixels, name, _ = _decode(source)
    if pixels.ndim == 3 and pixels.shape[2] > 4:
        raise DataError(f"{pixels.shape[2]} channels are not supported (1-4 expected): {name}")
    try:
        image = _to_unit_range(pixels)
    except DataError as error:
        raise DataError(f"{error}: {name}") from error
    return np.ascontiguousarray(to_channels(image, channels), dtype=np.float32)


@dataclass(frozen=True)
class MaskLabels:
    """A mask's labels ``(H, W)`` as stored (0 background; binary masks as 0/1) and its encoding's name."""

    labels: np.ndarray
    encoding: str

    @property
    def binary(self) -> np.ndarray:
        """``uint8 (H, W)`` in {0, 1}: any non-zero label is lesion."""
        return (self.labels > 0).astype(np.uint8)


def read_mask_labels(source: ImageSource) -> MaskLabels:
    """Read one mask (a file, or the encoded bytes of one) with its labels (see the module docstring)."""
    pixels, _, lossy = _decode(source)
    encoding = ""
    if pixels.ndim == 3:
        colour = pixels[..., :3] if pixels.shape[2] >= 3 else pixels[..., :1]
        if not (colour == colour[..., :1]).all():
            encoding = "colour (any channel)"
        pixels = colour.max(axis=2)
    if pixels.dtype == np.bool_:
        return MaskLabels(pixels.astype(np.uint8), "boolean")
    if np.issubdtype(pixels.dtype, np.floating):
        pixels = np.nan_to_num(pixels.astype(np.float64), posinf=65535.0, neginf=0.0)
        if np.array_equal(pixels, np.round(pixels)) and pixels.min() >= 0:
            return _integer_labels(np.clip(pixels, 0, 65535).astype(np.uint16), f"float {encoding}".strip())
        return MaskLabels((pixels > 0.5).astype(np.uint8), "soft float (> 0.5)")
    if lossy:  # compression ringing: lesion where the value reaches half the mask's own maximum (0/1 or 0/255)
        top = int(pixels.max())
        binary = (pixels.astype(np.int64) * 2 >= top) & (pixels > 0) if top else np.zeros(pixels.shape, bool)
        return MaskLabels(binary.astype(np.uint8), "lossy JPEG (>= half its maximum)")
    return _integer_labels(pixels, encoding)


def _integer_labels(pixels: np.ndarray, encoding: str) -> MaskLabels:
    values = np.unique(pixels)
    values = values[values > 0]
    if values.size == 0:
        return MaskLabels(np.zeros(pixels.shape, np.uint8), encoding or "empty")
    if values.size == 1:  # binary: 0/1, 0/255, 0/65535 ... stored as 0/1
        return MaskLabels((pixels > 0).astype(np.uint8), encoding or f"binary 0/{int(values[0])}")
    return MaskLabels(pixels, encoding or "label map")


def read_mask(source: ImageSource) -> np.ndarray:
    """Read one mask (a file, or the encoded bytes of one) as ``uint8`` ``(H, W)`` with values in ``{0, 1}``:
    any non-zero label is lesion (JPEG: from half its maximum; see the module docstring)."""
    return read_mask_labels(source).binary


def check_pair_shapes(pair: SlicePair, image: np.ndarray, mask: np.ndarray) -> None:
    """:class:`DataError` naming both files when the image and its mask differ in size."""
    if image.shape[:2] != mask.shape:
        raise DataError(
            f"image {pair.image_path.name} is {image.shape[1]}x{image.shape[0]} but mask "
            f"{pair.mask_path.name} is {mask.shape[1]}x{mask.shape[0]}"
        )


def read_pair(pair: SlicePair, channels: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Image ``(H, W, channels)`` float32 and mask ``(H, W)`` uint8 of one pair; sizes must agree."""
    image = read_image(pair.image_path, channels)
    mask = read_mask(pair.mask_path)
    check_pair_shapes(pair, image, mask)
    return image, mask
