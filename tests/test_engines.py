"""Inference engines: ONNX Runtime and OpenVINO give Keras' probabilities and masks, in the library, the
command line and the API."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import cv2
import numpy as np
import pytest

from metaseg_tf.inference.export import load_engine
from metaseg_tf.inference.files import predict_path
from metaseg_tf.inference.predictor import Predictor

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
@pytest.mark.parametrize("index", [0, 1])  # U-Net++ (deep supervision) and Attention U-Net
def test_engines_give_the_keras_probabilities_and_masks(served_runs: list[Path], engine: str, index: int) -> None:
    run = served_runs[index]
    rng = np.random.default_rng(index)
    images = [rng.random((48, 40, 3)).astype(np.float32) for _ in range(5)]
    keras_predictions = Predictor.from_run(run, threshold=0.3).predict_slices(images)
    other = Predictor.from_run(run, threshold=0.3, engine=engine)
    assert other.engine.name == engine
    for expected, found in zip(keras_predictions, other.predict_slices(images)):
        assert np.abs(expected.probability - found.probability).max() < 1e-4
        np.testing.assert_array_equal(expected.mask, found.mask)
    batch = rng.normal(size=(3, 32, 32, 3)).astype(np.float32)
    difference = np.abs(load_engine(run, engine).predict(batch) - load_engine(run, "keras").predict(batch))
    assert difference.max() < 1e-4


def test_predict_folder_and_api_with_an_engine_match_keras(served_runs: list[Path], phantom_dir: Path,
                                                         tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from metaseg_tf.serve.api import ServeSettings, create_app

    run = served_runs[1]
    source = sorted(phantom_dir.rglob("*_4.png"))[:3]
    keras_dir, _ = predict_path(Predictor.from_run(run), source, tmp_path / "keras", progress=False)
    onnx_dir, _ = predict_path(Predictor.from_run(run, engine="onnx"), source, tmp_path / "onnx", progress=False)
    for mask in keras_dir.glob("*_mask.png"):
        np.testing.assert_array_equal(cv2.imread(str(mask)), cv2.imread(str(onnx_dir / mask.name)))
    image = source[0].read_bytes()
    masks = {}
    for engine in ("keras", "openvino"):
        with TestClient(create_app([run], ServeSettings(engine=engine))) as client:
            assert client.get("/models").json()[0]["engine"] == engine
            served = next(iter(client.app.state.models.values()))
            assert (served.serialised() is served.lock) == (engine == "keras"), "only Keras is called under the lock"
            if engine == "openvino":  # the served sessions share the cores instead of each taking all of them
                assert served.predictor.engine.threads == max(1, os.cpu_count() or 1)
                assert served.predictor.engine.compiled.get_property("INFERENCE_NUM_THREADS") == served.predictor.engine.threads
            reply = client.post("/predict", files={"file": ("x.png", image)}, data={"threshold": "0.3"}).json()
            masks[engine] = base64.b64decode(reply["predictions"][0]["mask_png"])
    np.testing.assert_array_equal(cv2.imdecode(np.frombuffer(masks["keras"], np.uint8), 0),
                                  cv2.imdecode(np.frombuffer(masks["openvino"], np.uint8), 0))


@pytest.mark.parametrize("engine", ["onnx", "openvino"])
def test_concurrent_engines_give_each_thread_its_own_answer(served_runs: list[Path], engine: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    served = load_engine(served_runs[1], engine)
    assert served.concurrent and not load_engine(served_runs[1], "keras").concurrent
    batches = [np.random.default_rng(seed).normal(size=(2, 32, 32, 3)).astype(np.float32) for seed in range(12)]
    alone = [served.predict(batch) for batch in batches]
    with ThreadPoolExecutor(max_workers=6) as pool:
        together = list(pool.map(served.predict, batches))
    for expected, found in zip(alone, together):
        np.testing.assert_array_equal(expected, found)


def test_predict_at_a_pruned_level_uses_the_pruned_network(served_runs: list[Path], phantom_dir: Path,
                                                           tmp_path: Path) -> None:
    from metaseg_tf.cli import main

    run = served_runs[0]
    source = sorted(phantom_dir.rglob("*_4.png"))[:2]
    images = [cv2.imread(str(path), cv2.IMREAD_COLOR)[..., ::-1].astype(np.float32) / 255 for path in source]
    for engine in ("keras", "onnx"):
        pruned = Predictor.from_run(run, engine=engine, level=1).predict_slices(images)
        reference = Predictor.from_run(run, level=1).predict_slices(images)
        whole = Predictor.from_run(run).predict_slices(images)
        for a, b, c in zip(pruned, reference, whole):
            assert np.abs(a.probability - b.probability).max() < 1e-4
            assert np.abs(a.probability - c.probability).max() > 1e-4
    assert main(["-q", "predict", str(run), "--input", *map(str, source), "--out", str(tmp_path), "--level", "1"]) == 0
    assert len(list(tmp_path.rglob("*_mask.png"))) == 2


@pytest.mark.parametrize(("engine", "level"), [("openvino", None), ("keras", 2), ("onnx", 1)])
def test_evaluate_scores_the_masks_predict_writes_for_any_engine_and_level(
        served_runs: list[Path], phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture,
        engine: str, level: int | None) -> None:
    """One path to a mask: ``metaseg evaluate --engine E --level L`` scores exactly the masks that ``metaseg
    predict --engine E --level L`` writes for the same test patients (U-Net++, deep supervision)."""
    import json

    import pandas as pd

    from metaseg_tf.cli import main
    from metaseg_tf.data.io import read_mask

    run = served_runs[0]
    flags = ["--engine", engine, "--threshold", "0.3"] + ([] if level is None else ["--level", str(level)])
    assert main(["-q", "evaluate", str(run), *flags]) == 0
    evaluation = Path(capsys.readouterr().out.strip().splitlines()[-1])
    summary = json.loads((evaluation / "summary.json").read_text())
    assert (summary["engine"], summary["level"]) == (engine, level)
    assert summary["masks"]["engine"] == engine and summary["masks"]["threshold"] == 0.3
    assert evaluation.name == "evaluation-test-t0.3" + ("" if engine == "keras" else f"-{engine}") + \
        ("" if level is None else f"-L{level}")

    test_patients = json.loads((run / "data.json").read_text())["split"]["test"]
    assert main(["-q", "predict", str(run), "--input", *(str(phantom_dir / case) for case in test_patients),
                 "--out", str(tmp_path), *flags]) == 0
    predictions = Path(capsys.readouterr().out.strip().splitlines()[-1])
    per_image = pd.read_csv(evaluation / "per_image.csv")
    assert len(per_image) == len(list(predictions.glob("*_mask.png"))) > 0
    for row in per_image.itertuples():
        stem = f"{row.case_id}_{row.slice_index}"
        written = cv2.imread(str(predictions / f"{stem}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0
        truth = read_mask(phantom_dir / row.case_id / f"{stem}_mask.png")
        assert int(written.sum()) == row.pred_pixels, stem
        assert int((written & (truth > 0)).sum()) == round(row.dice * (row.pred_pixels + row.truth_pixels) / 2), stem
    assert per_image["pred_pixels"].sum() > 0, "nothing predicted would make this test vacuous"


def test_an_onnx_session_uses_the_threads_it_is_given(served_runs: list[Path]) -> None:
    engine = load_engine(served_runs[1], "onnx", threads=1)
    assert engine.session.get_session_options().intra_op_num_threads == 1
