"""DICOM input, the data layer (no model): sequence names from series descriptions, pydicom's MR test files
and their compressed copies, a phantom case written as DICOM series (tests/helpers/dicom_series.py) read back
to the NIfTI voxels and affine it came from, an enhanced multi-frame copy of a series, the refusals with their
one-line reasons, safe zip unpacking, and no patient identifier in the logs."""

from __future__ import annotations

import itertools
import logging
import shutil
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from highdicom.legacy import LegacyConvertedEnhancedMRImage
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from helpers.dicom_series import write_case, write_series
from metaseg_tf.data.archives import extract_zip
from metaseg_tf.data.dicom import DicomSeries, choose_series, scan_dicom, sequence_of_text
from metaseg_tf.data.dicom_planes import read_dicom_slice, read_series, series_geometry
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import read_image
from metaseg_tf.data.layouts import discover_volumes
from metaseg_tf.data.volumes import to_canonical

DESCRIPTIONS = {"t1c": "AX T1 POST GD", "t2f": "T2 FLAIR", "t1n": "T1 SE pre"}
IDENTIFIERS = ("Phantom^Test", "PHANTOM-0001", "19700101")  # the helper's PatientName, PatientID, birth date
CASE = "BraTS-MET-04001-000"  # the phantom case with the largest lesions


@pytest.fixture(scope="module")
def case_dir(brats_phantom_dir: Path) -> Path:
    return brats_phantom_dir / CASE


