"""The Streamlit front end: its logic with AppTest against a live API on loopback, and its helpers."""

from __future__ import annotations

import base64
import gzip
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import uvicorn
from conftest import free_port
from streamlit.testing.v1 import AppTest

from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import read_image, read_mask
from metaseg_tf.data.intensity import window_volume
from metaseg_tf.data.volumes import to_canonical
from metaseg_tf.evaluation.scores import overlap_scores
from metaseg_tf.serve.api import ServeSettings, create_app
from metaseg_tf.serve.client import request_volume_prediction
from metaseg_tf.serve.launch import UI_SCRIPT
from metaseg_tf.serve.ui import (
    canonical_volume,
    decode_volume_seg,
    default_slice,
    display_volume,
    lesion_rows,
    nifti_from_bytes,
    overlay,
    prediction_rows,
    volume_rows,
    volume_slice_panels,
)

# voxel axis 0 is axial, axis 1 right to left, axis 2 posterior to anterior: unlike the canonical order
AXIAL_FIRST = np.array([[0.0, -1.0, 0.0, 20.0], [0.0, 0.0, 0.9, -15.0], [3.0, 0.0, 0.0, -6.0], [0.0, 0.0, 0.0, 1.0]])


TOKEN = "a-ui-test-token-0123456789abcdef"


def _live_api(served_runs: list[Path], settings: ServeSettings | None = None):
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(served_runs, settings), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 60
    while not server.started and time.time() < deadline:
        time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture(scope="module")
def api_url(served_runs: list[Path]):
    yield from _live_api(served_runs)


@pytest.fixture(scope="module")
def token_api_url(served_runs: list[Path]):
    yield from _live_api(served_runs, ServeSettings(token=TOKEN))


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


def test_models_trained_on_the_phantom_carry_a_banner(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                      api_url: str) -> None:
    app = _app(monkeypatch, api_url, tmp_path).run()
    assert [warning.value for warning in app.warning] == [
        f"{name}: trained on the synthetic phantom: its masks on real scans are not meaningful; serve a run "
        "trained on real data (metaseg serve --runs RUN)" for name in ("nested_unet", "attention_unet")]
    assert not app.sidebar.text_input(key="token").value, "the UI holds no token of its own"


def test_a_service_with_a_token_is_used_once_the_person_types_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                  token_api_url: str) -> None:
    monkeypatch.setenv("METASEG_API_TOKEN", TOKEN)  # not read by the UI: a visitor of its port must type it
    app = _app(monkeypatch, token_api_url, tmp_path).run()
    assert not app.exception and "needs an access token: enter it in the sidebar" in app.warning[0].value
    app.sidebar.text_input(key="token").input("not-the-token-at-all").run()
    assert "the one given was not accepted" in app.warning[0].value
    app.sidebar.text_input(key="token").input(TOKEN).run()
    assert not app.exception and "Upload a slice" in app.info[0].value
    app.button[0].click().run()
    assert not app.error and list(app.table[0].value.index) == ["nested_unet", "attention_unet"]


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
    app.checkbox(key="attention").check().run()
    assert any("attention coefficients" in header.value for header in app.subheader)


def test_each_model_predicts_at_its_own_threshold_unless_one_is_set(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                                    api_url: str) -> None:
    app = _app(monkeypatch, api_url, tmp_path).run()
    app.button[0].click().run()
    assert not app.exception and not app.sidebar.slider
    assert "each model's own threshold (nested_unet 0.50, attention_unet 0.50)" in app.caption[0].value
    own_recall = app.table[0].value["recall"].astype(float)
    app.sidebar.checkbox[0].uncheck().run()
    app.sidebar.slider[0].set_value(0.95).run()
    assert not app.exception and "threshold 0.95" in app.caption[0].value
    assert (app.table[0].value["recall"].astype(float) <= own_recall).all(), "a higher threshold masks a subset"


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


@pytest.fixture(scope="module")
def phantom_case(phantom_slice) -> tuple[np.ndarray, np.ndarray]:
    """A (4, 64, 50) volume of the phantom slice with the largest lesion (file order, AXIAL_FIRST) and its mask."""
    image, mask = read_image(phantom_slice[0], 1)[..., 0], read_mask(phantom_slice[1])
    columns = np.nonzero(mask)[1]
    left = int(np.clip(columns.mean() - 25, 0, mask.shape[1] - 50))
    volume = np.stack([image[:, left : left + 50] * 1000] * 4).astype(np.float32)
    return volume, np.stack([mask[:, left : left + 50] > 0] * 4).astype(np.uint8)


def _nifti_bytes(array: np.ndarray, compressed: bool = True, image_class=nib.Nifti1Image) -> bytes:
    data = image_class(array, AXIAL_FIRST).to_bytes()
    return gzip.compress(data) if compressed else data


