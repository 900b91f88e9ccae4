"""Write a NIfTI volume as a classic DICOM MR series with pydicom (the tests' way to have DICOM series whose
voxels and geometry are known): one file per slice of the volume's third axis, ImagePositionPatient /
ImageOrientationPatient / PixelSpacing from its affine (RAS -> DICOM's LPS), int16 pixels with a rescale
intercept, files named in a shuffled order so that nothing may rely on it."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_series(volume_path: Path, out_dir: Path, description: str, study_uid: str, series_number: int,
                 intercept: float = 100.0, transfer_syntax: str | None = None, skip_slice: int | None = None,
                 seed: int = 0) -> list[Path]:
    """``volume_path`` (a 3D NIfTI of integer voxels) as a DICOM MR series in ``out_dir``; ``skip_slice``
    leaves one slice out (a gap); ``transfer_syntax``: compress with pydicom's encoders (e.g. RLE Lossless)."""
    import nibabel as nib
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

    image = nib.load(str(volume_path))
    data = np.asarray(image.dataobj)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ image.affine
    row_step, column_step, slice_step = lps[:3, 0], lps[:3, 1], lps[:3, 2]
    orientation = [*(row_step / np.linalg.norm(row_step)), *(column_step / np.linalg.norm(column_step))]
    series_uid, frame_uid = generate_uid(), generate_uid(entropy_srcs=[study_uid, "frame"])
    out_dir.mkdir(parents=True, exist_ok=True)
    order = np.random.default_rng(seed).permutation(data.shape[2])
    paths = []
    for k in range(data.shape[2]):
        if k == skip_slice:
            continue
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        path = out_dir / f"IM{order[k]:04d}.dcm"
        ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.SeriesDescription, ds.ProtocolName = "MR", description, description
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Test", "PHANTOM-0001", "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
        ds.StudyID, ds.SeriesNumber, ds.InstanceNumber = "1", series_number, int(order[k]) + 1  # deliberately shuffled
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName = "20260101", "120000", "A1", ""
        ds.Manufacturer, ds.ImageType = "metaseg-tf tests", ["ORIGINAL", "PRIMARY", "M", "ND"]
        ds.ImagePositionPatient = [float(v) for v in lps[:3, 3] + k * slice_step]
        ds.ImageOrientationPatient = [float(v) for v in orientation]
        ds.PixelSpacing = [float(np.linalg.norm(column_step)), float(np.linalg.norm(row_step))]
        ds.SliceThickness = float(np.linalg.norm(slice_step))
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows, ds.Columns = data.shape[1], data.shape[0]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = intercept, 1.0, "US"
        pixels = (data[:, :, k].T.astype(np.float64) - intercept).astype(np.int16)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax, pixels)
        ds.save_as(str(path), enforce_file_format=True)
        paths.append(path)
    return paths


def write_case(case_dir: Path, out_dir: Path, sequences: dict[str, str], **options) -> Path:
    """The sequences of a BraTS-layout case folder (suffix -> series description) as DICOM series of one study
    in ``out_dir`` (one subfolder per series)."""
    from pydicom.uid import generate_uid

    study = generate_uid()
    for number, (suffix, description) in enumerate(sequences.items(), start=1):
        write_series(case_dir / f"{case_dir.name}-{suffix}.nii.gz", out_dir / f"series{number}", description, study,
                     number, seed=number, **options)
    return out_dir
