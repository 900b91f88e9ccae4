"""The API's DICOM input: a study's series as files or a zip, answered with a seg NIfTI and a DICOM SEG per model
(the same masks as the NIfTI copy of the case), a DICOM slice on /predict, and the limits and refusals that come
before a pixel is decoded (file count, bytes, voxels, hostile zips, files that are not DICOM)."""

from __future__ import annotations

import base64
import gzip
import io
import zipfile
from pathlib import Path

import highdicom as hd
import nibabel as nib
import numpy as np
import pydicom
import pytest
from fastapi.testclient import TestClient
from helpers.dicom_series import write_case

from metaseg_tf.serve.api import ServeSettings, create_app

SEQUENCES = {"t1c": "AX T1 POST GD", "t2f": "T2 FLAIR AX", "t1n": "T1 SE pre"}


@pytest.fixture(scope="module")
def client(served_runs: list[Path]) -> TestClient:
    return TestClient(create_app(served_runs, ServeSettings(max_dicom_files=40, max_voxels=200_000)))


@pytest.fixture(scope="module")
def study(brats_phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A phantom case (NIfTI folder) and the same case as three DICOM MR series of one study."""
    case = sorted(brats_phantom_dir.glob("BraTS-MET-*"))[0]
    return case, write_case(case, tmp_path_factory.mktemp("dicom") / "study", SEQUENCES)


def _files(folder: Path) -> list[tuple[str, tuple[str, bytes]]]:
    return [("files", (path.name, path.read_bytes())) for path in sorted(folder.rglob("*.dcm"))]


def _zip(entries: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", compression) as archive:
        for name, data in entries.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def _volume(encoded: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))


def test_a_dicom_study_gets_the_masks_of_its_nifti_copy_and_a_seg_that_references_it(client: TestClient, study) -> None:
    case, folder = study
    answer = client.post("/predict/dicom", files=_files(folder))
    assert answer.status_code == 200, answer.text
    dicom = answer.json()
    nifti = client.post("/predict/volume", files=[("files", (path.name, path.read_bytes())) for path in
                                                  (case / f"{case.name}-{name}.nii.gz" for name in SEQUENCES)]).json()
    assert [line.rsplit(": ", 1)[1] for line in dicom["series"]] == [f"used as {name}" for name in SEQUENCES]
    assert len(dicom["images_nii_gz"]) == 3 and dicom["axial_slices"] == nifti["axial_slices"]
    t1c_uids = [str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                for path in sorted((folder / "series1").glob("*.dcm"))]
    for from_dicom, from_nifti in zip(dicom["predictions"], nifti["predictions"]):
        seg, reference = _volume(from_dicom["seg_nii_gz"]), _volume(from_nifti["seg_nii_gz"])
        assert np.array_equal(np.asarray(seg.dataobj), np.asarray(reference.dataobj)), from_dicom["model"]
        assert np.allclose(seg.affine, reference.affine, atol=1e-4)
        assert from_dicom["lesions"] == from_nifti["lesions"]
        segmentation = hd.seg.segread(io.BytesIO(base64.b64decode(from_dicom["seg_dcm"])))
        assert from_dicom["seg_dcm_filename"] == "dicom-case-seg.dcm" and segmentation.Modality == "SEG"
        referenced = {str(item.ReferencedSOPInstanceUID) for series in segmentation.ReferencedSeriesSequence
                      for item in series.ReferencedInstanceSequence}
        assert referenced == set(t1c_uids)
        assert segmentation.PatientID == "PHANTOM-0001"  # kept inside the DICOM object, as PACS needs
    assert "PHANTOM-0001" not in answer.text.replace(dicom["predictions"][0]["seg_dcm"], "").replace(
        dicom["predictions"][1]["seg_dcm"], "")


def test_a_zip_of_the_study_with_series_named_by_text_is_the_same_case(client: TestClient, study) -> None:
    _, folder = study
    archive = _zip({f"{path.parent.name}/{path.name}": path.read_bytes() for path in sorted(folder.rglob("*.dcm"))})
    answer = client.post("/predict/dicom", files=[("files", ("study.zip", archive))],
                         data={"series": "t1c=POST GD; t2f=FLAIR; t1n=SE pre", "model": "nested_unet"})
    assert answer.status_code == 200, answer.text
    files = client.post("/predict/dicom", files=_files(folder), data={"model": "nested_unet"}).json()
    assert answer.json()["predictions"][0]["seg_nii_gz"] == files["predictions"][0]["seg_nii_gz"]


def test_one_series_fills_every_sequence_and_says_so(client: TestClient, study) -> None:
    _, folder = study
    answer = client.post("/predict/dicom", files=_files(folder / "series1"), data={"model": "attention_unet"})
    assert answer.status_code == 200, answer.text
    assert "fills every sequence" in answer.json()["warnings"][0]


def test_a_dicom_slice_is_predicted_like_an_image(client: TestClient, study) -> None:
    _, folder = study
    path = sorted((folder / "series1").glob("*.dcm"))[0]
    answer = client.post("/predict", files={"file": (path.name, path.read_bytes())})
    assert answer.status_code == 200, answer.text
    assert (answer.json()["width"], answer.json()["height"]) == (64, 64)


def _hostile(folder: Path) -> dict[str, tuple[list, dict, int, str]]:
    one = sorted(folder.rglob("*.dcm"))[0].read_bytes()
    return {
        "path traversal": ([("files", ("a.zip", _zip({"../../etc/evil.dcm": one})))], {}, 422, "unsafe name"),
        "absolute path": ([("files", ("a.zip", _zip({"/tmp/evil.dcm": one})))], {}, 422, "unsafe name"),
        "zip bomb": ([("files", ("a.zip", _zip({"a.dcm": bytes(60 << 20)}, zipfile.ZIP_DEFLATED)))], {}, 413, "zip bomb"),
        "thousands of entries": ([("files", ("a.zip", _zip({f"{k}.dcm": b"" for k in range(2000)})))], {}, 413,
                                 "limit is 40"),
        "too many files": ([("files", (f"{k}.dcm", one)) for k in range(41)], {}, 413, "limit is 40"),
        "not DICOM": ([("files", ("x.dcm", b"\x89PNG" + bytes(200)))], {}, 415, "not a DICOM file"),
        "not a zip": ([("files", ("a.zip", b"PK\x03\x04" + bytes(200)))], {}, 422, "zip"),
        "series unknown": (_files(folder), {"series": "t1c=no such series"}, 422, "0 series match"),
        "series malformed": (_files(folder), {"series": "t9=x"}, 422, "SEQUENCE=text_or_UID"),
    }


@pytest.mark.parametrize("case", ["path traversal", "absolute path", "zip bomb", "thousands of entries",
                                  "too many files", "not DICOM", "not a zip", "series unknown", "series malformed"])
def test_hostile_or_bad_dicom_uploads_get_a_clear_4xx(client: TestClient, study, case: str) -> None:
    files, data, status, message = _hostile(study[1])[case]
    answer = client.post("/predict/dicom", files=files, data=data)
    assert answer.status_code == status, answer.text
    assert message in answer.json()["detail"]


def test_a_series_over_the_voxel_limit_is_refused_before_it_is_decoded(served_runs: list[Path], study,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def decode_nothing(*args, **kwargs):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr("metaseg_tf.data.dicom_planes._pixels", decode_nothing)
    small = TestClient(create_app(served_runs, ServeSettings(max_voxels=64 * 64 * 7)))
    answer = small.post("/predict/dicom", files=_files(study[1]))
    assert answer.status_code == 413 and "voxels" in answer.json()["detail"]
