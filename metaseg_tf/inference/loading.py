"""A run's saved model and the network that inference runs.

Models saved by every release load (``tests/fixtures/legacy-*.keras``): the custom loss and metric are
registered before deserialisation, and the model is loaded without its training state. Keras is imported
only when a model is loaded, so the command line that names engines and exports starts fast.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from metaseg_tf.config import ConfigError
from metaseg_tf.runs.folders import run_model_path

if TYPE_CHECKING:
    import keras


def load_model(run_dir: Path | str, which: str = "best") -> keras.Model:
    """The run's ``best`` (default) or ``last`` model, without its training state."""
    import keras

    import metaseg_tf.training.losses  # noqa: F401  (registers the custom loss and metric for deserialisation)
    import metaseg_tf.training.metrics  # noqa: F401

    return keras.saving.load_model(run_model_path(run_dir, which), compile=False)


def inference_network(model: keras.Model, level: int | None = None) -> keras.Model:
    """The network inference runs: ``model``'s last output (for U-Net++ with deep supervision the deepest head,
    the one its validation Dice was monitored on), or for ``level`` the U-Net++ pruned to that level (Zhou et
    al. 2019, section III-C; :func:`~metaseg_tf.models.nested_unet.prune_nested_unet`: head ``level``, same
    weights, fewer nodes). ``(B, S, S, input_channels)`` -> ``(B, S, S, regions)``. A level for a model without
    deep-supervision heads is a :class:`ConfigError`."""
    import keras

    from metaseg_tf.models.nested_unet import head_names, prune_nested_unet

    if level is None:
        return keras.Model(model.inputs, model.outputs[-1], name=f"{model.name}_served")
    heads = head_names(model)
    if not heads:
        raise ConfigError(f"a pruning level applies to U-Net++ trained with deep supervision; {model.name} has no "
                          "heads to prune to")
    if not 1 <= level <= len(heads):
        raise ConfigError(f"level must lie in 1..{len(heads)} for this U-Net++, got {level}")
    return prune_nested_unet(model, level)
