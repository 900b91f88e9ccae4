"""The prediction API: every endpoint, every kind of bad upload, concurrency and a schema fuzz."""

from __future__ import annotations

import base64
import copy
import gzip
import os
import threading
from pathlib import Path

import cv2
import nibabel as nib
import numpy as np
import pytest
import schemathesis
import tifffile
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from scipy import ndimage

from metaseg_tf.cli import main
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.volumes import from_canonical, read_case
from metaseg_tf.inference.files import nifti_case
from metaseg_tf.serve.api import ServeSettings, app_from_environment, create_app
from metaseg_tf.serve.schemas import VOLUME_SCORES
from metaseg_tf.serve.served import ServeError, newest_pipeline_runs

# voxel axis 0 is axial (3 mm, inferior to superior), axis 1 runs right to left, axis 2 posterior to anterior:
# an orientation unlike the canonical one, so a transposed or flipped seg cannot pass for the right one
TOKEN = "a-test-token-of-32-characters-xx"
AXIAL_FIRST = np.array([[0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 0.9, -15.0], [3.0, 0.0, 0.0, -6.0], [0.0, 0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def app(served_runs: list[Path]):
    return create_app(served_runs, ServeSettings(max_upload_bytes=200_000, max_side_pixels=512))


@pytest.fixture(scope="module")
def client(app) -> TestClient:
    return TestClient(app)


def _png(array: np.ndarray) -> bytes:
    return cv2.imencode(".png", array)[1].tobytes()


def _mask(encoded: str) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(base64.b64decode(encoded), np.uint8), cv2.IMREAD_UNCHANGED)


def _nifti(array: np.ndarray, affine: np.ndarray = AXIAL_FIRST, compressed: bool = True) -> bytes:
    data = nib.Nifti1Image(array, affine).to_bytes()
    return gzip.compress(data) if compressed else data


def _seg(encoded: str) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(encoded)))


@pytest.fixture(scope="module")
def phantom_volume(phantom_slice) -> tuple[np.ndarray, np.ndarray]:
    """A (6, 40, 36) volume and its lesion mask in file order (AXIAL_FIRST): the phantom slice with the largest
    lesion, cropped around it, on slices 1-4 (slices 0 and 5 empty)."""
    image, mask = read_image(phantom_slice[0], 1)[..., 0], read_mask(phantom_slice[1])
    rows, columns = np.nonzero(mask)
    top = int(np.clip(rows.mean() - 20, 0, mask.shape[0] - 40))
    left = int(np.clip(columns.mean() - 18, 0, mask.shape[1] - 36))
    volume, truth = np.zeros((6, 40, 36), np.float32), np.zeros((6, 40, 36), np.uint8)
    volume[1:5] = image[top : top + 40, left : left + 36] * 1000
    truth[1:5] = mask[top : top + 40, left : left + 36] > 0
    assert truth.sum() > 0
    return volume, truth


@pytest.fixture(scope="module")
def limited_client(served_runs: list[Path]) -> TestClient:
    return TestClient(create_app(served_runs, ServeSettings(max_volume_bytes=30_000, max_voxels=1_000)))


def test_health_and_models_describe_what_is_served(client: TestClient, served_runs: list[Path]) -> None:
    assert client.get("/health").json() == {"status": "ok", "models": ["nested_unet", "attention_unet"]}
    models = {m["name"]: m for m in client.get("/models").json()}
    assert set(models) == {"nested_unet", "attention_unet"}
    for model in models.values():
        assert model["input_size"] == 32 and model["channels"] == 3 and model["clahe"] is True
        assert model["sequences"] == ["t1c", "t2f", "t1n"]
        assert model["parameters"] > 0 and model["run"] in {run.name for run in served_runs}
        assert model["training_data"]["patients_per_part"] == {"train": 4, "val": 1, "test": 1}
        assert model["training_data"]["slices_per_part"]["train"] == 32 and model["training_data"]["skipped"] == 0
        assert (model["threshold"], model["threshold_source"]) == (0.5, "config")


