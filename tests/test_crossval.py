"""Patient-level k-fold cross-validation: out-of-fold scores, the two-model ensemble, resuming, refusal."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import tiny_config

from metaseg_tf.cli import main
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.evaluation.crossval import STATE_FILE, crossval
from metaseg_tf.evaluation.crossval_summary import CrossValidation, write_summary
from metaseg_tf.evaluation.ensemble import ensemble_probabilities, evaluate_ensemble
from metaseg_tf.runs.folders import load_run_split
from metaseg_tf.runs.records import newest_evaluation

MODELS = ("nested_unet", "attention_unet")
LABELS = (*MODELS, "ensemble")


@dataclass
class CrossValidations:
    """One 3-fold cross-validation of both models, first stopped after one fold, then continued."""

    config: ExperimentConfig
    out_dir: Path
    runs_root: Path
    after_one_fold: CrossValidation
    runs_after_one_fold: list[Path]
    complete: CrossValidation

    def call(self, **changes) -> CrossValidation:
        settings = dict(config=self.config, models=MODELS, n_folds=3, out_dir=self.out_dir,
                        runs_root=self.runs_root, progress=False)
        return crossval(**{**settings, **changes})

    def runs(self) -> list[Path]:
        return sorted(self.runs_root.iterdir())


@pytest.fixture(scope="module")
def cross_validations(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> CrossValidations:
    root = tmp_path_factory.mktemp("crossval")
    config = tiny_config(phantom_dir, root, epochs=1, jit_compile="off")
    settings = dict(models=MODELS, n_folds=3, out_dir=root / "cv", runs_root=root / "runs", progress=False)
    after_one_fold = crossval(config, max_folds=1, **settings)
    runs_after_one_fold = sorted((root / "runs").iterdir())
    complete = crossval(config, **settings)
    return CrossValidations(config, root / "cv", root / "runs", after_one_fold, runs_after_one_fold, complete)


def test_an_interrupted_crossval_continues_with_the_remaining_folds(cross_validations: CrossValidations) -> None:
    partial, complete = cross_validations.after_one_fold, cross_validations.complete
    assert not partial.complete and partial.summary["folds_done"].tolist() == [1, 1, 1]
    assert partial.summary["missing_folds"].tolist() == ["1, 2"] * 3
    assert "**Partial cross-validation**" in partial.markdown and "nested_unet folds 1, 2" in partial.markdown
    assert [run.name.split("-", 2)[2] for run in cross_validations.runs_after_one_fold] == \
        ["crossval-nested_unet-fold0", "crossval-attention_unet-fold0"]
    assert complete.complete and "All 3 folds done" in complete.markdown
    assert len(cross_validations.runs()) == 6  # fold 0 was not trained again
    for model in MODELS:
        assert complete.state["folds"]["0"][model] == partial.state["folds"]["0"][model]


def test_every_patient_is_scored_once_per_model_out_of_fold(cross_validations: CrossValidations,
                                                            phantom_dir: Path) -> None:
    result = cross_validations.complete
    patients = sorted(p.name for p in phantom_dir.iterdir() if p.is_dir())
    for label in LABELS:
        rows = result.per_patient[result.per_patient["model"] == label]
        assert sorted(rows["case_id"]) == patients  # each exactly once
        assert set(rows["fold"]) == {0, 1, 2}
    for fold in range(3):
        for model in MODELS:
            split = load_run_split(result.state["folds"][str(fold)][model]["run"])
            scored = result.per_patient.query("model == @model and fold == @fold")["case_id"]
            assert sorted(scored) == sorted(split.test)
            assert not set(scored) & (set(split.train) | set(split.val))  # out of fold: never trained on
    summary = result.summary.set_index("model")
    assert list(summary.index) == list(LABELS) and (summary["patients"] == len(patients)).all()
    for label in LABELS:
        dice = result.per_patient.query("model == @label")["dice"]
        assert summary.loc[label, "dice_mean"] == pytest.approx(dice.mean())
        assert summary.loc[label, "dice_median"] == pytest.approx(dice.median())
        assert summary.loc[label, "dice_mean_ci_low"] <= dice.mean() <= summary.loc[label, "dice_mean_ci_high"]
    # the pooled global Dice of one fold's patients is that fold's own (pooled-pixel) global Dice
    fold0 = result.per_fold.query("fold == 0 and model == 'nested_unet'")["global_dice"].item()
    rows = result.per_patient.query("fold == 0 and model == 'nested_unet'")
    volume = rows["truth_voxels"] + rows["pred_voxels"]
    assert (rows["dice"] * volume).sum() / volume.sum() == pytest.approx(fold0)
    assert len(result.tests) == 3 and set(result.tests["a"]) | set(result.tests["b"]) == set(LABELS)
    for name in ("per_patient.csv", "summary.csv", "per_fold.csv", "wilcoxon.csv", "summary.md"):
        assert (result.out_dir / name).is_file()


def test_a_second_call_trains_and_evaluates_nothing_and_returns_the_same_summary(
        cross_validations: CrossValidations) -> None:
    runs = cross_validations.runs()
    evaluations = sorted(cross_validations.runs_root.glob("*/evaluation-*"))
    ensembles = sorted(cross_validations.out_dir.glob("fold*/ensemble-*"))
    again = cross_validations.call()
    pd.testing.assert_frame_equal(again.summary, cross_validations.complete.summary)
    pd.testing.assert_frame_equal(again.per_patient, cross_validations.complete.per_patient)
    # killed after training and evaluating fold 2's attention_unet, before recording it: nothing is redone
    state_path = cross_validations.out_dir / STATE_FILE
    state = json.loads(state_path.read_text())
    recorded = state["folds"]["2"].pop("attention_unet")
    state_path.write_text(json.dumps(state))
    resumed = cross_validations.call()
    assert resumed.state["folds"]["2"]["attention_unet"] == recorded
    assert cross_validations.runs() == runs
    assert sorted(cross_validations.runs_root.glob("*/evaluation-*")) == evaluations
    assert sorted(cross_validations.out_dir.glob("fold*/ensemble-*")) == ensembles
    pd.testing.assert_frame_equal(resumed.summary, cross_validations.complete.summary)


def test_another_config_models_or_folds_in_the_same_folder_is_refused(cross_validations: CrossValidations,
                                                                    tmp_path: Path) -> None:
    state_before = (cross_validations.out_dir / STATE_FILE).read_text()
    with pytest.raises(ConfigError, match=r"other settings epochs \(1 there, 2 now\)"):
        cross_validations.call(config=cross_validations.config.replace(epochs=2))
    with pytest.raises(ConfigError, match="other models"):
        cross_validations.call(models=("nested_unet", "unet"))
    with pytest.raises(ConfigError, match=r"other folds \(3 there, 4 now\)"):
        cross_validations.call(n_folds=4)
    assert (cross_validations.out_dir / STATE_FILE).read_text() == state_before
    (tmp_path / "notes.txt").write_text("someone else's")
    with pytest.raises(ConfigError, match="not empty"):
        cross_validations.call(out_dir=tmp_path)


def test_a_crossval_started_by_a_release_without_a_newer_field_continues(cross_validations: CrossValidations) -> None:
    state_path = cross_validations.out_dir / STATE_FILE
    state_before = state_path.read_text()
    state = json.loads(state_before)
    assert state["config"].pop("flip_tta") is False  # as recorded before the field existed: read at its default
    state_path.write_text(json.dumps(state))
    try:
        runs = cross_validations.runs()
        assert cross_validations.call().complete and cross_validations.runs() == runs
        with pytest.raises(ConfigError, match=r"other settings flip_tta \(False there, True now\)"):
            cross_validations.call(config=cross_validations.config.replace(flip_tta=True))
    finally:
        state_path.write_text(state_before)


def test_a_second_process_in_the_same_folder_is_refused(cross_validations: CrossValidations) -> None:
    from metaseg_tf.evaluation.crossval import LOCK_FILE
    from metaseg_tf.runs.folders import hold_run_lock, RunLockedError

    state_before = (cross_validations.out_dir / STATE_FILE).read_text()
    with hold_run_lock(cross_validations.out_dir, LOCK_FILE, "cross-validated"):  # as another process would
        with pytest.raises(RunLockedError, match="being cross-validated by another process"):
            cross_validations.call()
    assert (cross_validations.out_dir / STATE_FILE).read_text() == state_before
    assert cross_validations.call().complete, "once the other process is gone the folder is usable again"


def test_the_ensemble_averages_its_members_probabilities(cross_validations: CrossValidations,
                                                         tmp_path: Path) -> None:
    folds = cross_validations.complete.state["folds"]
    nested, attention = (Path(folds["0"][model]["run"]) for model in MODELS)
    each = [ensemble_probabilities([run], progress=False).probabilities for run in (nested, attention)]
    mean = ensemble_probabilities([nested, attention], progress=False)
    assert mean.probabilities.shape == each[0].shape and mean.probabilities.shape[-1] == 1
    np.testing.assert_allclose(mean.probabilities, (each[0] + each[1]) / 2, rtol=1e-6)
    assert (np.minimum(*each) <= mean.probabilities).all() and (mean.probabilities <= np.maximum(*each)).all()

    itself = evaluate_ensemble([nested, nested], tmp_path, progress=False)  # a run with itself scores as itself
    alone = newest_evaluation(nested)
    pd.testing.assert_frame_equal(pd.read_csv(itself.out_dir / "per_patient.csv"),
                                  pd.read_csv(alone / "per_patient.csv"))
    pd.testing.assert_frame_equal(pd.read_csv(itself.out_dir / "per_image.csv"),
                                  pd.read_csv(alone / "per_image.csv"))
    assert itself.summary["model"] == "ensemble" and itself.summary["members"][0]["run"] == str(nested)
    alone_summary = json.loads((alone / "summary.json").read_text())
    assert itself.summary["per_patient"]["dice"] == alone_summary["per_patient"]["dice"]
    assert itself.summary["global"] == alone_summary["global"]
    assert evaluate_ensemble([nested, nested], tmp_path, progress=False).out_dir.name == "ensemble-test-2"

    recorded = json.loads((Path(folds["0"]["ensemble"]["evaluation"]) / "summary.json").read_text())
    assert recorded["model"] == "ensemble" and [m["model"] for m in recorded["members"]] == list(MODELS)
    with pytest.raises(ConfigError, match="another patient split"):
        evaluate_ensemble([nested, folds["1"]["nested_unet"]["run"]], tmp_path, progress=False)


def test_crossval_from_the_command_line(phantom_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, out = tmp_path / "runs", tmp_path / "cv"
    args = ["crossval", "--models", "unet", "--folds", "2", "--data", str(phantom_dir), "--image-size", "32",
            "--filters", "4", "8", "16", "--epochs", "1", "--batch-size", "8", "-p", "cache_dir",
            str(tmp_path / "cache"), "--runs-root", str(runs), "--out", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "fold1 (2/2) unet: evaluated: per-patient Dice" in printed  # one line per step
    assert "All 2 folds done" in printed and "| unet " in printed and printed.rstrip().endswith(str(out))
    assert len(pd.read_csv(out / "per_patient.csv")) == 6 and (out / "summary.md").is_file()
    assert main(["-q", *args]) == 0 and len(list(runs.iterdir())) == 2  # the second call trains nothing
    assert main(["-q", *args, "--model", "unet"]) == 2
    assert "--model is not used" in capsys.readouterr().err


def test_a_fold_scored_by_an_older_release_is_scored_again_not_pooled(cross_validations: CrossValidations) -> None:
    complete = cross_validations.complete
    assert "Inference: checkpoint `best`; flip TTA off; threshold 0.5 (config); no small-lesion removal" \
        in complete.markdown
    assert {"pairs_nonzero", "p_holm"} <= set(complete.tests.columns)
    assert "## Where the mean is pulled down" in complete.markdown
    stale = [Path(complete.state["folds"][fold][label]["evaluation"]) / "summary.json"
             for fold, label in (("0", "ensemble"), ("1", "nested_unet"))]  # a new release: more than one fold
    for path in stale:
        summary = json.loads(path.read_text())
        path.write_text(json.dumps({**summary, "evaluation_version": summary["evaluation_version"] - 1}))
    partial = write_summary(cross_validations.out_dir)
    assert not partial.complete and partial.summary.set_index("model").loc["nested_unet", "missing_folds"] == "1"
    assert "**Left out, gone or scored by an older release**: fold 0 ensemble, fold 1 nested_unet" in partial.markdown
    runs = cross_validations.runs()
    rescored = cross_validations.call()
    assert cross_validations.runs() == runs, "nothing is trained again"
    assert rescored.state["folds"]["1"]["nested_unet"]["evaluation"] != str(stale[1].parent)
    assert rescored.state["folds"]["0"]["ensemble"]["evaluation"] != str(stale[0].parent)
    pd.testing.assert_frame_equal(rescored.summary, complete.summary)


def test_a_fold_never_continues_an_unfinished_run_older_than_the_crossval(cross_validations: CrossValidations) -> None:
    import shutil

    state_path = cross_validations.out_dir / STATE_FILE
    state = json.loads(state_path.read_text())
    recorded = state["folds"]["2"].pop("attention_unet")
    state["folds"]["2"].pop("ensemble")
    state_path.write_text(json.dumps(state))
    # an abandoned run of the same name and config, left unfinished before this cross-validation started
    finished = Path(recorded["run"])
    abandoned = finished.with_name("20000101-000000-" + finished.name.split("-", 2)[2])
    shutil.copytree(finished, abandoned, ignore=shutil.ignore_patterns("evaluation-*"))
    run_state = json.loads((abandoned / "state.json").read_text())
    (abandoned / "state.json").write_text(json.dumps({**run_state, "status": "running", "epochs_done": 0,
                                                      "started": "2000-01-01 00:00:00"}))
    shutil.rmtree(finished)  # the fold's own run is gone: the fold is trained again, from scratch
    runs = cross_validations.runs()
    retrained = cross_validations.call()
    assert json.loads((abandoned / "state.json").read_text())["status"] == "running", "the old run is left alone"
    new = sorted(set(cross_validations.runs()) - set(runs))
    assert [run.name.split("-", 2)[2] for run in new] == [finished.name.split("-", 2)[2]]
    assert retrained.state["folds"]["2"]["attention_unet"]["run"] == str(new[0]) and retrained.complete


def test_folds_run_as_separate_jobs_give_the_results_of_one_process(cross_validations: CrossValidations,
                                                                     tmp_path: Path, capsys) -> None:
    """``--fold K`` jobs over one shared folder, as a job array runs them: fold 1 goes on while another process
    holds fold 0, ``--collect`` says what is missing, a process going through all folds leaves a fold another
    job holds, and once every fold is in, the out-of-fold scores are those of one process through all folds."""
    from metaseg_tf.evaluation.crossval import fold_lock
    from metaseg_tf.runs.folders import RunLockedError, hold_run_lock

    settings = dict(config=cross_validations.config, models=MODELS, n_folds=3, out_dir=tmp_path / "cv",
                    runs_root=tmp_path / "runs", progress=False)
    with pytest.raises(ConfigError, match="holds no cross-validation to collect"):
        crossval(collect=True, **settings)
    with pytest.raises(ConfigError, match=r"--fold must lie in \[0, 2\]"):
        crossval(fold=3, **settings)
    (tmp_path / "cv").mkdir()
    with hold_run_lock(tmp_path / "cv", fold_lock(0), "cross-validated in fold 0"):  # as another job would
        with pytest.raises(RunLockedError, match="fold 0 by another process"):
            crossval(fold=0, **settings)
        crossval(fold=1, **settings)
    runs = sorted((tmp_path / "runs").iterdir())
    assert sorted(run.name.split("-", 2)[-1] for run in runs) == [f"crossval-{model}-fold1" for model in sorted(MODELS)]
    partial = crossval(collect=True, **{**settings, "progress": True})
    assert not partial.complete and "partial (folds missing: 0, 2)" in capsys.readouterr().out
    assert sorted((tmp_path / "runs").iterdir()) == runs, "collect trains nothing"
    with hold_run_lock(tmp_path / "cv", fold_lock(2), "cross-validated in fold 2"):  # a fold-2 job is at work
        crossval(**{**settings, "progress": True})  # one process through all folds leaves fold 2 to that job
    printed = capsys.readouterr().out
    assert "fold2: another process works on it; leaving it to that one" in printed
    assert "partial (folds missing: 2)" in printed
    config = cross_validations.config  # the same settings from the command line, as a job would give them
    assert main(["-q", "crossval", "--data", config.data_dir, "--out", str(tmp_path / "cv"), "--runs-root",
                 str(tmp_path / "runs"), "--folds", "3", "--fold", "2", "--image-size", "32", "--filters", "4", "8",
                 "16", "--epochs", "1", "--batch-size", "8", "-p", "cache_dir", config.cache_dir,
                 "-p", "early_stopping_patience", "0", "-p", "jit_compile", "off"]) == 0
    collected = crossval(collect=True, **settings)
    assert collected.complete
    columns = ["model", "fold", "case_id", "dice"]
    ours = collected.per_patient[columns].sort_values(columns[:3]).reset_index(drop=True)
    one_process = cross_validations.complete.per_patient[columns].sort_values(columns[:3]).reset_index(drop=True)
    pd.testing.assert_frame_equal(ours, one_process, check_exact=False, atol=1e-6)
