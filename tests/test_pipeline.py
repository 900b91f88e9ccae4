"""The papermill pipeline: all five notebooks with the smoke profile, failures, parameters."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from metaseg_tf.cli import main
from metaseg_tf.config import ConfigError
from metaseg_tf.environment import cpu_prefers_xla
from metaseg_tf.pipeline import (
    NOTEBOOK_PARAMETERS,
    PROFILES,
    PipelineError,
    notebooks,
    pipeline_parameters,
    run_pipeline,
)

ROOT = Path(__file__).resolve().parents[1]


def _parameters_cell(path: Path) -> str:
    cells = nbformat.read(path, as_version=4).cells
    tagged = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name} needs exactly one cell tagged 'parameters'"
    return tagged[0].source


def test_every_notebook_declares_the_shared_parameters_with_the_same_defaults() -> None:
    found = notebooks()
    assert [p.stem for p in found] == ["01_eda", "02_clahe_preprocessing", "03_train_nested_unet",
                                       "04_train_attention_unet", "05_compare_models"]
    for path in found:
        declared: dict = {}
        exec(_parameters_cell(path), {}, declared)  # the cell holds plain assignments only
        assert declared == NOTEBOOK_PARAMETERS, path.name


def test_parameters_are_checked_before_any_notebook_runs() -> None:
    assert pipeline_parameters("smoke")["image_size"] == 32
    assert pipeline_parameters("cpu", overrides={"epochs": 3})["epochs"] == 3
    with pytest.raises(ConfigError, match="unknown profile"):
        pipeline_parameters("huge")
    with pytest.raises(ConfigError, match="unknown pipeline parameter.*epoch"):
        pipeline_parameters("cpu", overrides={"epoch": 3})
    with pytest.raises(ConfigError, match="image_size"):
        pipeline_parameters("cpu", overrides={"image_size": 30})
    with pytest.raises(ConfigError, match="unknown config field"):
        pipeline_parameters("cpu", overrides={"config_overrides": {"learning_rat": 0.1}})


def test_config_overrides_are_merged_into_the_profiles_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("KERAS_BACKEND", raising=False)  # TensorFlow: the cpu profile's XLA choice applies
    assert PROFILES["cpu"].parameters["config_overrides"]["flip_tta"] is True
    xla = {"jit_compile": "on"} if cpu_prefers_xla() else {}
    merged = pipeline_parameters("cpu", overrides={"config_overrides": {"loss": "dice"}})["config_overrides"]
    assert merged == {**PROFILES["cpu"].parameters["config_overrides"], **xla, "loss": "dice"}
    replaced = pipeline_parameters("cpu", overrides={"config_overrides": {"flip_tta": False}})["config_overrides"]
    assert replaced["flip_tta"] is False
    assert pipeline_parameters("smoke")["config_overrides"] == PROFILES["smoke"].parameters["config_overrides"]


def test_the_cpu_profile_trains_with_xla_where_the_cpu_prefers_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """XLA doubled TensorFlow's training in model.fit on an AVX2 CPU (benchmarks/bench_fit.py); with AVX512 (or
    unknown flags), another backend or several devices Keras' own rule stays; the user's jit_compile wins;
    other profiles are left alone."""
    import metaseg_tf.environment as environment

    monkeypatch.delenv("KERAS_BACKEND", raising=False)
    for flags, expected in (({"avx2", "fma"}, "on"), ({"avx2", "avx512f", "amx_bf16"}, None), (set(), None)):
        monkeypatch.setattr(environment, "cpu_flags", lambda flags=flags: flags)
        assert environment.cpu_prefers_xla() is (expected == "on")
        for data_dir in (None, "/data/lgg"):
            chosen = pipeline_parameters("cpu", overrides={"data_dir": data_dir} if data_dir else None)
            assert chosen["config_overrides"].get("jit_compile") == expected
        assert "jit_compile" not in pipeline_parameters("gpu")["config_overrides"]
        assert pipeline_parameters("smoke")["config_overrides"]["jit_compile"] == "off"
        mine = pipeline_parameters("cpu", overrides={"config_overrides": {"jit_compile": "off"}})
        assert mine["config_overrides"]["jit_compile"] == "off"
        for elsewhere in ({"backend": "jax"}, {"config_overrides": {"devices": 2}}):  # measured: TensorFlow, 1 device
            assert "jit_compile" not in pipeline_parameters("cpu", overrides=elsewhere)["config_overrides"]



def test_cpu_profile_trains_the_lgg_recipe_on_a_real_data_folder(tmp_path: Path) -> None:
    import yaml

    phantom = pipeline_parameters("cpu")
    assert (phantom["image_size"], phantom["epochs"]) == (64, 30) and "lr_schedule" not in phantom["config_overrides"]
    real = pipeline_parameters("cpu", data_dir=tmp_path, overrides={"config_overrides": {"loss": "dice"}})
    recipe = yaml.safe_load((Path(__file__).resolve().parents[1] / "results/lgg_recipe/recipe.yml").read_text())
    settings = {**{name: real[name] for name in ("image_size", "epochs", "batch_size", "filters", "seed")},
                **real["config_overrides"]}
    assert {name: settings[name] for name in ("image_size", "epochs", "batch_size", "filters", "seed", "lr_schedule",
                                              "warmup_epochs", "flip_tta")} == \
        {name: recipe[name] for name in ("image_size", "epochs", "batch_size", "filters", "seed", "lr_schedule",
                                         "warmup_epochs", "flip_tta")}
    assert settings["loss"] == "dice", "the user's overrides still come last"
    assert pipeline_parameters("cpu", overrides={"data_dir": str(tmp_path)})["image_size"] == 128
    assert pipeline_parameters("smoke", data_dir=tmp_path)["image_size"] == 32

def test_cli_rejects_a_bad_parameter_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["pipeline", "--profile", "smoke", "--out", str(tmp_path), "-p", "epochs", "-1"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("metaseg: error:") and "\n" not in error
    assert not any(tmp_path.iterdir()), "nothing is written when the parameters are wrong"


def _notebook(path: Path, *sources: str) -> None:
    notebook = nbformat.v4.new_notebook()
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    notebook.cells = [nbformat.v4.new_code_cell(source) for source in sources]
    nbformat.write(notebook, path)


def test_a_failing_notebook_stops_the_pipeline_with_a_clear_message_and_keeps_its_output(tmp_path: Path) -> None:
    source = tmp_path / "notebooks"
    source.mkdir()
    _notebook(source / "01_fine.ipynb", "print('fine', image_size)")
    _notebook(source / "02_broken.ipynb", "x = 1", "raise ValueError('the scanner exploded')", "y = 2")
    _notebook(source / "03_never.ipynb", "print('never')")
    with pytest.raises(PipelineError) as failure:
        run_pipeline("smoke", data_dir=tmp_path, out_root=tmp_path / "out", notebooks_dir=source, progress=False)
    message = str(failure.value)
    # execution count 3: papermill's injected-parameters cell runs first, as the executed notebook shows
    assert "02_broken.ipynb failed in cell 3" in message and "ValueError: the scanner exploded" in message
    (out_dir,) = (tmp_path / "out").iterdir()
    partial = nbformat.read(out_dir / "notebooks" / "02_broken.ipynb", as_version=4)
    errors = [o for cell in partial.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert errors and errors[0]["evalue"] == "the scanner exploded"
    assert (out_dir / "notebooks" / "01_fine.ipynb").is_file()
    assert not (out_dir / "notebooks" / "03_never.ipynb").exists()
    record = json.loads((out_dir / "pipeline.json").read_text())
    assert record["status"] == "failed" and record["failed_notebook"] == "02_broken.ipynb"


def _assert_complete(out_dir: Path, models: tuple[str, ...], eda_figure: str = "01_eda-sequences_labels.png") -> None:
    record = json.loads((out_dir / "pipeline.json").read_text())
    assert record["status"] == "finished" and len(record["seconds"]) == 5
    for notebook in notebooks():
        executed = nbformat.read(out_dir / "notebooks" / notebook.name, as_version=4)
        code = [cell for cell in executed.cells if cell.cell_type == "code"]
        assert all(cell.execution_count for cell in code), notebook.name
    figures = {p.name for p in (out_dir / "figures").glob("*.png")}
    for expected in (eda_figure, "02_clahe_preprocessing-before_after.png",
                     "03_train_nested_unet-pruning.png", "04_train_attention_unet-attention_maps.png",
                     "05_compare_models-test_examples.png"):
        assert expected in figures
    (comparison,) = (out_dir / "comparison").glob("comparison-test*")
    table = pd.read_csv(comparison / "comparison.csv")
    assert tuple(table["model"]) == models
    for run in (out_dir / "runs").iterdir():
        assert (run / "best.keras").is_file()
        for evaluation in run.glob("evaluation-*"):
            per_patient = pd.read_csv(evaluation / "per_patient.csv")
            assert per_patient["dice"].between(0, 1).all() and per_patient["iou"].between(0, 1).all()
    report = (out_dir / "report.md").read_text()
    assert "## Conclusion" in report and "nested_unet" in report and "attention_unet" in report
    for link in ("notebooks/05_compare_models.ipynb", f"figures/{eda_figure}"):
        assert f"({link})" in report and (out_dir / link).is_file()


def test_smoke_pipeline_runs_all_five_notebooks_and_writes_the_report(tmp_path: Path) -> None:
    """The main job's default: the BraTS-METS-layout phantom, one region (TC), scored per case in mm."""
    run = run_pipeline("smoke", out_root=tmp_path, progress=False)
    _assert_complete(run.out_dir, ("nested_unet", "attention_unet"))
    assert "phantom-brats" in json.loads((run.out_dir / "pipeline.json").read_text())["parameters"]["data_dir"]
    (comparison,) = (run.out_dir / "comparison").glob("comparison-test*")
    regions = pd.read_csv(comparison / "regions.csv")
    assert list(regions["region"]) == ["tc", "tc"] and "lesion_hd95_mm" in regions.columns
    evaluation = next((run.out_dir / "runs").glob("*nested_unet/evaluation-test"))
    summary = json.loads((evaluation / "summary.json").read_text())
    assert summary["distance_unit"] == "mm" and summary["label_convention"] == "brats"
    assert summary["regions"]["tc"]["labels"] == [1, 3]
    report = run.report.read_text()
    assert "Per region and lesion-wise" in report and "hd95_mm" in report
    assert "XLA (jit_compile) off" in report  # the smoke profile's; the report says what made the numbers
    (ablation,) = (run.out_dir / "clahe_ablation").glob("comparison-test*")
    assert tuple(pd.read_csv(ablation / "comparison.csv")["model"]) == ("clahe", "no_clahe")
    assert "CLAHE ablation" in run.report.read_text()
    second = run_pipeline("smoke", out_root=tmp_path, progress=False,
                          overrides={"clahe_ablation": False, "epochs": 1})
    assert second.out_dir != run.out_dir and (run.out_dir / "report.md").is_file(), "runs are never overwritten"