def test_predict_all_models_returns_masks_at_the_uploaded_size(client: TestClient, phantom_slice) -> None:
    image_path, _ = phantom_slice
    response = client.post("/predict", files={"file": (image_path.name, image_path.read_bytes())})
    assert response.status_code == 200, response.text
    body = response.json()
    assert (body["width"], body["height"]) == (64, 64)
    assert [p["model"] for p in body["predictions"]] == ["nested_unet", "attention_unet"]
    for prediction in body["predictions"]:
        mask = _mask(prediction["mask_png"])
        assert mask.shape == (64, 64) and set(np.unique(mask)) <= {0, 255}
        _, components = ndimage.label(mask > 0, structure=np.ones((3, 3)))
        assert prediction["lesions"]["count"] == components == len(prediction["lesions"]["areas_px"])
        assert prediction["lesions"]["total_px"] == int((mask > 0).sum()) == sum(prediction["lesions"]["areas_px"])
        assert 0 <= prediction["probability"]["mean"] <= prediction["probability"]["max"] <= 1
        assert prediction["latency_ms"] > 0 and prediction["attention_png"] is None


def test_threshold_changes_the_mask_monotonically(client: TestClient, phantom_slice) -> None:
    image = phantom_slice[0].read_bytes()
    areas = []
    for threshold in (0.1, 0.5, 0.9):
        body = client.post("/predict", files={"file": ("s.png", image)},
                           data={"model": "attention_unet", "threshold": str(threshold)}).json()
        assert body["predictions"][0]["threshold"] == threshold
        areas.append(body["predictions"][0]["lesions"]["total_px"])
    assert areas[0] >= areas[1] >= areas[2]
    assert areas[0] > 0  # a non-empty mask at a low threshold: an all-empty model cannot pass this test


def test_attention_maps_come_back_for_attention_unet(client: TestClient, phantom_slice) -> None:
    body = client.post("/predict", files={"file": ("s.png", phantom_slice[0].read_bytes())},
                       data={"model": "attention_unet", "attention": "true"}).json()
    maps = body["predictions"][0]["attention_png"]
    assert len(maps) == 2  # filters (4, 8, 16): two gated skips
    assert all(_mask(m).shape == (64, 64, 3) for m in maps)


@pytest.mark.parametrize("kind", ["tiff16_grey", "rgba_png", "jpeg", "bmp", "webp"])
def test_every_supported_format_and_depth_is_accepted(client: TestClient, kind: str) -> None:
    rng = np.random.default_rng(0)
    if kind == "tiff16_grey":
        import io

        buffer = io.BytesIO()
        tifffile.imwrite(buffer, (rng.random((50, 70)) * 65535).astype(np.uint16))
        data, shape = buffer.getvalue(), (50, 70)
    else:
        channels = 4 if kind == "rgba_png" else 3
        array = (rng.random((40, 30, channels)) * 255).astype(np.uint8)
        extension = {"rgba_png": ".png", "jpeg": ".jpg", "bmp": ".bmp", "webp": ".webp"}[kind]
        data, shape = cv2.imencode(extension, array)[1].tobytes(), (40, 30)
    response = client.post("/predict/mask", files={"file": ("upload", data)}, data={"model": "nested_unet"})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png" and int(response.headers["x-lesion-count"]) >= 0
    assert cv2.imdecode(np.frombuffer(response.content, np.uint8), cv2.IMREAD_UNCHANGED).shape == shape


@pytest.mark.parametrize("upload, status, message", [
    (b"", 422, "empty"),
    (b"patient name, dose\n", 415, "not a supported image"),
    (b"GIF89a" + bytes(100), 415, "not a supported image"),
    (_png(np.full((64, 64), 128, np.uint8))[:60], 422, "truncated"),
    (b"\x89PNG\r\n\x1a\n" + bytes(40), 422, "damaged"),
    (_png(np.random.default_rng(1).integers(0, 255, (600, 400), dtype=np.uint8)), 413, "limit"),
    (_png(np.random.default_rng(2).integers(0, 255, (400, 400, 3), dtype=np.uint8)), 413, "limit"),
])
def test_bad_uploads_get_a_clear_4xx(client: TestClient, upload: bytes, status: int, message: str) -> None:
    response = client.post("/predict", files={"file": ("upload.png", upload)})
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]


