"""Run reports: evaluation folders of a trained run and the comparison of runs."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
from conftest import tiny_config

from metaseg_tf.evaluation.report import compare_runs, evaluate_run
from metaseg_tf.predict import load_model
from metaseg_tf.training.train import train


def test_evaluate_and_compare_write_the_report(phantom_dir: Path, tmp_path: Path) -> None:
    runs = [train(tiny_config(phantom_dir, tmp_path, model=name, epochs=1), runs_root=tmp_path / "runs",
                  progress=False).run_dir for name in ("attention_unet", "nested_unet")]
    result = evaluate_run(runs[0], progress=False)
    assert {"per_image.csv", "per_patient.csv", "summary.json", "overlays.png", "threshold_sweep.png",
            "learning_curves.png", "per_patient_dice.png"} <= {p.name for p in result.out_dir.iterdir()}
    summary = result.summary
    assert summary["resolution"] == "native 64 x 64 px"  # the phantom's own size, not the 32 px input
    assert 0.0 <= summary["per_patient"]["dice"]["mean"] <= 1.0
    assert summary["complexity"]["parameters"] == load_model(runs[0]).count_params()
    test_cases = json.loads((runs[0] / "data.json").read_text())["split"]["test"]
    assert sorted(pd.read_csv(result.out_dir / "per_patient.csv")["case_id"]) == sorted(test_cases)
    again = evaluate_run(runs[0], progress=False)  # a second evaluation does not overwrite the first
    assert again.out_dir != result.out_dir
    comparison = compare_runs(runs, tmp_path / "report", labels=["attention", "nested"], progress=False)
    assert comparison.table["model"].tolist() == ["attention", "nested"]
    assert {"comparison.md", "comparison.csv", "wilcoxon.csv", "per_patient_dice.png"} <= {
        p.name for p in comparison.out_dir.iterdir()}
    assert len(comparison.tests) == 1 and 0.0 <= comparison.tests["p_value"][0] <= 1.0
