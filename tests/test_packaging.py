"""requirements.txt, environment.yml and pyproject.toml agree; notebooks carry no outputs; the package's
modules have distinct names and their imports point one way."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _names(lines: list[str]) -> set[str]:
    return {re.split(r"[<>=!~\[ ]", line.strip())[0].lower() for line in lines
            if line.strip() and not line.strip().startswith(("#", "-"))}


def test_pyproject_reads_requirements_and_environment_installs_them() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]
    requirements = _names((ROOT / "requirements.txt").read_text().splitlines())
    assert {"tensorflow", "keras", "opencv-python-headless", "papermill", "scikit-image"} <= requirements
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict))
    assert "-r requirements.txt" in pip_section and "-e ." in pip_section


def test_notebooks_are_committed_without_outputs() -> None:
    for notebook in (ROOT / "notebooks").glob("*.ipynb"):
        cells = json.loads(notebook.read_text())["cells"]
        for cell in cells:
            if cell["cell_type"] == "code":
                assert not cell.get("outputs") and not cell.get("execution_count"), notebook.name


def test_no_two_modules_share_a_file_name() -> None:
    modules = [p for p in (ROOT / "metaseg_tf").rglob("*.py") if p.name != "__init__.py"]
    names = [p.name for p in modules]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)


# module -> modules it must not pull in when imported: inference does not load the reporting code, the web
# app does not load the notebook helpers, and the data layer, the scores and run folders need no Keras
IMPORT_BOUNDARIES = {
    "metaseg_tf.predict": ("metaseg_tf.evaluation.report", "metaseg_tf.plots", "metaseg_tf.notebook"),
    "metaseg_tf.serve.api": ("metaseg_tf.notebook", "metaseg_tf.evaluation.report", "metaseg_tf.plots"),
    "metaseg_tf.data": ("keras", "metaseg_tf.training", "metaseg_tf.models"),
    "metaseg_tf.evaluation.scores": ("keras",),
    "metaseg_tf.training.runs": ("keras",),
}


@pytest.mark.parametrize("module", sorted(IMPORT_BOUNDARIES))
def test_imports_point_one_way(module: str) -> None:
    script = f"import sys, {module}\nprint(sorted(set({IMPORT_BOUNDARIES[module]!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
