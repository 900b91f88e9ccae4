"""A prediction as a DICOM Segmentation (PS3.3 A.51, the SEG IOD) that references its source series, written
with highdicom, as MONAI Deploy writes its SEG objects.

One binary segment per output of the run's target (:class:`~metaseg_tf.data.targets.Target`), in output order,
each with coded descriptions (PS3.16 CID 7150 / 7151): category SNOMED CT 49755003 *Morphologically abnormal
structure*; type SNOMED CT 14799000 *Neoplasm, metastatic* for the whole tumour (WT, and a binary target's
``lesion``); the BraTS tumour core (TC)
and enhancing tumour (ET), which SNOMED CT does not name, as codes of the private scheme ``99METASEG`` (PS3.16
8.2: a ``99`` prefix marks a local scheme) with the BraTS definition as meaning. Algorithm type AUTOMATIC with
the run's architecture and version (CID 7162 *Artificial Intelligence*).

The SEG's frames are the source series' frames (one per source instance, or per frame of a multi-frame source) in
the source's own order; empty frames are left out as the standard allows. :func:`write_dicom_seg` reads the file
back with highdicom and checks that its pixels equal the mask it was given, voxel for voxel, before it returns.
The source's patient and study identifiers are copied into the SEG (it must sit beside its images in PACS), and
nowhere else: no identifier is logged or named in a file name.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from metaseg_tf.data.dicom import DicomSeries
from metaseg_tf.data.dicom_planes import series_geometry
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.targets import Target
from metaseg_tf.data.volumes import from_canonical

PRIVATE_SCHEME = "99METASEG"
REGION_DESCRIPTIONS = {  # region -> (segment label, property type code value, scheme, meaning)
    "wt": ("Whole tumour (WT)", "14799000", "SCT", "Neoplasm, metastatic"),
    "tc": ("Tumour core (TC)", "TC", PRIVATE_SCHEME, "Tumour core: enhancing tumour and necrosis (BraTS)"),
    "et": ("Enhancing tumour (ET)", "ET", PRIVATE_SCHEME, "Enhancing tumour (BraTS)"),
}
SEG_COLOURS = {"wt": (0, 200, 0), "tc": (255, 200, 0), "et": (255, 0, 0)}


def _segment_descriptions(target: Target, algorithm: str, version: str) -> list:
    import highdicom as hd
    from pydicom.sr.codedict import codes
    from pydicom.sr.coding import Code

    algorithm_id = hd.AlgorithmIdentificationSequence(name=algorithm[:64], version=version[:64],
                                                      family=codes.cid7162.ArtificialIntelligence)
    descriptions = []
    for number, name in enumerate(target.names, start=1):
        region = target.region_of(name) or "wt"
        label, value, scheme, meaning = REGION_DESCRIPTIONS[region]
        if name not in REGION_DESCRIPTIONS:  # a binary target's "lesion", or a label set: named as it is
            label = f"{name} ({label})"
        descriptions.append(hd.seg.SegmentDescription(
            segment_number=number, segment_label=label[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=Code(value, scheme, meaning),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm_id,
            tracking_uid=hd.UID(), tracking_id=f"{name} {number}",
            display_color=hd.color.CIELabColor.from_rgb(*SEG_COLOURS[region]) if hasattr(hd, "color") else None))
    return descriptions


def seg_frames(masks: np.ndarray, series: DicomSeries, affine: np.ndarray) -> tuple[list[Path], np.ndarray]:
    """Canonical masks ``uint8 (Z, H, W, R)`` -> the source files and the masks per source frame
    ``bool (frames, rows, columns, R)`` in the files' own frame order (one file per frame for a classic series;
    one file and its frames in file order for a multi-frame image)."""
    geometry = series_geometry(series)
    if not np.allclose(geometry.affine, affine, atol=1e-3):
        raise DataError(f"the mask's grid is not the grid of series {series.label}, which it is to reference")
    in_file_order = from_canonical(masks, affine)  # (columns, rows, slices, R)
    files = sorted({frame.path for frame in geometry.frames}, key=lambda p: series.files.index(p))
    if len(files) == 1 and len(geometry.frames) > 1:  # one multi-frame image: its frames in their own order
        frames = np.zeros((len(geometry.frames), geometry.shape[1], geometry.shape[0], masks.shape[-1]), bool)
        for k, frame in enumerate(geometry.frames):
            frames[frame.index] = in_file_order[:, :, k].transpose(1, 0, 2) > 0
        return files, frames
    files = [frame.path for frame in geometry.frames]
    return files, np.stack([in_file_order[:, :, k].transpose(1, 0, 2) > 0 for k in range(len(files))])


def write_dicom_seg(masks: np.ndarray, target: Target, series: DicomSeries, affine: np.ndarray, out_path: Path,
                    algorithm: str, version: str, series_number: int = 300) -> Path:
    """``masks`` ``uint8 (Z, H, W, R)`` (canonical orientation, one channel per output of ``target``) as a
    binary DICOM SEG referencing ``series`` (whose voxel grid, ``affine``, the masks are on) at ``out_path``;
    read back and compared with the masks before it returns (:class:`RuntimeError` if they differ); a series
    highdicom cannot reference (several files of multi-frame images, inconsistent planes or frame of reference)
    is a :class:`~metaseg_tf.data.discover.DataError`."""
    import pydicom

    files, frames = seg_frames(masks, series, affine)
    if len(set(files)) != len(files):
        raise DataError(f"series {series.label} spreads multi-frame images over several files: a DICOM SEG of it is "
                        "not written here")
    sources = [pydicom.dcmread(str(path)) for path in files]
    try:
        segmentation = _segmentation(sources, frames, target, algorithm, version, series_number)
    except ValueError as error:  # highdicom's checks of the source images (frame of reference, planes, ...)
        raise DataError(f"a DICOM SEG of series {series.label} cannot be written: {error}") from error
    out_path.parent.mkdir(parents=True, exist_ok=True)
    segmentation.save_as(str(out_path))
    check_dicom_seg(out_path, sources, frames)
    return out_path


def _segmentation(sources: list, frames: np.ndarray, target: Target, algorithm: str, version: str,
                  series_number: int):
    import highdicom as hd

    return hd.seg.Segmentation(
        source_images=sources, pixel_array=frames.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_segment_descriptions(target, algorithm, version),
        series_instance_uid=hd.UID(), series_number=series_number, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="metaseg-tf", manufacturer_model_name=algorithm[:64], software_versions=version[:64],
        device_serial_number="none", series_description=f"metaseg-tf {algorithm}"[:64],
        content_description="automatic lesion segmentation", content_creator_name=None)


def check_dicom_seg(path: Path, sources: list, frames: np.ndarray) -> None:
    """Read the SEG at ``path`` back with highdicom: its pixels per source frame must equal ``frames``
    ``bool (frames, rows, columns, R)``."""
    import highdicom as hd

    segmentation = hd.seg.segread(str(path))
    numbers = list(range(1, frames.shape[-1] + 1))
    if len(sources) == 1 and len(frames) > 1:
        read = segmentation.get_pixels_by_source_frame(
            source_sop_instance_uid=sources[0].SOPInstanceUID, source_frame_numbers=list(range(1, len(frames) + 1)),
            segment_numbers=numbers, assert_missing_frames_are_empty=True)
    else:
        read = segmentation.get_pixels_by_source_instance(
            source_sop_instance_uids=[source.SOPInstanceUID for source in sources], segment_numbers=numbers,
            assert_missing_frames_are_empty=True)
    if read.shape != frames.shape or not np.array_equal(read > 0, frames):
        raise RuntimeError(f"the DICOM SEG written to {path.name} does not read back as the mask it was given "
                           f"({int(np.sum((read > 0) != frames)) if read.shape == frames.shape else read.shape} differ)")
