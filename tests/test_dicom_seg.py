"""DICOM input predicted (the session's small BraTS run): a phantom case written as DICOM series predicts exactly
what its NIfTI files predict, its DICOM SEG (read back with highdicom) references the t1c series and holds the
written regions frame by frame, patient identifiers stay inside the SEG, a zip of the case predicts the same, a
DICOM SEG of NIfTI input is refused, and a multi-frame DICOM file alone is predicted frame by frame in 2D."""

from __future__ import annotations

import gzip
import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pandas as pd
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage

from helpers.dicom_series import write_case, write_series
from metaseg_tf.data.discover import DataError
from metaseg_tf.inference.files import predict_path
from metaseg_tf.inference.predictor import Predictor

CASE = "BraTS-MET-04001-000"  # the phantom case with the largest lesions
DESCRIPTIONS = {"t1c": "AX T1 POST GD", "t2f": "T2 FLAIR", "t1n": "T1 SE pre"}
IDENTIFIERS = ("PHANTOM-0001", "Phantom")  # the helper's PatientID and (part of) its PatientName

@pytest.fixture(scope="module")
def predictor(brats_run: Path) -> Predictor:
    return Predictor.from_run(brats_run)


@pytest.fixture(scope="module")
def dicom_case(brats_phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom case's t1c, t2f and t1n as three classic DICOM MR series in one folder, ``dicom-case``."""
    return write_case(brats_phantom_dir / CASE, tmp_path_factory.mktemp("dicom") / "dicom-case", DESCRIPTIONS)


@pytest.fixture(scope="module")
def dicom_out(predictor: Predictor, dicom_case: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir, summary = predict_path(predictor, [dicom_case], tmp_path_factory.mktemp("out-dicom"), progress=False,
                                    dicom_seg=True)
    assert summary["cases"] == 1 and summary["skipped"] == 0
    return out_dir


@pytest.fixture(scope="module")
def nifti_out(predictor: Predictor, brats_phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir, summary = predict_path(predictor, [brats_phantom_dir / CASE], tmp_path_factory.mktemp("out-nifti"),
                                    progress=False)
    assert summary["cases"] == 1
    return out_dir


def _t1c_files_along_the_normal(dicom_case: Path) -> list[pydicom.Dataset]:
    """The t1c series' files (headers), sorted by ImagePositionPatient along the slice normal."""
    datasets = [pydicom.dcmread(str(path), stop_before_pixels=True) for path in (dicom_case / "series1").glob("*.dcm")]
    orientation = np.array(datasets[0].ImageOrientationPatient, float)
    normal = np.cross(orientation[:3], orientation[3:])
    return sorted(datasets, key=lambda ds: float(np.array(ds.ImagePositionPatient, float) @ normal))


def _frame_of_volume(dataset: pydicom.Dataset, volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """The voxels of ``volume`` (file order, RAS ``affine``) at each pixel of the DICOM frame ``dataset``,
    found from the frame's image plane alone: ``(rows, columns, ...)``."""
    orientation = np.array(dataset.ImageOrientationPatient, float)
    row_spacing, column_spacing = (float(v) for v in dataset.PixelSpacing)
    rows, columns = np.meshgrid(np.arange(dataset.Rows), np.arange(dataset.Columns), indexing="ij")
    lps = (np.array(dataset.ImagePositionPatient, float) + columns[..., None] * orientation[:3] * column_spacing
           + rows[..., None] * orientation[3:] * row_spacing)
    index = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), lps * [-1.0, -1.0, 1.0])).astype(int)
    assert (index >= 0).all() and (index < volume.shape[:3]).all()
    return volume[index[..., 0], index[..., 1], index[..., 2]]


def test_a_dicom_case_predicts_exactly_what_its_nifti_files_predict(dicom_out: Path, nifti_out: Path) -> None:
    for name in ("probability", "seg"):
        from_dicom = nib.load(str(dicom_out / f"dicom-case-{name}.nii.gz"))
        from_nifti = nib.load(str(nifti_out / f"{CASE}-{name}.nii.gz"))
        assert from_dicom.shape == from_nifti.shape
        assert np.array_equal(np.asarray(from_dicom.dataobj), np.asarray(from_nifti.dataobj)), name
        assert np.array_equal(from_dicom.affine, from_nifti.affine), name
    assert (dicom_out / "dicom-case-seg.dcm").is_file()
    table = pd.read_csv(dicom_out / "predictions.csv")
    assert table["case_id"].tolist() == ["dicom-case"] and table["status"].tolist() == ["ok"]
    assert table["label_convention"].tolist() == ["brats"]


def test_the_dicom_seg_references_the_t1c_series_and_holds_the_written_regions_frame_by_frame(
        dicom_out: Path, nifti_out: Path, dicom_case: Path, predictor: Predictor) -> None:
    seg = hd.seg.segread(str(dicom_out / "dicom-case-seg.dcm"))
    target = predictor.target.in_convention("brats")
    assert [item.SegmentLabel for item in seg.SegmentSequence] == ["Whole tumour (WT)", "Tumour core (TC)",
                                                                   "Enhancing tumour (ET)"]
    assert len(seg.SegmentSequence) == len(predictor.target.names) == 3
    sources = _t1c_files_along_the_normal(dicom_case)
    assert {(series, sop) for _, series, sop in seg.get_source_image_uids()} == \
        {(ds.SeriesInstanceUID, ds.SOPInstanceUID) for ds in sources}
    read = seg.get_pixels_by_source_instance(source_sop_instance_uids=[ds.SOPInstanceUID for ds in sources],
                                             segment_numbers=[1, 2, 3], assert_missing_frames_are_empty=True)
    written = nib.load(str(nifti_out / f"{CASE}-seg.nii.gz"))  # the NIfTI case's own seg, read by region
    regions = target.masks(np.asarray(written.dataobj))
    expected = np.stack([_frame_of_volume(ds, regions, written.affine) for ds in sources])
    assert read.shape == expected.shape == (8, 64, 64, 3)
    assert np.array_equal(read > 0, expected > 0)
    assert expected.any(), "the run predicts no lesion: the comparison says nothing"


def test_patient_identifiers_stay_inside_the_dicom_seg(dicom_out: Path, dicom_case: Path) -> None:
    seg = pydicom.dcmread(str(dicom_out / "dicom-case-seg.dcm"))
    source = pydicom.dcmread(str(next((dicom_case / "series1").glob("*.dcm"))), stop_before_pixels=True)
    assert seg.PatientID == source.PatientID == "PHANTOM-0001"
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.Modality == "SEG"
    outputs = [path for path in dicom_out.rglob("*") if path.is_file()]
    assert {"predictions.csv", "lesions.csv", "dicom-case-lesions.csv"} <= {path.name for path in outputs}
    for path in outputs:
        assert not any(identifier in path.name for identifier in IDENTIFIERS), path.name
        if path.suffix == ".dcm":
            continue
        content = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        assert not any(identifier.encode() in content for identifier in IDENTIFIERS), path.name


def test_a_zip_of_the_dicom_case_predicts_the_same_seg_named_after_the_zip(predictor: Predictor, dicom_case: Path,
                                                                          dicom_out: Path, tmp_path: Path) -> None:
    archive = tmp_path / "study-0042.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted(dicom_case.rglob("*.dcm")):
            handle.write(path, path.relative_to(dicom_case.parent).as_posix())
    out_dir, summary = predict_path(predictor, [archive], tmp_path / "out", progress=False)
    assert summary["cases"] == 1
    assert pd.read_csv(out_dir / "predictions.csv")["case_id"].tolist() == ["study-0042"]
    from_zip = nib.load(str(out_dir / "study-0042-seg.nii.gz"))
    from_folder = nib.load(str(dicom_out / "dicom-case-seg.nii.gz"))
    assert np.array_equal(np.asarray(from_zip.dataobj), np.asarray(from_folder.dataobj))
    assert np.array_equal(from_zip.affine, from_folder.affine)


def test_a_study_with_two_t1c_series_is_refused_until_one_is_named(predictor: Predictor, dicom_case: Path,
                                                                    brats_phantom_dir: Path, dicom_out: Path,
                                                                    tmp_path: Path) -> None:
    study = tmp_path / "two-t1c"
    shutil.copytree(dicom_case, study)
    uid = pydicom.dcmread(str(next((study / "series1").glob("*.dcm"))), stop_before_pixels=True).StudyInstanceUID
    write_series(brats_phantom_dir / CASE / f"{CASE}-t1n.nii.gz", study / "series4", "SAG T1+C", uid, 4)
    with pytest.raises(DataError, match=r"2 series look like t1c: #1 'AX T1 POST GD'; #4 'SAG T1\+C'"):
        predict_path(predictor, [study], tmp_path / "refused", progress=False)
    out_dir, summary = predict_path(predictor, [study], tmp_path / "out", progress=False,
                                    series={"t1c": "AX T1 POST"}, dicom_seg=True)
    assert summary["cases"] == 1
    seg = nib.load(str(out_dir / "two-t1c-seg.nii.gz"))
    assert np.array_equal(np.asarray(seg.dataobj),
                          np.asarray(nib.load(str(dicom_out / "dicom-case-seg.nii.gz")).dataobj))
    series1 = {pydicom.dcmread(str(p), stop_before_pixels=True).SOPInstanceUID for p in (study / "series1").iterdir()}
    assert {sop for _, _, sop in hd.seg.segread(str(out_dir / "two-t1c-seg.dcm")).get_source_image_uids()} == series1


def test_a_dicom_seg_of_nifti_input_is_refused(predictor: Predictor, brats_phantom_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match="--dicom-seg needs DICOM input"):
        predict_path(predictor, [brats_phantom_dir / CASE], tmp_path, progress=False, dicom_seg=True)
    with pytest.raises(DataError, match="--dicom-seg needs DICOM input"):
        predict_path(predictor, [brats_phantom_dir / CASE / f"{CASE}-t1c.nii.gz"], tmp_path, progress=False,
                     dicom_seg=True)


@pytest.fixture(scope="module")
def enhanced_file(dicom_case: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The t1c series as one legacy-converted enhanced MR file (highdicom), ``t1c-enhanced.dcm``."""
    datasets = [pydicom.dcmread(str(path)) for path in sorted((dicom_case / "series1").glob("*.dcm"))]
    image = LegacyConvertedEnhancedMRImage(legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=10,
                                           sop_instance_uid=hd.UID(), instance_number=1)
    path = tmp_path_factory.mktemp("enhanced") / "t1c-enhanced.dcm"
    image.save_as(str(path))
    return path


@pytest.fixture(scope="module")
def slice_run(served_runs: list[Path]) -> Path:
    """The session's small Attention U-Net (conftest): 3 channels, no 2.5D context, a 2D model."""
    return served_runs[1]


def test_each_frame_of_a_multiframe_dicom_file_is_predicted_in_2d(slice_run: Path, enhanced_file: Path,
                                                                  tmp_path: Path) -> None:
    predictor = Predictor.from_run(slice_run)
    assert predictor.config.channels == 3 and predictor.config.context_slices == 0
    out_dir, summary = predict_path(predictor, [enhanced_file], tmp_path, progress=False)
    assert summary == {"predicted": 8, "skipped": 0}
    table = pd.read_csv(out_dir / "predictions.csv")
    assert table["output"].tolist() == [f"t1c-enhanced-frame_{k:03d}" for k in range(8)]
    assert (table["status"] == "ok").all()
    assert all((out_dir / f"t1c-enhanced-frame_{k:03d}_mask.png").is_file() for k in range(8))


def test_a_case_with_a_multiframe_t1c_predicts_the_same_seg_and_its_dicom_seg_references_the_frames(
        predictor: Predictor, dicom_case: Path, enhanced_file: Path, dicom_out: Path, tmp_path: Path) -> None:
    case = tmp_path / "multiframe-case"
    for series in ("series2", "series3"):
        shutil.copytree(dicom_case / series, case / series)
    shutil.copy(enhanced_file, case / "t1c-enhanced.dcm")
    out_dir, _ = predict_path(predictor, [case], tmp_path / "out", progress=False, dicom_seg=True)
    seg = nib.load(str(out_dir / "multiframe-case-seg.nii.gz"))
    assert np.array_equal(np.asarray(seg.dataobj), np.asarray(nib.load(str(dicom_out / "dicom-case-seg.nii.gz")).dataobj))
    dicom_seg = hd.seg.segread(str(out_dir / "multiframe-case-seg.dcm"))
    source = pydicom.dcmread(str(enhanced_file), stop_before_pixels=True)
    assert {sop for _, _, sop in dicom_seg.get_source_image_uids()} == {source.SOPInstanceUID}