def test_bad_form_values_get_a_clear_4xx(client: TestClient, phantom_slice) -> None:
    image = phantom_slice[0].read_bytes()
    unknown = client.post("/predict", files={"file": ("s.png", image)}, data={"model": "unet3d"})
    assert unknown.status_code == 404 and "served: nested_unet, attention_unet" in unknown.json()["detail"]
    assert client.post("/predict", files={"file": ("s.png", image)}, data={"threshold": "1.5"}).status_code == 422
    assert client.post("/predict", data={"model": "all"}).status_code == 422
    both = client.post("/predict/mask", files={"file": ("s.png", image)}, data={"model": "all"})
    assert both.status_code == 422 and "name one model" in both.json()["detail"]


def test_a_declared_oversized_body_is_refused_before_it_is_read(client: TestClient) -> None:
    response = client.post("/predict", content=b"x" * 400_000, headers={"content-type": "application/octet-stream"})
    assert response.status_code == 413 and "limit" in response.json()["detail"]


def test_a_multi_page_tiff_is_refused_before_any_page_is_decoded(client: TestClient, tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    pages = tmp_path / "pages.tif"
    tifffile.imwrite(pages, np.zeros((400, 256, 256), np.uint8), compression="zlib")  # 400 pages, ~26 MB decoded
    assert pages.stat().st_size < 200_000

    def decode_nothing(*args, **kwargs):
        raise AssertionError("a page was decoded")

    monkeypatch.setattr("metaseg_tf.serve.uploads.read_image", decode_nothing)
    response = client.post("/predict", files={"file": ("pages.tif", pages.read_bytes())})
    assert response.status_code == 422 and "400 pages" in response.json()["detail"]


def test_a_decompression_bomb_is_too_large_not_damaged(client: TestClient) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 30_000, 30_000, 8, 0, 0, 0, 0)  # 900 M grey pixels declared
    bomb = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    response = client.post("/predict", files={"file": ("bomb.png", bomb)})
    assert response.status_code == 413 and "too large" in response.json()["detail"]


def test_a_chunked_upload_without_length_is_cut_off_at_the_limit(app) -> None:
    """At the ASGI level, as a server delivers a chunked body: reading stops soon after the 200 kB limit."""
    import asyncio

    head = b'--cut\r\nContent-Disposition: form-data; name="file"; filename="s.png"\r\n\r\n'
    pulled, sent = [], []

    async def receive() -> dict:  # 2 MB in 10 kB chunks, no Content-Length
        pulled.append(1)
        body = head if len(pulled) == 1 else b"x" * 10_000
        return {"type": "http.request", "body": body, "more_body": len(pulled) < 200}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": "/predict", "raw_path": b"/predict", "query_string": b"", "root_path": "",
             "headers": [(b"content-type", b"multipart/form-data; boundary=cut"), (b"transfer-encoding", b"chunked")],
             "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80)}
    asyncio.run(app(scope, receive, send))
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 413
    assert b"limit" in b"".join(m.get("body", b"") for m in sent[1:])
    assert len(pulled) < 40, f"{len(pulled) * 10} kB were read before the refusal"


