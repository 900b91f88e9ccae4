"""Project paths: one root for defaults, the working directory for what is typed on the command line."""

from __future__ import annotations

from pathlib import Path

import pytest

from metaseg_tf import paths
from metaseg_tf.cli import build_parser
from metaseg_tf.config import ExperimentConfig


def test_relative_paths_resolve_from_the_project_root() -> None:
    assert paths.resolve("results/runs") == paths.PROJECT_ROOT / "results" / "runs"
    assert paths.resolve("/abs/x") == Path("/abs/x")
    assert (paths.PROJECT_ROOT / "metaseg_tf" / "paths.py").is_file()
    assert ExperimentConfig().data_dir == paths.PHANTOM_DIR and ExperimentConfig().cache_dir == paths.CACHE_DIR


def test_reports_show_paths_in_and_beside_the_project_relative_and_others_absolute() -> None:
    root = paths.PROJECT_ROOT
    assert paths.shown(root / "results" / "runs" / "a") == "results/runs/a" == paths.shown("results/runs/a")
    assert paths.shown(f"{root}/../shared/data/lgg") == "../shared/data/lgg"  # as a run records `../shared`
    assert paths.shown(root.parent / "shared" / "data") == "../shared/data"
    assert paths.shown(root / "results" / ".." / "data") == "data" and paths.shown(root) == "."
    outside = Path("/") / "metaseg-tf-not-beside-the-project" / "data"
    assert paths.shown(outside) == str(outside)


def test_cli_defaults_live_in_the_project_and_typed_paths_in_the_working_directory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    parser = build_parser()
    assert parser.parse_args(["train"]).runs_root == paths.resolve(paths.RUNS_ROOT)
    assert parser.parse_args(["pipeline"]).out == paths.resolve(paths.PIPELINE_ROOT)
    assert parser.parse_args(["compare", "r"]).out == paths.resolve(paths.RESULTS_DIR)
    assert parser.parse_args(["train", "--runs-root", "mine"]).runs_root == tmp_path / "mine"
    assert parser.parse_args(["evaluate", "run"]).run == tmp_path / "run"
