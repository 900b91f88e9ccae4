"""requirements.txt, environment.yml and pyproject.toml agree; notebooks carry no outputs."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

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
