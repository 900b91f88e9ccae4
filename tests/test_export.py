"""Exports of a trained run: ONNX, OpenVINO IR and SavedModel folders with the run's preprocessing beside them,
never written over an earlier export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaseg_tf.cli import main
from metaseg_tf.inference.export import EXPORT_FILES, export_run, newest_export, read_export
from metaseg_tf.inference.quantise import INT8_MAX_DROP

pytest.importorskip("onnxruntime")
pytest.importorskip("openvino")


@pytest.mark.parametrize("format", ["onnx", "openvino", "saved_model"])
def test_export_writes_the_model_its_preprocessing_and_the_difference_to_keras(served_runs: list[Path],
                                                                                format: str) -> None:
    run = served_runs[0]  # U-Net++ with deep-supervision heads: the export serves the last one
    out_dir = export_run(run, format)
    record = read_export(out_dir)
    assert (out_dir / EXPORT_FILES[format]).exists() and record["format"] == format and record["which"] == "best"
    assert record["input_shape"] == [None, 32, 32, 3] and record["output_shape"] == [None, 32, 32, 1]
    assert json.loads((out_dir / "config.json").read_text()) == json.loads((run / "config.json").read_text())
    assert (out_dir / "data.json").is_file()
    if format != "saved_model":
        assert record["max_abs_difference_to_keras"] < 1e-4
    assert newest_export(run, format) == out_dir


def test_a_second_export_never_overwrites_the_first(served_runs: list[Path], capsys: pytest.CaptureFixture) -> None:
    run = served_runs[1]
    assert main(["-q", "export", str(run), "--format", "onnx"]) == 0
    assert main(["-q", "export", str(run), "--format", "onnx"]) == 0
    out = capsys.readouterr().out
    assert "largest probability difference to Keras" in out
    folders = sorted(p.name for p in run.glob("export-onnx*"))
    assert folders[:2] == ["export-onnx", "export-onnx-2"]
    with pytest.raises(SystemExit):  # argparse names the formats
        main(["-q", "export", str(run), "--format", "tflite"])


def test_an_export_of_a_replaced_model_is_not_used_and_a_failed_export_leaves_nothing(
        served_runs: list[Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    import keras

    from metaseg_tf.config import ConfigError
    from metaseg_tf.inference.export import load_engine

    run = tmp_path / "run"
    shutil.copytree(served_runs[1], run, ignore=shutil.ignore_patterns("export-*", "evaluation-*"))
    first = export_run(run, "onnx")
    assert newest_export(run, "onnx") == first
    model = keras.saving.load_model(run / "best.keras", compile=False)  # a resumed training writes a new best
    model.set_weights([weight * 0.5 for weight in model.get_weights()])
    model.save(run / "best.keras")
    assert newest_export(run, "onnx") is None
    load_engine(run, "onnx")  # exports the new best model
    assert newest_export(run, "onnx") not in (None, first)

    def failing(*args, **kwargs):
        raise ImportError("no converter", name="tf2onnx")

    monkeypatch.setattr(keras.Model, "export", failing)
    before = sorted(p.name for p in run.iterdir())
    with pytest.raises(ConfigError, match="needs the package tf2onnx"):
        export_run(run, "onnx")
    assert sorted(p.name for p in run.iterdir()) == before  # no half-written export folder, no scratch left


def test_a_missing_runtime_is_a_one_line_error(served_runs: list[Path], monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from metaseg_tf.config import ConfigError
    from metaseg_tf.inference.engines import OnnxEngine

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install onnxruntime"):
        OnnxEngine(served_runs[0] / "best.keras")


def test_a_pruned_export_is_the_pruned_network_in_its_own_folder(served_runs: list[Path]) -> None:
    import keras
    import numpy as np

    from metaseg_tf.inference.export import engine_from_export
    from metaseg_tf.inference.loading import load_model
    from metaseg_tf.models import prune_nested_unet

    run = served_runs[0]  # U-Net++ of depth 2: levels 1 and 2
    out_dir = export_run(run, "onnx", level=1)
    assert out_dir.name.startswith("export-onnx-L1") and read_export(out_dir)["level"] == 1
    assert newest_export(run, "onnx", level=1) == out_dir
    assert newest_export(run, "onnx") != out_dir, "the whole network's export is never the pruned one"
    batch = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype(np.float32)
    model = load_model(run)
    pruned = keras.ops.convert_to_numpy(prune_nested_unet(model, 1).predict_on_batch(batch))
    whole = keras.ops.convert_to_numpy(model.predict_on_batch(batch)[-1])
    exported = engine_from_export(out_dir).predict(batch)
    assert np.abs(exported - pruned).max() < 1e-4
    assert np.abs(exported - whole).max() > 1e-3, "level 1 is a different (smaller) network than level 2"


def test_a_level_that_does_not_exist_is_a_config_error(served_runs: list[Path], capsys) -> None:
    assert main(["-q", "export", str(served_runs[0]), "--format", "onnx", "--level", "3"]) == 2
    assert "level must lie in 1..2" in capsys.readouterr().err
    assert main(["-q", "export", str(served_runs[1]), "--format", "onnx", "--level", "1"]) == 2
    assert "U-Net++ trained with deep supervision" in capsys.readouterr().err
    assert not list(served_runs[1].glob("export-onnx-L*")) and not list(served_runs[0].glob("export-onnx-L3*"))


@pytest.fixture(scope="module")
def segmenting_run(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An Attention U-Net trained long enough on the phantom (32 px, 12 epochs) that its masks mean something."""
    from metaseg_tf.config import ExperimentConfig
    from metaseg_tf.training.train import train

    root = tmp_path_factory.mktemp("int8")
    config = ExperimentConfig(data_dir=str(phantom_dir), cache_dir=str(root / "cache"), image_size=32,
                              filters=(4, 8, 16), batch_size=8, epochs=12, jit_compile="off", model="attention_unet",
                              early_stopping_patience=12, clahe=False)
    return train(config, runs_root=root / "runs", progress=False).run_dir