def test_a_volume_from_the_api_decodes_to_the_canonical_arrays(api_url: str, phantom_case) -> None:
    volume, truth = phantom_case
    response, error = request_volume_prediction(api_url, [("case.nii.gz", _nifti_bytes(volume))],
                                                ("case-seg.nii.gz", _nifti_bytes(truth)), "all", 0.05)
    assert error is None, error
    assert response["canonical_shape"] == [4, 50, 64] and response["axial_slices"] == 4
    assert np.array_equal(canonical_volume(_nifti_bytes(volume)), to_canonical(volume, AXIAL_FIRST))
    for prediction in response["predictions"]:
        seg = decode_volume_seg(prediction["seg_nii_gz"])
        written = nib.Nifti1Image.from_bytes(gzip.decompress(base64.b64decode(prediction["seg_nii_gz"])))
        assert np.array_equal(seg, to_canonical(np.asarray(written.dataobj), written.affine))
        assert seg.shape == (4, 50, 64) and seg.dtype == np.uint8 and seg.sum() == prediction["lesion_voxels"] > 0
        # the API's Dice is the overlap of this decoded seg with the canonical truth: both are oriented alike
        (scores,) = prediction["scores"].values()
        dice = overlap_scores(to_canonical(truth, AXIAL_FIRST) > 0, seg > 0)["dice"]
        assert scores["dice"] == pytest.approx(dice, abs=1e-6)
    table = volume_rows(response["predictions"])
    assert list(table["model"]) == ["nested_unet", "attention_unet"] and table["dice"].between(0, 1).all()
    lesions = lesion_rows(response["predictions"])
    assert len(lesions) == sum(len(p["lesions"]) for p in response["predictions"]) > 0
    assert set(lesions["model"]) <= {"nested_unet", "attention_unet"} and lesions["volume (mm³)"].gt(0).all()
    refused, error = request_volume_prediction(api_url, [("case.nii.gz", b"\x89PNG\r\n\x1a\n" + bytes(40))], None,
                                               "all", 0.5)
    assert refused is None and error.startswith("415:") and "not a NIfTI" in error


def test_nifti_bytes_of_every_kind_are_read_and_others_refused(phantom_case) -> None:
    volume = phantom_case[0]
    expected = to_canonical(volume, AXIAL_FIRST)
    for data in (_nifti_bytes(volume), _nifti_bytes(volume, compressed=False),
                 _nifti_bytes(volume, image_class=nib.Nifti2Image)):
        assert np.array_equal(canonical_volume(data), expected)
        assert np.allclose(nifti_from_bytes(data).affine, AXIAL_FIRST)
    assert np.array_equal(display_volume(_nifti_bytes(volume)), window_volume(expected)[0])
    for bad in (b"", b"\x89PNG\r\n\x1a\n" + bytes(400), gzip.compress(b"text" * 100), _nifti_bytes(volume)[:100]):
        with pytest.raises(DataError):
            canonical_volume(bad)
    with pytest.raises(DataError, match="3D volume"):
        canonical_volume(_nifti_bytes(np.zeros((4, 5, 6, 2), np.float32)))


def test_the_panels_of_a_volume_slice_and_the_default_slice() -> None:
    volume = np.random.default_rng(0).random((5, 20, 30)).astype(np.float32)
    truth, seg = np.zeros((5, 20, 30), np.uint8), np.zeros((5, 20, 30), np.uint8)
    truth[3, 5:10, 5:10] = 2
    seg[3, 6:10, 6:12], seg[1, 0:2, 0:2] = 1, 1
    panels = volume_slice_panels(volume, 3, truth, {"m": seg}, mask_only=True)
    assert [caption for caption, _ in panels] == ["original", "ground truth", "m"]
    assert all(picture.shape == (20, 30, 3) and picture.dtype == np.uint8 for _, picture in panels)
    assert np.array_equal(panels[1][1][..., 0] > 0, truth[3] > 0)
    assert np.array_equal(panels[2][1][..., 0] > 0, seg[3] > 0)
    assert [caption for caption, _ in volume_slice_panels(volume, 0, None, {}, mask_only=False)] == ["original"]
    assert default_slice({"m": seg}, 5) == 3 and default_slice({"m": np.zeros_like(seg)}, 5) == 2
    assert default_slice({}, 7) == 3


def test_volume_rows_without_a_label_map_have_no_scores() -> None:
    rows = volume_rows([{"model": "m", "lesion_voxels": 12, "latency_ms": 1500.0, "scores": None}])
    assert list(rows.columns) == ["model", "lesion voxels", "inference (s)"] and rows.loc[0, "inference (s)"] == 1.5


def test_the_volume_mode_asks_for_a_nifti(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, api_url: str) -> None:
    app = _app(monkeypatch, api_url, tmp_path).run()
    app.radio(key="mode").set_value("NIfTI volume").run()
    assert not app.exception and not app.error
    assert "Upload a NIfTI volume" in app.info[0].value
    assert not app.button, "the slice mode's phantom button is not shown"