def test_concurrent_predictions_all_succeed(client: TestClient, phantom_slice) -> None:
    image, failures, masks = phantom_slice[0].read_bytes(), [], []

    def request() -> None:
        response = client.post("/predict", files={"file": ("s.png", image)},
                               data={"model": "nested_unet", "threshold": "0.05"})
        (masks if response.status_code == 200 else failures).append(response)

    threads = [threading.Thread(target=request) for _ in range(24)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not failures and len(masks) == 24
    assert len({r.json()["predictions"][0]["mask_png"] for r in masks}) == 1, "same input, same mask"
    assert masks[0].json()["predictions"][0]["lesions"]["total_px"] > 0, "the shared mask is not empty"


def test_start_up_without_runs_names_the_command_that_makes_them(tmp_path: Path, capsys) -> None:
    with pytest.raises(ServeError, match="metaseg pipeline"):
        newest_pipeline_runs(tmp_path)
    assert main(["serve", "--api-only", "--runs", str(tmp_path / "missing")]) == 2
    assert "cannot load" in capsys.readouterr().err


@pytest.fixture(scope="module")
def token_app(served_runs: list[Path]):
    return create_app(served_runs, ServeSettings(max_upload_bytes=200_000, max_side_pixels=512, token=TOKEN))


@pytest.mark.parametrize("with_token", [False, True], ids=["without-token", "with-token"])
def test_fuzzed_requests_never_cause_a_server_error(token_app, with_token: bool) -> None:
    """Schemathesis generates requests from the OpenAPI schema (valid and invalid) for every operation of a
    service with an access token, sent with it and without: never a 5xx; without it, nothing but /health
    answers anything but 401."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", token_app, headers={"Authorization": f"Bearer {TOKEN}"})
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} == {"/health", "/models", "/limits", "/predict",
                                                            "/predict/mask", "/predict/volume", "/predict/dicom"}
    headers = {"Authorization": f"Bearer {TOKEN}"} if with_token else {}  # a wrong token: the route test
    statuses: set[int] = set()
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=10, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            response = case.call_and_validate(headers=headers, checks=[not_a_server_error])
            statuses.add(response.status_code)
            if not with_token and operation.path != "/health":
                assert response.status_code == 401

        call()
    assert (200 in statuses) and (with_token or statuses <= {200, 401})


def test_a_volume_comes_back_as_a_seg_on_its_own_grid(client: TestClient, app, phantom_volume, tmp_path: Path) -> None:
    volume, _ = phantom_volume
    response = client.post("/predict/volume",
                           files={"files": ("../../etc/BraTS-MET-00110-000-t1c.nii.gz", _nifti(volume))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["case_id"] == "BraTS-MET-00110-000" and body["shape"] == [6, 40, 36]
    assert body["non_finite_voxels"] == 0 and body["warnings"] == []
    assert body["axial_slices"] == 6 and body["canonical_shape"] == [6, 36, 40]
    assert body["spacing_mm"] == pytest.approx([3.0, 0.9, 1.0])
    assert [p["model"] for p in body["predictions"]] == ["nested_unet", "attention_unet"]
    (tmp_path / "case-t1c.nii.gz").write_bytes(_nifti(volume))
    for prediction in body["predictions"]:
        seg = _seg(prediction["seg_nii_gz"])
        labels = np.asarray(seg.dataobj)
        assert prediction["seg_filename"] == "BraTS-MET-00110-000-seg.nii.gz" and prediction["scores"] is None
        assert seg.shape == volume.shape and np.allclose(seg.affine, AXIAL_FIRST) and labels.dtype == np.uint8
        assert set(np.unique(labels)) <= {0, 1} and prediction["lesion_voxels"] == int(labels.sum())
        lesions = prediction["lesions"]  # the lesion table: they add up to the seg, with sizes in mm
        assert sum(lesion["voxels"] for lesion in lesions) == prediction["lesion_voxels"]
        assert all(lesion["volume_mm3"] == pytest.approx(lesion["voxels"] * 3.0 * 0.9 * 1.0) for lesion in lesions)
        assert all(0 <= lesion["first_slice"] <= lesion["centre_slice"] <= lesion["last_slice"] < 6 for lesion in lesions)
        assert prediction["shape"] == [6, 40, 36] and prediction["slices"] == 6 and prediction["latency_ms"] > 0
        # the library's own prediction of the same file, put back into the file's grid, is the same seg
        predictor = app.state.models[prediction["model"]].predictor
        case = read_case(nifti_case(predictor, [tmp_path / "case-t1c.nii.gz"]), ("t1c", "t2f", "t1n"))
        expected = from_canonical(predictor.predict_volume(case).labels, AXIAL_FIRST)
        assert np.array_equal(labels, expected)


def test_one_volume_per_sequence_is_the_same_case_as_one_for_all(client: TestClient, phantom_volume) -> None:
    data = _nifti(phantom_volume[0])
    one = client.post("/predict/volume", files={"files": ("v.nii.gz", data)}, data={"model": "attention_unet"})
    three = client.post("/predict/volume", data={"model": "attention_unet"},
                        files=[("files", (f"v-{name}.nii.gz", data)) for name in ("t1c", "t2f", "t1n")])
    assert one.status_code == three.status_code == 200, three.text
    assert three.json()["case_id"] == "v", "named as the case, without its sequence"
    first, second = (np.asarray(_seg(r.json()["predictions"][0]["seg_nii_gz"]).dataobj) for r in (one, three))
    assert np.array_equal(first, second)


def test_a_seg_upload_gives_per_case_scores(client: TestClient, phantom_volume) -> None:
    volume, truth = phantom_volume
    voxels = []
    for threshold in (0.05, 0.95):
        response = client.post("/predict/volume", data={"model": "nested_unet", "threshold": str(threshold)},
                               files=[("files", ("case.nii", _nifti(volume, compressed=False))),
                                      ("seg", ("case-seg.nii.gz", _nifti(truth)))])
        assert response.status_code == 200, response.text
        (prediction,) = response.json()["predictions"]
        assert prediction["threshold"] == threshold
        voxels.append(prediction["lesion_voxels"])
        (scores,) = prediction["scores"].values()  # the served runs segment one region
        assert set(scores) == set(VOLUME_SCORES)
        assert 0 <= scores["dice"] <= 1 and 0 <= scores["lesion_dice"] <= 1
        assert scores["hd95"] >= 0 and scores["lesion_hd95"] >= 0
        assert scores["truth_lesions"] >= 1 and 0 <= scores["detected_lesions"] <= scores["truth_lesions"]
        assert scores["false_positive_lesions"] >= 0
    assert voxels[0] >= voxels[1] and voxels[0] > 0


def test_a_volume_may_be_larger_than_the_slice_limit(client: TestClient) -> None:
    """The body limit of /predict/volume follows max_volume_bytes; /predict keeps its own (about 264 kB here)."""
    volume = np.random.default_rng(0).random((6, 110, 120)).astype(np.float32)
    data = _nifti(volume, compressed=False)
    assert len(data) > 300_000
    response = client.post("/predict/volume", files={"files": ("big.nii", data)}, data={"model": "nested_unet"})
    assert response.status_code == 200, response.text
    assert client.post("/predict", files={"file": ("big.png", data)}).status_code == 413


def _header_only(shape: tuple[int, ...]) -> bytes:
    """A gzipped NIfTI whose header declares ``shape`` (uint8) but holds no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(np.uint8)
    header["vox_offset"] = 352
    return gzip.compress(header.binaryblock + bytes(4))


def _singular_affine_nifti(volume: np.ndarray) -> bytes:
    """A NIfTI whose sform maps two voxel axes into one plane (its third row is zero), as a broken writer may."""
    image = nib.Nifti1Image(volume, None)
    image.header.set_sform(np.diag([1.0, 1.0, 0.0, 1.0]), code=1)
    image.header.set_qform(None, code=0)
    return gzip.compress(image.to_bytes())


def _bad_volume_uploads() -> dict[str, tuple[list, dict, int, str]]:
    volume = np.random.default_rng(3).random((6, 40, 36)).astype(np.float32)
    good = ("files", ("v.nii.gz", _nifti(volume)))
    labels = np.zeros((6, 40, 36), np.float32)
    labels[2, 10:20, 10:20] = 2.5
    complete = _nifti(volume, compressed=False)
    return {
        "empty": ([("files", ("v.nii.gz", b""))], {}, 422, "empty"),
        "png": ([("files", ("v.nii.gz", _png(np.zeros((40, 36), np.uint8))))], {}, 415, "not a NIfTI"),
        "gzipped text": ([("files", ("v.nii.gz", gzip.compress(b"patient name, dose\n" * 50)))], {}, 415,
                         "not a NIfTI"),
        "4D": ([("files", ("v.nii.gz", _nifti(np.zeros((6, 40, 36, 2), np.float32))))], {}, 422, "3D volume"),
        "truncated": ([("files", ("v.nii", complete[: len(complete) // 2]))], {}, 422, "truncated"),
        "damaged header": ([("files", ("v.nii", complete[:348] + b"\xff" * 8))], {}, 422, "damaged"),
        "header declares 1e9 voxels": ([("files", ("v.nii.gz", _header_only((1000, 1000, 1000))))], {}, 413,
                                       "limit is 40000000 voxels"),
        "two files for three sequences": ([good, good], {}, 422, "takes 3 sequence(s) (t1c, t2f, t1n)"),
        "seg on another grid": ([good, ("seg", ("s.nii.gz", _nifti(np.zeros((6, 40, 35), np.uint8))))], {}, 422,
                                "one voxel grid"),
        "seg with another affine": ([good, ("seg", ("s.nii.gz", _nifti(np.zeros((6, 40, 36), np.uint8), np.eye(4))))],
                                    {}, 422, "another affine"),
        "seg with non-integer labels": ([good, ("seg", ("s.nii.gz", _nifti(labels)))], {}, 422, "integers"),
        "unknown model": ([good], {"model": "unet3d"}, 404, "served: nested_unet, attention_unet"),
        "singular affine": ([("files", ("v.nii.gz", _singular_affine_nifti(volume)))], {}, 422, "invalid affine"),
        "complex voxels": ([("files", ("v.nii.gz", _nifti(volume.astype(np.complex64) * (1 + 1j))))], {}, 422,
                           "complex-valued voxels"),
        "1x1x1": ([("files", ("v.nii.gz", _nifti(np.ones((1, 1, 1), np.float32))))], {}, 422,
                  "reads axial slices of 32x32 px; this volume's are 1x1 voxels"),
        "slices smaller than the input": ([("files", ("v.nii.gz", _nifti(volume[:, :20, :])))], {}, 422,
                                          "this volume's are 36x20 voxels, smaller than that"),
    }


@pytest.mark.parametrize("case", list(_bad_volume_uploads()))
def test_bad_volume_uploads_get_a_clear_4xx(client: TestClient, case: str) -> None:
    files, data, status, message = _bad_volume_uploads()[case]
    response = client.post("/predict/volume", files=files, data=data)
    assert response.status_code == status, response.text
    assert message in response.json()["detail"]
    assert "/tmp" not in response.json()["detail"], "no server path in the answer"


def test_a_model_with_context_refuses_a_volume_with_fewer_slices_than_it_spans(app) -> None:
    """A 2.5D model with 2 neighbours on each side needs 5 axial slices (the served phantom models read one:
    the check is the same function, given such a model's settings)."""
    from fastapi import HTTPException

    from metaseg_tf.serve.volume_requests import _check_readable

    served = copy.copy(app.state.models["nested_unet"])
    served.predictor = copy.copy(served.predictor)
    served.predictor.config = served.predictor.config.replace(context_slices=2)
    _check_readable(served, (5, 40, 36), AXIAL_FIRST)
    with pytest.raises(HTTPException, match="needs at least 5 axial slices, this volume has 4") as refused:
        _check_readable(served, (4, 40, 36), AXIAL_FIRST)
    assert refused.value.status_code == 422


def test_an_all_nan_volume_says_that_nothing_finite_was_there(client: TestClient) -> None:
    volume = np.full((6, 40, 36), np.nan, np.float32)
    response = client.post("/predict/volume", files={"files": ("v.nii.gz", _nifti(volume))})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["non_finite_voxels"] == volume.size
    assert body["warnings"] == [f"nothing finite in the volume: all {volume.size} voxels read are NaN or infinite "
                                "(set to 0); the masks were predicted from an empty image and mean nothing"]
    volume[0, 0, :5] = 1.0
    partly = client.post("/predict/volume", files={"files": ("v.nii.gz", _nifti(volume))}).json()
    assert partly["warnings"] == [f"{volume.size - 5} NaN or infinite voxel(s) of {volume.size} read were set to 0"]


def test_models_say_what_they_were_trained_on(client: TestClient) -> None:
    for model in client.get("/models").json():
        assert model["trained_on"]["dataset"] == "synthetic phantom"
        assert model["trained_on"]["synthetic_phantom"] is True and model["trained_on"]["layout"] == "kaggle_3m"
        assert "not meaningful" in model["note"] and model["target"] == "any"
        metrics = model["test_metrics"]  # the newest test evaluation of the run, once another test has made one
        assert metrics == {} or 0 <= metrics["per_patient_dice"] <= 1 and metrics["patients"] >= 1


def test_volume_limits_of_the_settings(limited_client: TestClient) -> None:
    """max_volume_bytes per file, max_voxels from the header, and the body limit of the volume endpoint."""
    over_bytes = _nifti(np.zeros((6, 40, 36), np.float32), compressed=False)  # 35 kB, 8640 voxels
    response = limited_client.post("/predict/volume", files={"files": ("v.nii", over_bytes)})
    assert response.status_code == 413 and "30000 bytes per volume" in response.json()["detail"]
    over_voxels = _nifti(np.zeros((16, 16, 8), np.uint8))  # 2048 voxels, a few hundred bytes
    response = limited_client.post("/predict/volume", files={"files": ("v.nii.gz", over_voxels)})
    assert response.status_code == 413 and "2048 voxels (16x16x8); the limit is 1000" in response.json()["detail"]
    body = limited_client.post("/predict/volume", content=b"x" * 200_000,
                               headers={"content-type": "application/octet-stream"})
    assert body.status_code == 413 and "limit of 185536 bytes" in body.json()["detail"]  # 4 x 30 000 + 64 KiB


def test_volume_limits_come_from_the_environment(served_runs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("METASEG_SERVE_RUNS", os.pathsep.join(map(str, served_runs)))
    monkeypatch.setenv("METASEG_MAX_VOLUME_MB", "0.5")
    monkeypatch.setenv("METASEG_MAX_VOXELS", "123456")
    settings = app_from_environment().state.settings
    assert (settings.max_volume_bytes, settings.max_voxels) == (512 * 1024, 123456)
    assert settings.max_upload_bytes == 20 * 1024 * 1024


def test_a_pruned_u_net_plus_plus_is_served_at_its_level(served_runs: list[Path], phantom_slice,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from metaseg_tf.inference.predictor import Predictor

    monkeypatch.setenv("METASEG_SERVE_RUNS", os.pathsep.join(map(str, served_runs)))
    monkeypatch.setenv("METASEG_LEVEL", "1")
    image = phantom_slice[0]
    with TestClient(app_from_environment()) as pruned_client:
        described = {m["name"]: m for m in pruned_client.get("/models").json()}
        assert {name: m["level"] for name, m in described.items()} == {"nested_unet": 1, "attention_unet": None}
        whole = Predictor.from_run(served_runs[0]).model.count_params()
        assert described["nested_unet"]["parameters"] < whole, "the served (pruned) network's parameters"
        reply = pruned_client.post("/predict", files={"file": ("s.png", image.read_bytes())},
                                   data={"model": "nested_unet", "threshold": "0.05"}).json()
    served = reply["predictions"][0]["probability"]
    expected = Predictor.from_run(served_runs[0], level=1).predict_slices(
        [cv2.imread(str(image), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255])[0].probability
    assert served["max"] == pytest.approx(float(expected.max()), abs=1e-5)
    assert served["mean"] == pytest.approx(float(expected.mean()), abs=1e-5)


def test_several_workers_are_several_uvicorn_processes() -> None:
    from metaseg_tf.serve.launch import api_command, serve

    assert "--workers" not in api_command("127.0.0.1", 8000)
    assert api_command("127.0.0.1", 8000, workers=3)[-2:] == ["--workers", "3"]
    with pytest.raises(ServeError, match="workers must be >= 1"):
        serve([], workers=0)
