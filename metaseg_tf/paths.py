"""Where things live: the project root and the default folders, each spelled once.

Relative paths inside the project (config defaults, notebook parameters, the default run and pipeline
folders) are taken from the project root by :func:`resolve`, so a notebook opened in ``notebooks/``, the same
notebook run by the pipeline from the root, and ``metaseg`` started in any folder read and write the same
``data/`` and ``results/``. Paths typed on the command line are relative to the working directory, as for
any command: the CLI makes them absolute before they reach the library.
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS_DIR = PROJECT_ROOT / "notebooks"

# generated data (git-ignored)
PHANTOM_DIR = "data/phantom-brats"  # the embedded default dataset: the BraTS-METS-layout phantom
KAGGLE_PHANTOM_DIR = "data/phantom"  # the 2D kaggle_3m-layout phantom
SMOKE_PHANTOM_DIR = "data/phantom-brats-smoke"  # the smoke profile's tiny phantoms
KAGGLE_SMOKE_PHANTOM_DIR = "data/phantom-smoke"
EXAMPLE_PHANTOM_DIR = "data/phantom-examples"  # the web app's "try an example" slices
CACHE_DIR = "data/cache"  # preprocessed arrays

# outputs
RESULTS_DIR = "results"  # comparisons and predictions
RUNS_ROOT = "results/runs"  # `metaseg train`
PIPELINE_ROOT = "results/pipeline"  # `metaseg pipeline`
CROSSVAL_ROOT = "results/crossval"  # `metaseg crossval`: one folder per cross-validation name
INTERACTIVE_DIR = "results/interactive"  # notebooks opened by hand


def resolve(path: str | Path) -> Path:
    """``path`` as an absolute path; a relative path is taken from the project root."""
    path = Path(path).expanduser()
    return path if path.is_absolute() else PROJECT_ROOT / path


def shown(path: str | Path) -> str:
    """``path`` as a report shows it: relative to the project root where it lies in the project
    (``results/runs/...``) or beside it (``../shared/data/...``, as the README's commands name the data),
    else absolute; so a committed report does not carry the folder one machine kept its checkout in."""
    path = Path(os.path.normpath(resolve(path)))
    bases = [(PROJECT_ROOT, "")] + ([(PROJECT_ROOT.parent, "../")] if PROJECT_ROOT.parent.parent != PROJECT_ROOT.parent
                                    else [])  # not beside a checkout at the file system's root: that is everything
    for candidate in (path, path.resolve()):  # PROJECT_ROOT has its links resolved; a typed path may not
        for base, prefix in bases:
            if candidate.is_relative_to(base):
                return os.path.normpath(prefix + candidate.relative_to(base).as_posix())
    return str(path)
