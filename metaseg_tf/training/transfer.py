"""A training that starts from another run's weights (``init_from``, nnU-Net's ``-pretrained_weights``):
fine-tuning a model trained on one dataset (the LGG gliomas) on another (metastases).

**Rule.** The parent run's ``best.keras`` is loaded and its weights are copied into the new network in order,
weight for weight. The two must be one architecture: the same model, filters, deep supervision and outputs
(the same target, and sequences in the same order); anything else is a :class:`~metaseg_tf.config.ConfigError`
that names what differs. Only the input convolution may differ, in its number of input channels (another number of sequences,
or of 2.5D context slices): a kernel ``(kh, kw, C_parent, F)`` becomes ``(kh, kw, C_child, F)`` with every new
input channel the mean of the parent's input-channel kernels times ``C_parent / C_child``, so that an input
whose channels are all equal (a grey slice given as 3 channels, one sequence repeated) meets the parent's
first-layer response exactly (the scaling timm's ``adapt_input_conv`` uses). Biases, normalisation statistics
and every later layer are copied as they are; the optimiser starts afresh.

The parent is recorded in the new run (``config.json``'s ``init_from`` and ``state.json``'s ``initialised_from``:
the parent's folder, its architecture, input channels and what was adapted).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import numpy as np

from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.runs.folders import load_run_config, run_model_path


def adapt_input_kernel(kernel: np.ndarray, channels: int) -> np.ndarray:
    """``(kh, kw, C_parent, F)`` -> ``(kh, kw, channels, F)``: each new channel the mean of the parent's input
    channels scaled by ``C_parent / channels`` (see the module docstring); the kernel itself when they agree."""
    parent_channels = kernel.shape[2]
    if parent_channels == channels:
        return kernel
    mean = kernel.mean(axis=2, keepdims=True) * (parent_channels / channels)
    return np.repeat(mean, channels, axis=2).astype(kernel.dtype)


def initialise_from(model: keras.Model, config: ExperimentConfig) -> dict[str, Any]:
    """Copy the weights of run ``config.init_from`` into ``model`` (built from ``config``) by the rule of the
    module docstring; returns what is recorded in the new run's state."""
    import metaseg_tf.training.losses  # noqa: F401  (registers the custom loss and metric for deserialisation)
    import metaseg_tf.training.metrics  # noqa: F401

    parent_dir = Path(config.init_from)
    try:
        parent_config = load_run_config(parent_dir)
        parent = keras.saving.load_model(run_model_path(parent_dir, "best"), compile=False)
    except Exception as error:  # a missing folder or file, a damaged .keras archive: several types
        raise ConfigError(f"init_from {parent_dir}: not a finished run folder with best.keras ({error})") from error
    if parent_config.model != config.model:
        raise ConfigError(f"init_from {parent_dir}: its model is {parent_config.model}; this training builds "
                          f"{config.model}")
    if parent_config.target != config.target:
        raise ConfigError(f"init_from {parent_dir} segments {parent_config.target}; this training {config.target}: "
                          "the outputs would mean something else")
    if parent_config.sequences and config.sequences and parent_config.sequences != config.sequences and \
            len(parent_config.sequences) == len(config.sequences):
        raise ConfigError(f"init_from {parent_dir} reads {', '.join(parent_config.sequences)}; this training "
                          f"{', '.join(config.sequences)}: the channels would be swapped (give them in the parent's order)")
    theirs, ours = parent.weights, model.weights
    if len(theirs) != len(ours):
        raise ConfigError(f"init_from {parent_dir}: {len(theirs)} weights against this network's {len(ours)}: "
                          "another architecture (filters, deep supervision, outputs)")
    adapted = []
    for index, (source, target) in enumerate(zip(theirs, ours)):
        value = keras.ops.convert_to_numpy(source.value)
        if tuple(value.shape) != tuple(target.shape):
            input_kernel = (index == 0 and value.ndim == 4 and value.shape[:2] == tuple(target.shape[:2])
                            and value.shape[3] == target.shape[3])
            if not input_kernel:
                raise ConfigError(f"init_from {parent_dir}: weight {index} ({target.path}) is {tuple(value.shape)} "
                                  f"in the parent and {tuple(target.shape)} here: another architecture (filters, "
                                  "deep supervision, target regions)")
            value = adapt_input_kernel(value, int(target.shape[2]))
            adapted.append(f"{target.path}: {parent_config.input_channels} -> {config.input_channels} input channels")
        target.assign(value.astype(keras.backend.standardize_dtype(target.dtype)))
    return {"run": str(parent_dir), "model": parent_config.model, "input_channels": parent_config.input_channels,
            "adapted": adapted}
