"""Exports of a trained run: ONNX, OpenVINO IR and SavedModel folders with the run's preprocessing beside them,
never written over an earlier export."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from metaseg_tf.cli import main
from metaseg_tf.export import EXPORT_FILES, export_run, latest_export, read_export

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
    assert latest_export(run, format) == out_dir


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
