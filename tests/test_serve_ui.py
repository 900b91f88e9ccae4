"""The Streamlit front end: its logic with AppTest against a live API on loopback, and its helpers."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
import uvicorn
from conftest import free_port
from streamlit.testing.v1 import AppTest

from metaseg_tf.evaluation.scores import overlap_scores
from metaseg_tf.serve.api import create_app
from metaseg_tf.serve.launch import UI_SCRIPT
from metaseg_tf.serve.ui import overlay, prediction_rows


@pytest.fixture(scope="module")
def api_url(served_runs: list[Path]):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served_runs), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


def _app(monkeypatch: pytest.MonkeyPatch, url: str, tmp_path: Path) -> AppTest:
    monkeypatch.setenv("METASEG_API_URL", url)
    monkeypatch.setattr("metaseg_tf.paths.EXAMPLE_PHANTOM_DIR", str(tmp_path / "examples"))
    return AppTest.from_file(str(UI_SCRIPT), default_timeout=120)


def _captions(app: AppTest) -> list[str]:
    return [caption for image in app.image for caption in image.captions if caption]


def test_a_banner_says_when_the_backend_is_down(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    app = _app(monkeypatch, f"http://127.0.0.1:{free_port()}", tmp_path).run()
    assert not app.exception
    assert "not reachable" in app.error[0].value and "metaseg serve" in app.error[0].value


def test_without_a_slice_the_app_asks_for_one(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, api_url: str) -> None:
    app = _app(monkeypatch, api_url, tmp_path).run()
    assert not app.exception and not app.error
    assert "Upload a slice" in app.info[0].value
    assert app.sidebar.multiselect[0].value == ["nested_unet", "attention_unet"]


def test_a_phantom_example_shows_both_models_with_metrics(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                           api_url: str) -> None:
    app = _app(monkeypatch, api_url, tmp_path).run()
    app.button[0].click().run()
    assert not app.exception and not app.error
    table = app.table[0].value
    assert list(table.index) == ["nested_unet", "attention_unet"]
    assert {"dice", "iou", "precision", "recall", "lesions", "inference (ms)"} <= set(table.columns)
    assert table["dice"].between(0, 1).all()
    assert _captions(app) == ["original", "ground truth", "nested_unet", "attention_unet"]

    app.sidebar.multiselect[0].set_value(["attention_unet"]).run()
    assert list(app.table[0].value.index) == ["attention_unet"]
    assert _captions(app) == ["original", "ground truth", "attention_unet"]
    app.sidebar.checkbox[0].check().run()
    assert any("attention coefficients" in header.value for header in app.subheader)


def test_overlay_and_mask_only_views() -> None:
    image = np.zeros((20, 30, 3), np.float32)
    image[..., 1] = np.linspace(0, 1, 30)
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:15] = 1
    shown = overlay(image, mask, (230, 30, 30), mask_only=False)
    assert shown.shape == (20, 30, 3) and shown.dtype == np.uint8
    assert shown[7, 10, 0] > shown[7, 10, 2], "inside the lesion the red tint shows"
    assert np.array_equal(shown[15, 20], np.repeat(shown[15, 20, 0], 3)), "outside it stays grey"
    only = overlay(image, mask, (230, 30, 30), mask_only=True)
    assert set(np.unique(only)) == {0, 255} and only[7, 10, 0] == 255


def test_metric_rows_agree_with_the_evaluation_module() -> None:
    truth = np.zeros((16, 16), np.uint8)
    truth[2:8, 2:8] = 1
    pred = np.zeros((16, 16), np.uint8)
    pred[4:10, 4:10] = 255
    rows = prediction_rows([{"model": "m", "lesions": {"count": 1, "total_px": 36}, "latency_ms": 3.0}],
                           {"m": pred}, truth)
    expected = overlap_scores(truth > 0, pred > 0)
    assert rows.loc[0, "dice"] == pytest.approx(expected["dice"], abs=1e-4)
    assert rows.loc[0, "iou"] == pytest.approx(expected["iou"], abs=1e-4)
    assert "dice" not in prediction_rows([{"model": "m", "lesions": {"count": 1, "total_px": 36}, "latency_ms": 3.0}],
                                         {"m": pred}, None).columns
