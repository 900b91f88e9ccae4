"""The prediction API: every endpoint, every kind of bad upload, concurrency and a schema fuzz."""

from __future__ import annotations

import base64
import threading
from pathlib import Path

import cv2
import numpy as np
import pytest
import schemathesis
import tifffile
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from scipy import ndimage

from metaseg_tf.cli import main
from metaseg_tf.serve.api import (
    ServeError,
    ServeSettings,
    create_app,
    newest_pipeline_runs,
)


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


def test_health_and_models_describe_what_is_served(client: TestClient, served_runs: list[Path]) -> None:
    assert client.get("/health").json() == {"status": "ok", "models": ["nested_unet", "attention_unet"]}
    models = {m["name"]: m for m in client.get("/models").json()}
    assert set(models) == {"nested_unet", "attention_unet"}
    for model in models.values():
        assert model["input_size"] == 32 and model["channels"] == 3 and model["clahe"] is True
        assert model["parameters"] > 0 and model["run"] in {run.name for run in served_runs}
        assert model["training_data"]["patients_per_part"] == {"train": 4, "val": 1, "test": 1}
        assert model["training_data"]["slices_per_part"]["train"] == 32 and model["training_data"]["skipped"] == 0


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

    monkeypatch.setattr("metaseg_tf.serve.api.read_image", decode_nothing)
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


def test_fuzzed_requests_never_cause_a_server_error(app) -> None:
    """Schemathesis generates requests from the OpenAPI schema (valid and invalid) for every operation."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.path for operation in operations} == {"/health", "/models", "/predict", "/predict/mask"}
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
        def call(case) -> None:
            case.call_and_validate(checks=[not_a_server_error])

        call()
