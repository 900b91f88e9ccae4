"""Run reports: evaluation folders of a trained run and the comparison of runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from conftest import add_patient_copy, tiny_config

from metaseg_tf.data import discover_pairs, split_for_config
from metaseg_tf.data.discover import DataError
from metaseg_tf.evaluation.compare import compare_runs, patient_error, worst_patients
from metaseg_tf.evaluation.report import evaluate_run
from metaseg_tf.evaluation.stats import holm_adjusted, paired_wilcoxon
from metaseg_tf.inference.loading import load_model
from metaseg_tf.runs.records import newest_evaluation
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


def test_the_recorded_split_is_read_back_and_drift_is_refused(phantom_dir: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    config = tiny_config(data, tmp_path, model="unet", epochs=1, test_fraction=0.4)
    run = train(config, runs_root=tmp_path / "runs", progress=False).run_dir
    recorded = json.loads((run / "data.json").read_text())["split"]["test"]
    add_patient_copy(data, recorded[0], "A_added_patient")  # a new patient shifts a recomputed permutation
    cases = sorted({pair.case_id for pair in discover_pairs(data).pairs})
    assert list(split_for_config(cases, config).test) != recorded  # re-splitting would score other patients
    result = evaluate_run(run, progress=False)
    assert sorted(result.evaluation.per_patient["case_id"]) == sorted(recorded)
    assert result.summary["missing_patients"] == []

    shutil.rmtree(data / recorded[0])  # a recorded test patient disappears
    with pytest.raises(DataError, match=f"not in .* any more \\({recorded[0]}"):
        evaluate_run(run, progress=False)
    partial = evaluate_run(run, progress=False, allow_missing_patients=True)
    assert partial.summary["missing_patients"] == [recorded[0]]
    assert sorted(partial.evaluation.per_patient["case_id"]) == sorted(recorded[1:])


def test_external_evaluation_of_a_kfold_run_does_not_split(phantom_dir: Path, tmp_path: Path) -> None:
    run = train(tiny_config(phantom_dir, tmp_path, model="unet", epochs=1, n_folds=3, fold=1),
                runs_root=tmp_path / "runs", progress=False).run_dir
    external = tmp_path / "external"
    for case in sorted(p.name for p in phantom_dir.iterdir() if p.is_dir())[:2]:  # fewer patients than folds
        shutil.copytree(phantom_dir / case, external / case)
    result = evaluate_run(run, data_dir=external, progress=False)
    assert result.summary["patients"] == 2 and result.out_dir.name == "evaluation-external-external"


def test_compare_uses_matching_evaluations_and_refuses_different_patients(phantom_dir: Path,
                                                                         tmp_path: Path) -> None:
    runs = [train(tiny_config(phantom_dir, tmp_path, model="unet", epochs=1, split_seed=seed),
                  runs_root=tmp_path / "runs", name=f"seed{seed}", progress=False).run_dir for seed in (42, 7)]
    low = evaluate_run(runs[0], threshold=0.2, which="last", progress=False)
    assert low.out_dir.name == "evaluation-test-last-t0.2"
    assert newest_evaluation(runs[0]) is None  # a last-model, 0.2-threshold evaluation is not the default one
    assert newest_evaluation(runs[0], which="last", threshold=0.2) == low.out_dir
    default = evaluate_run(runs[0], progress=False)
    assert newest_evaluation(runs[0]) == default.out_dir and default.out_dir.name == "evaluation-test"
    older = json.loads((default.out_dir / "summary.json").read_text())
    del older["evaluation_version"]  # as written by a release whose scores meant something else
    (default.out_dir / "summary.json").write_text(json.dumps(older))
    assert newest_evaluation(runs[0]) is None
    with pytest.raises(ValueError, match="different test patients"):
        compare_runs(runs, tmp_path / "cmp", labels=["a", "b"], progress=False)
    comparison = compare_runs(runs, tmp_path / "cmp", labels=["a", "b"], progress=False,
                              allow_different_patients=True)
    assert comparison.summaries["a"]["which"] == "best" and comparison.summaries["a"]["threshold"] == 0.5


def test_paired_wilcoxon_gives_the_exact_p_values_of_small_samples() -> None:
    cases = [f"P{k}" for k in range(5)]
    base = pd.DataFrame({"case_id": cases, "dice": [0.5] * 5})

    def shifted(differences: list[float]) -> pd.DataFrame:
        return pd.DataFrame({"case_id": cases, "dice": [0.5 + d / 100 for d in differences]})

    # all five differences positive: the exact two-sided p is 2 / 2^5
    [row] = paired_wilcoxon({"a": shifted([1, 2, 3, 4, 5]), "b": base}).to_dict(orient="records")
    assert row["patients"] == 5 and row["p_value"] == pytest.approx(2 / 32)
    # rank 2 negative: W- = 2; rank-sum subsets <= 2 are {}, {1}, {2}: p = 2 * 3 / 32
    [row] = paired_wilcoxon({"a": shifted([1, -2, 3, 4, 5]), "b": base}).to_dict(orient="records")
    assert row["statistic"] == 2 and row["p_value"] == pytest.approx(6 / 32)
    [row] = paired_wilcoxon({"a": base, "b": base}).to_dict(orient="records")
    assert row["p_value"] == 1.0  # no difference at all
    # pairs without a difference are left out of the ranks: one zero of five leaves 4 ranked, exact p = 2 / 2^4
    [row] = paired_wilcoxon({"a": shifted([0, 2, 3, 4, 5]), "b": base}).to_dict(orient="records")
    assert (row["patients"], row["pairs_nonzero"]) == (5, 4) and row["p_value"] == pytest.approx(2 / 16)


def test_the_worst_patients_are_named_with_what_went_wrong() -> None:
    def row(case: str, truth: int, predicted: int, dice: float, precision: float, recall: float,
            truth_lesions: int = 1, detected: int = 1) -> dict:
        return {"case_id": case, "truth_voxels": truth, "pred_voxels": predicted, "dice": dice,
                "precision": precision, "recall": recall, "truth_lesions": truth_lesions,
                "detected_lesions": detected, "false_positive_lesions": 0}

    rows = [row("empty", 0, 0, 1.0, 1.0, 1.0, 0, 0), row("fp", 0, 30, 0.0, 0.0, 1.0, 0, 0),
            row("good", 500, 480, 0.9, 0.92, 0.88), row("one_voxel", 12_000, 1, 0.0, 1.0, 0.0),
            row("under", 9_000, 3_000, 0.5, 0.95, 0.33), row("over", 5_000, 20_000, 0.4, 0.25, 0.9),
            row("two_lesions", 800, 300, 0.5, 0.7, 0.6, truth_lesions=2, detected=1),
            row("partial", 800, 700, 0.55, 0.6, 0.5)]
    assert [patient_error(r) for r in rows] == ["good", "false positive", "good", "missed", "under-segmented",
                                                "over-segmented", "lesions missed", "partial overlap"]
    per_patient = pd.DataFrame([{**r, "model": model} for model in ("a", "b") for r in rows])
    worst = worst_patients(per_patient, n=3)
    assert list(worst["model"]) == ["a"] * 3 + ["b"] * 3
    assert list(worst["case_id"][:3]) == ["fp", "one_voxel", "over"] and (worst["dice"][:3] <= 0.4).all()
    assert list(worst_patients(pd.DataFrame(rows), n=1)["error"]) == ["false positive"]


def test_holm_adjustment_of_several_tests() -> None:
    # sorted 0.01, 0.03, 0.04 times 3, 2, 1 -> 0.03, 0.06, 0.04, made non-decreasing -> 0.03, 0.06, 0.06
    assert holm_adjusted([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm_adjusted([0.5, 0.9]) == pytest.approx([1.0, 1.0]) and holm_adjusted([0.02]) == pytest.approx([0.02])
    three = {name: pd.DataFrame({"case_id": list("pqrstu"), "dice": values}) for name, values in
             {"a": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "b": [0.8, 0.7, 0.6, 0.5, 0.4, 0.3], "c": [0.5] * 6}.items()}
    tests = paired_wilcoxon(three)
    assert list(tests["p_holm"]) == pytest.approx(list(holm_adjusted(tests["p_value"])))
    assert (tests["p_holm"] >= tests["p_value"]).all()


def test_volume_run_is_scored_per_region_in_mm(brats_run: Path) -> None:
    result = evaluate_run(brats_run, split="test", progress=False)
    summary = result.summary
    assert summary["target"] == "multilabel" and summary["label_convention"] == "brats"
    assert summary["distance_unit"] == "mm" and summary["resolution"] == "native 64 x 64 px"
    assert list(summary["regions"]) == ["wt", "tc", "et"]
    assert summary["regions"]["tc"]["labels"] == [1, 3] and summary["regions"]["et"]["labels"] == [3]
    assert summary["per_patient"]["dice"]["mean"] == summary["regions"]["wt"]["per_patient"]["dice"]["mean"]
    for region in ("tc", "et"):
        table = pd.read_csv(result.out_dir / f"per_patient-{region}.csv")
        assert table["dice"].between(0, 1).all() and len(table) == summary["patients"]
    comparison = compare_runs([brats_run], brats_run.parent / "cmp", progress=False)
    assert list(comparison.regions["region"]) == ["wt", "tc", "et"] and "lesion_hd95_mm" in comparison.regions


def test_flip_tta_is_the_mean_with_the_flipped_prediction(served_runs: list[Path]) -> None:
    import numpy as np

    from metaseg_tf.config import ExperimentConfig
    from metaseg_tf.inference.predictor import Predictor

    model = load_model(served_runs[1])
    images = np.random.default_rng(0).integers(0, 255, (5, 32, 32, 3), dtype=np.uint8)
    config = ExperimentConfig(normalisation="zscore")
    plain = Predictor(model, config, flip_tta=False, batch_size=2).probabilities(images)
    flipped = Predictor(model, config, flip_tta=False, batch_size=2).probabilities(
        np.ascontiguousarray(images[:, :, ::-1]))
    averaged = Predictor(model, config, flip_tta=True, batch_size=2).probabilities(images)
    np.testing.assert_allclose(averaged, (plain + flipped[:, :, ::-1]) / 2, atol=1e-6)
    assert np.abs(averaged - plain).max() > 1e-4, "an untrained-symmetric model would make this test vacuous"


def test_inference_settings_are_evaluations_of_their_own(served_runs: list[Path]) -> None:
    run = served_runs[1]
    plain = evaluate_run(run, "test", progress=False)
    tta = evaluate_run(run, "test", progress=False, inference={"flip_tta": True})
    assert tta.out_dir.name.startswith("evaluation-test-tta") and tta.summary["inference"]["flip_tta"] is True
    assert newest_evaluation(run, "test", inference={"flip_tta": True}) == tta.out_dir
    assert newest_evaluation(run, "test") == plain.out_dir
    summary = json.loads((plain.out_dir / "summary.json").read_text())
    del summary["inference"]["keep_lesions"]  # as written before that setting existed: its default, still found
    (plain.out_dir / "summary.json").write_text(json.dumps(summary))
    assert newest_evaluation(run, "test") == plain.out_dir
    nothing_kept = evaluate_run(run, "test", threshold=0.01, progress=False, inference={"min_lesion_voxels": 10**7})
    assert (pd.read_csv(nothing_kept.out_dir / "per_patient.csv")["pred_voxels"] == 0).all()
    assert (pd.read_csv(evaluate_run(run, "test", threshold=0.01, progress=False).out_dir / "per_patient.csv")
            ["pred_voxels"] > 0).any(), "without the removal the same threshold predicts lesions"
    pruned = evaluate_run(run, "test", progress=False, inference={"min_lesion_voxels": 30})
    at_threshold = [row for row in pruned.summary["threshold_sweep"] if row["threshold"] == pytest.approx(0.5)][0]
    assert at_threshold["patient_dice"] == pytest.approx(pd.read_csv(pruned.out_dir / "per_patient.csv")["dice"].mean()), \
        "the threshold sweep makes its masks as the evaluation does, small-lesion removal included"
    largest = evaluate_run(run, "test", threshold=0.01, progress=False, inference={"keep_lesions": "largest"})
    assert largest.out_dir.name == "evaluation-test-t0.01-largest" and largest.summary["inference"]["keep_lesions"] == "largest"
    per_case = pd.read_csv(largest.out_dir / "per_patient.csv")
    assert ((per_case["detected_lesions"] > 0) + per_case["false_positive_lesions"] <= 1).all(), \
        "one predicted lesion per patient is left: it finds truth or is a false positive"
    assert (per_case["pred_voxels"] > 0).any()
    with pytest.raises(ValueError, match="not inference settings: epochs"):
        evaluate_run(run, "test", progress=False, inference={"epochs": 3})


def test_a_threshold_chosen_on_validation_is_the_best_one_there(served_runs: list[Path]) -> None:
    run = served_runs[0]
    on_validation = evaluate_run(run, "val", progress=False).summary["threshold_sweep"]
    best = max(on_validation, key=lambda row: (row["patient_dice"], -row["threshold"]))["threshold"]
    chosen = evaluate_run(run, "test", progress=False, inference={"threshold_from_validation": True})
    assert chosen.summary["threshold"] == pytest.approx(best)
    assert chosen.out_dir.name.startswith("evaluation-test-tval")
    assert newest_evaluation(run, "test", inference={"threshold_from_validation": True}) == chosen.out_dir
    given = evaluate_run(run, "test", threshold=0.35, progress=False, inference={"threshold_from_validation": True})
    assert given.summary["threshold_source"] == "given" and chosen.summary["threshold_source"] == "validation"
    assert newest_evaluation(run, "test", inference={"threshold_from_validation": True}) == chosen.out_dir, \
        "a threshold given by hand is never taken for the one chosen on validation"
    assert newest_evaluation(run, "test", threshold=0.35, inference={"threshold_from_validation": True}) == given.out_dir