INT8_MASK_AGREEMENT = 0.95  # Dice between the int8 export's masks and float32's, all test slices pooled
INT8_PROBABILITY_TOLERANCE = 0.02  # mean absolute probability difference to float32


def test_an_int8_export_calibrated_on_training_patients_gives_the_float32_masks_within_tolerance(
        segmenting_run: Path, phantom_dir: Path) -> None:
    pytest.importorskip("nncf")
    import numpy as np

    from metaseg_tf.data import discover_pairs, read_image
    from metaseg_tf.inference.predictor import Predictor
    from metaseg_tf.runs.folders import load_run_config, load_run_split

    out_dir = export_run(segmenting_run, "openvino", precision="int8")
    record = read_export(out_dir)
    assert out_dir.name == "export-openvino-int8" and record["precision"] == "int8"
    assert record["calibration"] == "training patients" and 0 < record["calibration_slices"] <= 300
    assert record["validation"] == "validation patients" and record["validation_patients"] == len(
        load_run_split(segmenting_run).val) and record["max_drop"] == INT8_MAX_DROP
    assert record["validation_drop"] <= INT8_MAX_DROP, record  # accuracy control reached its bound
    assert (record["threshold"], record["threshold_source"]) == (load_run_config(segmenting_run).threshold, "config")
    assert record["fake_quantize_nodes"] > 0, "accuracy control may not hand every operation back to float"
    assert newest_export(segmenting_run, "openvino", precision="int8") == out_dir
    assert newest_export(segmenting_run, "openvino") is None  # a float32 export is another folder
    test_patients = set(load_run_split(segmenting_run).test)
    images = [read_image(pair.image_path) for pair in discover_pairs(phantom_dir).pairs if pair.case_id in test_patients]
    assert images
    full = Predictor.from_run(segmenting_run).predict_slices(images, progress=False)
    int8 = Predictor.from_run(segmenting_run, engine="openvino-int8").predict_slices(images, progress=False)
    full_masks, int8_masks = np.stack([p.mask for p in full]) > 0, np.stack([p.mask for p in int8]) > 0
    assert full_masks.any(), "the float32 model must predict some lesion for the comparison to mean anything"
    agreement = 2 * (full_masks & int8_masks).sum() / (full_masks.sum() + int8_masks.sum())
    difference = np.mean([np.abs(a.probability - b.probability).mean() for a, b in zip(full, int8)])
    assert agreement >= INT8_MASK_AGREEMENT and difference <= INT8_PROBABILITY_TOLERANCE, (agreement, difference)


def test_a_negative_max_drop_is_plain_quantisation_in_a_new_folder(segmenting_run: Path, capsys) -> None:
    pytest.importorskip("nncf")
    assert main(["-q", "export", str(segmenting_run), "--format", "openvino", "--precision", "int8",
                 "--max-drop", "-1"]) == 0
    out_dir = Path(capsys.readouterr().out.strip().splitlines()[-1])
    record = read_export(out_dir)
    assert out_dir.name.startswith("export-openvino-int8") and record["max_drop"] is None
    assert "validation_drop" not in record and record["calibration"] == "training patients"
    assert newest_export(segmenting_run, "openvino", precision="int8") == out_dir  # the newest is served