def test_smoke_pipeline_runs_under_jax(tmp_path: Path) -> None:
    """JAX backend, and the 2D kaggle_3m phantom (the flag that keeps the 2D layout's main job)."""
    pytest.importorskip("jax")
    environment = {**os.environ, "KERAS_BACKEND": "jax"}
    done = subprocess.run([sys.executable, "-m", "metaseg_tf.cli", "-q", "pipeline", "--profile", "smoke", "--out",
                           str(tmp_path), "--phantom", "kaggle_3m", "-p", "clahe_ablation", "false"], env=environment, cwd=ROOT,
                          capture_output=True, text=True, timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    (out_dir,) = tmp_path.iterdir()
    assert json.loads((out_dir / "pipeline.json").read_text())["environment"]["keras_backend"] == "jax"
    _assert_complete(out_dir, ("nested_unet", "attention_unet"), eda_figure="01_eda-examples.png")


def test_a_killed_pipeline_continues_where_it_stopped(tmp_path: Path) -> None:
    """The smoke pipeline killed (with its kernel) while notebook 03 trains; the same command again keeps the
    notebooks done, resumes the cut-short training from its last epoch and finishes in the same folder."""
    import signal
    import time

    command = [sys.executable, "-m", "metaseg_tf.cli", "-q", "pipeline", "--profile", "smoke", "--out", str(tmp_path),
               "-p", "clahe_ablation", "false", "-p", "epochs", "12"]
    first = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True)
    deadline, state = time.monotonic() + 900, {}
    while time.monotonic() < deadline and not (state.get("status") == "running" and state.get("epochs_done", 0) >= 2):
        assert first.poll() is None, first.communicate()[0][-3000:]
        time.sleep(0.2)
        found = list(tmp_path.glob("*-smoke/runs/*-nested_unet/state.json"))
        state = json.loads(found[0].read_text() or "{}") if found else {}
    os.killpg(first.pid, signal.SIGKILL)  # the pipeline and its notebook's kernel, as Ctrl-C or a scheduler would
    first.communicate(timeout=60)
    (out_dir,) = tmp_path.iterdir()
    assert json.loads((out_dir / "pipeline.json").read_text())["status"] == "running"
    done_before = {path.name: path.stat().st_mtime_ns for path in (out_dir / "notebooks").glob("0[12]_*.ipynb")}
    assert len(done_before) == 2
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:] + again.stdout[-3000:]
    assert list(tmp_path.iterdir()) == [out_dir] and "2 notebook(s) already done" in again.stdout
    record = json.loads((out_dir / "pipeline.json").read_text())
    assert record["status"] == "finished" and record["resumed"] == 1 and len(record["seconds"]) == 5
    assert {path.name: path.stat().st_mtime_ns for path in (out_dir / "notebooks").glob("0[12]_*.ipynb")} == done_before
    (run_dir,) = (out_dir / "runs").glob("*-nested_unet")
    trained = json.loads((run_dir / "state.json").read_text())
    assert trained["status"] == "finished" and trained["resumed"] == 1
    assert (out_dir / "report.md").is_file()
