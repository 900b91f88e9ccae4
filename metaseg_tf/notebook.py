"""Small helpers the numbered notebooks share, so that the notebooks themselves hold no logic.

A notebook's ``parameters`` cell (papermill) sets plain values; :func:`experiment_config` turns them into
an :class:`~metaseg_tf.config.ExperimentConfig`, :func:`configure_backend` selects the Keras backend before
Keras is imported, and :func:`figure_path` / :func:`show` save every figure as a PNG under
``<out_dir>/figures/`` and display it inline. A notebook finds the run an earlier one trained with
:func:`~metaseg_tf.runs.folders.newest_run`. Relative paths are resolved against the project root, so a
notebook opened from ``notebooks/`` and one executed by the pipeline from the root write to the same place.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.synthetic import default_phantom
from metaseg_tf.paths import resolve


def configure_backend(backend: str = "") -> str:
    """Select the Keras backend (``tensorflow``, ``jax`` or ``torch``; empty: keep ``KERAS_BACKEND`` or
    Keras' default) and return the one in use. Must run before Keras is first imported."""
    if backend:
        if "keras" in sys.modules:
            import keras

            if keras.backend.backend() != backend:
                raise RuntimeError(f"Keras was already imported with the {keras.backend.backend()} backend; "
                                   f"restart the kernel to use {backend}")
        os.environ["KERAS_BACKEND"] = backend
    import keras

    return keras.backend.backend()


def experiment_config(data_dir: str = "", config_overrides: dict[str, Any] | None = None,
                      progress: bool = True, phantom: str = "brats_mets", **fields: Any) -> ExperimentConfig:
    """The experiment's config from a notebook's parameters.

    ``data_dir`` empty means the embedded synthetic phantom of layout ``phantom`` (``brats_mets``, the default:
    NIfTI volumes with BraTS labels; ``kaggle_3m``: 2D slices), generated on first use
    (:func:`~metaseg_tf.data.synthetic.default_phantom`). ``fields`` are :class:`ExperimentConfig` fields
    (``image_size``, ``epochs``, ``target``...); ``config_overrides`` any further ones. ``cache_dir`` is
    resolved like the data folder.
    """
    if not data_dir:
        data_dir = str(default_phantom(phantom, progress=progress).root)
    settings = {**fields, **(config_overrides or {})}
    settings["cache_dir"] = str(resolve(settings.get("cache_dir", ExperimentConfig.cache_dir)))
    return ExperimentConfig.from_dict({**settings, "data_dir": str(resolve(data_dir))})


def figure_path(out_dir: str | Path, notebook: str, name: str) -> Path:
    """Where a notebook's figure ``name`` goes: ``<out_dir>/figures/<notebook>-<name>.png``."""
    return resolve(out_dir) / "figures" / f"{notebook}-{name}.png"


def show(path: str | Path) -> Path:
    """Display a saved PNG inline (in a notebook; a no-op elsewhere) and return its path."""
    from IPython.display import Image, display

    display(Image(filename=str(path)))
    return Path(path)
