"""requirements.txt, environment.yml and pyproject.toml agree; notebooks carry no outputs; the package's
modules have distinct names and their imports point one way."""

from __future__ import annotations

import ast
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
    "metaseg_tf.inference.files": ("metaseg_tf.evaluation.report", "metaseg_tf.plots", "metaseg_tf.notebook"),
    "metaseg_tf.serve.api": ("metaseg_tf.notebook", "metaseg_tf.evaluation.report", "metaseg_tf.plots"),
    "metaseg_tf.data": ("keras", "metaseg_tf.training", "metaseg_tf.models"),
    "metaseg_tf.evaluation.scores": ("keras",),
    "metaseg_tf.runs.folders": ("keras",),
    "metaseg_tf.runs.records": ("keras",),
}


@pytest.mark.parametrize("module", sorted(IMPORT_BOUNDARIES))
def test_imports_point_one_way(module: str) -> None:
    script = f"import sys, {module}\nprint(sorted(set({IMPORT_BOUNDARIES[module]!r}) & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _readme_layers() -> list[list[str]]:
    """The README's layer list (``## Layout``): lowest first, each layer's modules or packages."""
    section = (ROOT / "README.md").read_text().split("## Layout\n", 1)[1].split("```", 1)[0]
    layers = [re.findall(r"`([\w.]+)`", line.split(":", 1)[0]) for line in section.splitlines()
              if re.match(r"\d+\. `", line)]
    assert len(layers) >= 5, f"README's layer list not found: {layers}"
    return layers


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, module: str) -> set[str]:
    """Every module of ours that ``path`` imports, at module level or inside a function (a name imported from
    a package is the submodule where one exists)."""
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.split(".")[0] == "metaseg_tf"}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            if base.split(".")[0] != "metaseg_tf":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                exists = (ROOT / Path(*submodule.split("."))).with_suffix(".py").is_file() or \
                    (ROOT / Path(*submodule.split(".")) / "__init__.py").is_file()
                found.add(submodule if exists else base)
    return found - {module}


def test_imports_point_down_the_readme_layers_and_never_in_a_circle() -> None:
    layers = _readme_layers()

    def layer_of(module: str) -> int:
        name = module.removeprefix("metaseg_tf").lstrip(".")
        matches = [(len(entry), index) for index, entries in enumerate(layers) for entry in entries
                   if name == entry or name.startswith(entry + ".")]
        assert matches or not name, f"{module} is in no layer of README's list"
        return max(matches)[1] if matches else 0

    graph = {}
    for path in sorted((ROOT / "metaseg_tf").rglob("*.py")):
        module = _module_name(path)
        graph[module] = _imports(path, module)
    upward = [f"{source} ({', '.join(layers[layer_of(source)])}) -> {target} ({', '.join(layers[layer_of(target)])})"
              for source, targets in graph.items() for target in sorted(targets)
              if layer_of(target) > layer_of(source)]
    assert not upward, "imports pointing to a higher layer:\n" + "\n".join(upward)

    # no circle, whatever the layers: depth-first search for a back edge (package __init__ files import their
    # own modules, so edges into a package's __init__ from its modules are not followed)
    state: dict[str, int] = {}

    def visit(module: str, trail: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph.get(module, ())):
            if target in graph and not module.startswith(target + "."):
                if state.get(target) == 1:
                    raise AssertionError("import circle: " + " -> ".join([*trail[trail.index(target):], target]))
                if target not in state:
                    visit(target, [*trail, target])
        state[module] = 2

    for module in graph:
        if module not in state:
            visit(module, [module])


def test_no_module_outgrows_its_concept() -> None:
    """About 450 lines at most, unless the module's docstring says why it is longer."""
    long = [f"{path.relative_to(ROOT)}: {count} lines" for path in sorted((ROOT / "metaseg_tf").rglob("*.py"))
            if (count := len(path.read_text().splitlines())) > 470 and
            "longer than" not in (ast.get_docstring(ast.parse(path.read_text())) or "")]
    assert not long, long