@pytest.fixture(scope="module")
def dicom_case(case_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The phantom case's t1c, t2f and t1n as three classic DICOM MR series of one study (a folder each)."""
    return write_case(case_dir, tmp_path_factory.mktemp("dicom") / "case-a", DESCRIPTIONS)


@pytest.fixture(scope="module")
def chosen(dicom_case: Path) -> dict[str, DicomSeries]:
    return choose_series(scan_dicom(dicom_case))


@pytest.fixture(scope="module")
def enhanced_file(dicom_case: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The t1c series as one legacy-converted enhanced MR file (highdicom), alone in its folder."""
    datasets = [pydicom.dcmread(path) for path in sorted((dicom_case / "series1").glob("*.dcm"))]
    image = LegacyConvertedEnhancedMRImage(legacy_datasets=datasets, series_instance_uid=hd.UID(), series_number=10,
                                           sop_instance_uid=hd.UID(), instance_number=1)
    path = tmp_path_factory.mktemp("enhanced") / "enhanced.dcm"
    image.save_as(str(path))
    return path


def _voxels(image) -> np.ndarray:
    return to_canonical(np.asarray(image.dataobj), image.affine)


def _files_under(root: Path) -> set[Path]:
    return {path for path in root.rglob("*") if path.is_file()}


# --- sequence names -----------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "sequence"), [
    ("AX T1 POST GD", "t1c"), ("T1+C", "t1c"), ("t1_mprage_sag", "t1n"), ("T1 pre-contrast", "t1n"),
    ("T2 FLAIR AX", "t2f"), ("T2W TSE", "t2w"), ("DWI b1000", None)])
def test_sequence_names_are_read_from_series_descriptions(text: str, sequence: str | None) -> None:
    assert sequence_of_text(text) == sequence


@pytest.mark.parametrize("text", ["AX T1 W/O GAD", "AX T1 WO CONTRAST", "T1 without contrast", "T1 NON-CONTRAST",
                                  "T1 before contrast"])
def test_a_t1_described_as_without_contrast_is_t1n(text: str) -> None:
    assert sequence_of_text(text) == "t1n"


@pytest.mark.parametrize(("text", "sequence"), [("AX T1 FLAIR POST", "t1c"), ("Ax T1 FLAIR", "t1n")])
def test_a_t1_weighted_flair_is_a_t1_sequence(text: str, sequence: str) -> None:
    assert sequence_of_text(text) == sequence


# --- single files: pydicom's test data ----------------------------------------------------------------
@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm"])
def test_a_dicom_mr_file_reads_as_a_unit_range_slice_and_its_lossless_copies_read_identically(name: str) -> None:
    plain = read_image(get_testdata_file("MR_small.dcm"), 3)
    assert plain.dtype == np.float32 and plain.shape == (64, 64, 3)
    assert plain.min() == 0.0 and plain.max() == 1.0 and len(np.unique(plain)) > 50
    assert np.array_equal(plain[..., 0], plain[..., 2])  # grey, repeated
    compressed = read_image(get_testdata_file(name), 3)
    assert compressed.dtype == np.float32 and np.array_equal(compressed, plain)


def test_a_secondary_capture_is_refused_as_a_picture_of_an_image() -> None:
    with pytest.raises(DataError, match="secondary capture"):
        read_image(get_testdata_file("SC_rgb_rle.dcm"), 3)


def test_a_dicom_file_without_pixel_data_is_refused(tmp_path: Path) -> None:
    dataset = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del dataset.PixelData
    dataset.save_as(str(tmp_path / "header-only.dcm"))
    with pytest.raises(DataError, match="header-only.dcm holds no pixel data"):
        read_image(tmp_path / "header-only.dcm", 3)


# --- a case of classic series -------------------------------------------------------------------------
def test_each_series_of_a_dicom_case_is_mapped_to_its_sequence(dicom_case: Path,
                                                               chosen: dict[str, DicomSeries]) -> None:
    scan = scan_dicom(dicom_case)
    assert [series.description for series in scan.series] == list(DESCRIPTIONS.values())  # by series number
    assert all(series.frames == 8 and (series.rows, series.columns) == (64, 64) for series in scan.series)
    assert not scan.ignored
    assert {name: series.description for name, series in chosen.items()} == DESCRIPTIONS
    lines = scan.lines(chosen)
    assert [line.rsplit(": ", 1)[1] for line in lines] == ["used as t1c", "used as t2f", "used as t1n"]


@pytest.mark.parametrize("sequence", list(DESCRIPTIONS))
def test_a_dicom_series_reads_as_the_nifti_voxels_and_affine_it_was_written_from(
        sequence: str, chosen: dict[str, DicomSeries], case_dir: Path) -> None:
    image = read_series(chosen[sequence])
    nifti = nib.load(str(case_dir / f"{CASE}-{sequence}.nii.gz"))
    assert image.get_data_dtype() == np.float32
    assert np.array_equal(_voxels(image), _voxels(nifti))  # the rescale intercept undone exactly
    np.testing.assert_allclose(image.affine, nifti.affine, atol=1e-4)


def _corners(affine: np.ndarray, shape: tuple[int, ...]) -> list[tuple[float, ...]]:
    return sorted(tuple(np.round((affine @ [*corner, 1.0])[:3], 3))
                  for corner in itertools.product(*[(0, n - 1) for n in shape[:3]]))


def _rotated(degrees: float, affine: np.ndarray) -> np.ndarray:
    turn, rotation = np.deg2rad(degrees), np.eye(4)
    rotation[:2, :2] = [[np.cos(turn), -np.sin(turn)], [np.sin(turn), np.cos(turn)]]
    return rotation @ affine


@pytest.mark.parametrize(("orientation", "affine"), [
    ("anisotropic LAS", np.array([[-0.9, 0, 0, 50], [0, 1.1, 0, -20], [0, 0, 3.0, 7], [0, 0, 0, 1]])),
    ("coronal", np.array([[-1.0, 0, 0, 10], [0, 0, 2.5, -5], [0, -0.8, 0, 30], [0, 0, 0, 1]])),
    ("sagittal", np.array([[0, 0, -2.0, 10], [0.9, 0, 0, -5], [0, -1.3, 0, 30], [0, 0, 0, 1]])),
    ("slices going down", np.array([[1.0, 0, 0, 10], [0, 1.2, 0, -5], [0, 0, -2.0, 30], [0, 0, 0, 1]])),
    ("oblique", _rotated(10, np.array([[-0.9, 0, 0, 50], [0, -1.1, 0, -20], [0, 0, 3.0, 7], [0, 0, 0, 1]]))),
])
def test_a_series_of_any_orientation_and_spacing_covers_the_same_grid_and_canonical_voxels(
        orientation: str, affine: np.ndarray, tmp_path: Path) -> None:
    data = np.random.default_rng(0).integers(0, 1000, (12, 10, 6)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "volume.nii.gz"))
    write_series(tmp_path / "volume.nii.gz", tmp_path / "series", "AX T1", generate_uid(), 1)
    image = read_series(scan_dicom(tmp_path / "series").series[0])
    # frames are sorted along the slice normal, so the slice axis may be reversed: the same grid either way
    assert _corners(image.affine, image.shape) == _corners(affine, data.shape), orientation
    assert np.array_equal(_voxels(image), to_canonical(data, affine)), orientation


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEG2000Lossless", "JPEGLSLossless"])
def test_a_losslessly_compressed_series_reads_as_the_same_voxels(syntax: str, case_dir: Path, tmp_path: Path) -> None:
    source = case_dir / f"{CASE}-t1c.nii.gz"
    paths = write_series(source, tmp_path / "s", "AX T1 POST GD", generate_uid(), 1,
                         transfer_syntax=getattr(pydicom.uid, syntax))
    assert pydicom.dcmread(str(paths[0]), stop_before_pixels=True).file_meta.TransferSyntaxUID == \
        getattr(pydicom.uid, syntax)
    image = read_series(scan_dicom(tmp_path / "s").series[0])
    assert np.array_equal(_voxels(image), _voxels(nib.load(str(source))))


def test_a_dicom_folder_is_one_unlabelled_case_named_after_the_folder(dicom_case: Path) -> None:
    report = discover_volumes(dicom_case)
    assert report is not None and report.layout == "dicom"
    assert [case.case_id for case in report.cases] == ["case-a"]
    case = report.cases[0]
    assert list(case.sequences) == ["t1c", "t2f", "t1n"]
    assert {name: source.series.description for name, source in case.sequences.items()} == DESCRIPTIONS
    assert not case.labelled and not report.skipped


# --- an enhanced multi-frame copy ---------------------------------------------------------------------
def test_an_enhanced_multiframe_file_is_one_series_of_all_frames(enhanced_file: Path) -> None:
    scan = scan_dicom(enhanced_file.parent)
    assert len(scan.series) == 1
    series = scan.series[0]
    assert series.files == (enhanced_file,) and series.frames == 8 and series.sequence == "t1c"
    assert "Legacy Converted Enhanced MR" in scan.lines()[0]


def test_an_enhanced_multiframe_series_reads_as_the_classic_series(enhanced_file: Path,
                                                                   chosen: dict[str, DicomSeries]) -> None:
    enhanced = read_series(scan_dicom(enhanced_file.parent).series[0])
    classic = read_series(chosen["t1c"])
    assert np.array_equal(np.asarray(enhanced.dataobj), np.asarray(classic.dataobj))
    np.testing.assert_allclose(enhanced.affine, classic.affine, atol=1e-4)


def test_each_frame_of_a_multiframe_file_reads_as_the_classic_file_at_its_position(
        enhanced_file: Path, chosen: dict[str, DicomSeries]) -> None:
    by_position = {tuple(round(float(v), 3) for v in pydicom.dcmread(str(path)).ImagePositionPatient): path
                   for path in chosen["t1c"].files}
    frames = pydicom.dcmread(str(enhanced_file), stop_before_pixels=True).PerFrameFunctionalGroupsSequence
    for k, item in enumerate(frames):
        position = tuple(round(float(v), 3) for v in item.PlanePositionSequence[0].ImagePositionPatient)
        pixels, count = read_dicom_slice(enhanced_file, k)
        expected, _ = read_dicom_slice(by_position[position])
        assert count == 8 and pixels.dtype == np.float32 and np.array_equal(pixels, expected), k


# --- refusals -----------------------------------------------------------------------------------------
def test_a_series_with_a_missing_slice_is_refused_where_the_gap_is(case_dir: Path, tmp_path: Path) -> None:
    write_series(case_dir / f"{CASE}-t1c.nii.gz", tmp_path / "gap", "AX T1 POST GD", generate_uid(), 1,
                 skip_slice=3)
    series = scan_dicom(tmp_path / "gap").series[0]
    assert series.frames == 7
    with pytest.raises(DataError, match=r"uneven slice spacing between frames 3 and 4 of 7 .*-7\.50 and 0\.00 mm"):
        read_series(series)


@pytest.fixture()
def two_t1c(case_dir: Path, tmp_path: Path) -> Path:
    """A study with two series that both look like t1c."""
    study = generate_uid()
    write_series(case_dir / f"{CASE}-t1c.nii.gz", tmp_path / "study" / "a", "AX T1 POST GD", study, 1)
    write_series(case_dir / f"{CASE}-t1n.nii.gz", tmp_path / "study" / "b", "T1+C sag", study, 2)
    return tmp_path / "study"


def test_two_series_of_one_sequence_are_refused_with_both_names(two_t1c: Path) -> None:
    with pytest.raises(DataError, match="2 series look like t1c") as error:
        choose_series(scan_dicom(two_t1c))
    assert "'AX T1 POST GD'" in str(error.value) and "'T1+C sag'" in str(error.value)
    assert "--series t1c=" in str(error.value)
    report = discover_volumes(two_t1c)  # the case is skipped with that reason, not guessed
    assert report is not None and not report.cases and "2 series look like t1c" in report.skipped["study"]


def test_a_named_series_is_chosen_by_description_or_uid_and_a_name_matching_none_or_several_is_refused(
        two_t1c: Path) -> None:
    scan = scan_dicom(two_t1c)
    assert choose_series(scan, {"t1c": "T1+C sag"})["t1c"].description == "T1+C sag"
    first = scan.series[0]
    assert choose_series(scan, {"t1c": first.uid})["t1c"] == first
    with pytest.raises(DataError, match=r"--series t1c=nothing like it: 0 series match"):
        choose_series(scan, {"t1c": "nothing like it"})
    with pytest.raises(DataError, match=r"--series t1c=T1: 2 series match"):
        choose_series(scan, {"t1c": "T1"})


def test_a_dicomdir_without_its_files_is_refused(tmp_path: Path) -> None:
    shutil.copy(get_testdata_file("DICOMDIR"), tmp_path / "DICOMDIR")
    with pytest.raises(DataError, match="DICOMDIR but none of the image files"):
        scan_dicom(tmp_path)
    with pytest.raises(DataError, match="DICOMDIR"):
        discover_volumes(tmp_path)


def test_a_series_over_the_voxel_limit_is_refused_before_a_pixel_is_decoded(case_dir: Path, tmp_path: Path) -> None:
    paths = write_series(case_dir / f"{CASE}-t1c.nii.gz", tmp_path / "s", "AX T1 POST GD", generate_uid(), 1)
    for path in paths:  # no pixels at all: decoding one would be refused differently
        dataset = pydicom.dcmread(str(path))
        del dataset.PixelData
        dataset.save_as(str(path))
    series = scan_dicom(tmp_path / "s").series[0]
    limit = r"64x64x8 = 32768 voxels; the limit is 10"
    with pytest.raises(DataError, match=limit):
        series_geometry(series, max_voxels=10)
    with pytest.raises(DataError, match=limit):
        read_series(series, max_voxels=10)
    with pytest.raises(DataError, match="holds no pixel data"):
        read_series(series)


def test_two_files_at_one_position_are_refused(case_dir: Path, tmp_path: Path) -> None:
    paths = write_series(case_dir / f"{CASE}-t1c.nii.gz", tmp_path / "s", "AX T1 POST GD", generate_uid(), 1)
    copy = pydicom.dcmread(str(paths[0]))
    copy.SOPInstanceUID = copy.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    copy.save_as(str(tmp_path / "s" / "copy.dcm"))
    with pytest.raises(DataError, match=rf"two frames at one position .*({paths[0].name} and copy.dcm|"
                                        rf"copy.dcm and {paths[0].name})"):
        read_series(scan_dicom(tmp_path / "s").series[0])


# --- zips ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("case", ["unsafe name", "too many files", "too many bytes", "zip bomb"])
def test_a_dangerous_zip_is_refused_and_nothing_is_written(case: str, tmp_path: Path) -> None:
    archive = tmp_path / "archive" / "in.zip"
    archive.parent.mkdir()
    max_files, max_bytes, match = 10, 1 << 30, case
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        handle.writestr("a.dcm", b"x" * 100)
        if case == "unsafe name":
            handle.writestr("../evil.dcm", b"evil")
            match = r"unsafe name \('../evil.dcm'\)"
        elif case == "too many files":
            handle.writestr("b.dcm", b"b")
            max_files, match = 1, "holds 2 entries; the limit is 1"
        elif case == "too many bytes":
            handle.writestr("b.dcm", np.random.default_rng(0).bytes(1000))
            max_bytes, match = 500, "unpacks to 1100 bytes; the limit is 500"
        else:
            handle.writestr("zeros.dcm", bytes(50 << 20))
            match = "zip bomb"
    before = _files_under(tmp_path)
    with pytest.raises(DataError, match=match):
        extract_zip(archive, tmp_path / "work" / "dest", max_files=max_files, max_bytes=max_bytes)
    assert _files_under(tmp_path) == before and not (tmp_path / "work").exists()
    assert not (tmp_path / "evil.dcm").exists() and not (tmp_path / "work" / "evil.dcm").exists()


def test_a_zip_of_a_series_unpacks_to_numbered_files_of_the_same_series(dicom_case: Path, chosen: dict[str, DicomSeries],
                                                                        tmp_path: Path) -> None:
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as handle:
        for path in sorted((dicom_case / "series1").iterdir()):
            handle.write(path, f"study/series 1/{path.name}")
    destination = extract_zip(archive, tmp_path / "dest", max_files=100, max_bytes=1 << 30)
    assert destination == tmp_path / "dest"
    assert sorted(path.name for path in _files_under(tmp_path / "dest")) == [f"{k:05d}.dcm" for k in range(8)]
    scan = scan_dicom(destination)
    assert [(series.uid, series.frames) for series in scan.series] == [(chosen["t1c"].uid, 8)]
    unpacked, original = read_series(scan.series[0]), read_series(chosen["t1c"])
    assert np.array_equal(np.asarray(unpacked.dataobj), np.asarray(original.dataobj))
    assert np.array_equal(unpacked.affine, original.affine)


# --- no patient identifiers in the logs ----------------------------------------------------------------
def test_the_series_are_logged_without_any_patient_identifier(dicom_case: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert pydicom.dcmread(str(next((dicom_case / "series1").glob("*.dcm")))).PatientID == "PHANTOM-0001"
    with caplog.at_level(logging.INFO):
        report = discover_volumes(dicom_case)
    assert report is not None and len(report.cases) == 1
    messages = [record.getMessage() for record in caplog.records]
    for description, name in zip(DESCRIPTIONS.values(), DESCRIPTIONS):
        assert any(f"'{description}'" in message and f"used as {name}" in message for message in messages)
    assert not [message for message in messages if any(identifier in message for identifier in IDENTIFIERS)]
    assert not any(identifier in caplog.text for identifier in IDENTIFIERS)


# --- series of one frame of reference on other grids, studies with extra series, malformed headers ----------
def test_a_series_on_another_grid_of_the_same_frame_of_reference_is_resampled_onto_the_first(
        case_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from pydicom.uid import generate_uid

    from metaseg_tf.data.volumes import read_case

    t2f = nib.load(case_dir / f"{CASE}-t2f.nii.gz")
    coarse = nib.Nifti1Image(np.asarray(t2f.dataobj)[::2, ::2, :], t2f.affine @ np.diag([2.0, 2.0, 1.0, 1.0]))
    nib.save(coarse, tmp_path / "coarse-t2f.nii.gz")
    study = generate_uid()
    write_series(case_dir / f"{CASE}-t1c.nii.gz", tmp_path / "study" / "a", "AX T1 POST GD", study, 1)
    write_series(tmp_path / "coarse-t2f.nii.gz", tmp_path / "study" / "b", "T2 FLAIR", study, 2)
    (case,) = discover_volumes(tmp_path / "study").cases
    with caplog.at_level(logging.WARNING):
        volume = read_case(case, ("t1c", "t2f"))
    fine = _voxels(t2f)
    assert volume.images.shape[:3] == fine.shape and "resampled" in caplog.text
    resampled = volume.images[..., 1]
    assert np.corrcoef(resampled.ravel(), fine.ravel())[0, 1] > 0.8


def test_two_series_of_a_sequence_the_model_does_not_read_do_not_stop_the_case(dicom_case: Path, tmp_path: Path) -> None:
    study = tmp_path / "study"
    shutil.copytree(dicom_case, study)
    uid = str(pydicom.dcmread(next((study / "series1").glob("*.dcm"))).StudyInstanceUID)
    for number, description in ((7, "AX T2 TSE"), (8, "COR T2 TSE")):
        write_series(_t2w(dicom_case, tmp_path), study / f"t2-{number}",
                     description, uid, number)
    scan = scan_dicom(study)
    with pytest.raises(DataError, match="2 series look like t2w"):
        choose_series(scan)
    assert set(choose_series(scan, needed=("t1c", "t2f", "t1n"))) == {"t1c", "t2f", "t1n"}
    (case,) = discover_volumes(study, sequences=("t1c", "t2f", "t1n")).cases
    assert set(case.sequences) == {"t1c", "t2f", "t1n"}


def _t2w(dicom_case: Path, tmp_path: Path) -> Path:
    """A T2W volume on the case's grid (its t1c voxels will do: only the description matters here)."""
    path = tmp_path / "t2w.nii.gz"
    if not path.exists():
        image = read_series(choose_series(scan_dicom(dicom_case))["t1c"])
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj).astype(np.int16), image.affine), path)
    return path


@pytest.mark.parametrize(("attribute", "value", "match"), [
    ("PixelSpacing", [0.9], "PixelSpacing"), ("PixelSpacing", [0.0, 0.9], "not a valid image plane"),
    ("ImageOrientationPatient", [1, 0, 0, 1, 0, 0], "not a valid image plane"),
    ("ImagePositionPatient", ["nan", 0, 0], "ImagePositionPatient")])
def test_malformed_geometry_is_a_one_line_error(dicom_case: Path, tmp_path: Path, attribute: str, value: list,
                                                 match: str) -> None:
    series = tmp_path / "series"
    shutil.copytree(dicom_case / "series1", series)
    first = sorted(series.glob("*.dcm"))[0]
    dataset = pydicom.dcmread(first)
    setattr(dataset, attribute, value)
    dataset.save_as(first)
    with pytest.raises(DataError, match=match):
        read_series(scan_dicom(series).series[0])
