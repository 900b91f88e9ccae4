"""One entry point for every architecture: ``build_model(name, config)``."""

from __future__ import annotations

from collections.abc import Callable

import keras

from metaseg_tf.config import MODEL_NAMES, ConfigError, ExperimentConfig
from metaseg_tf.models.attention_unet import attention_unet
from metaseg_tf.models.nested_unet import nested_unet
from metaseg_tf.models.unet import unet

__all__ = ["MODEL_NAMES", "build_model"]


def build_model(name: str, config: ExperimentConfig, num_classes: int | None = None) -> keras.Model:
    """Build ``name`` for ``(config.image_size, config.image_size, config.input_channels)`` inputs (every
    sequence and its 2.5D neighbours) and ``config.filters``, with ``config.output_channels`` sigmoid outputs
    (one per region; ``num_classes`` instead: that many softmax classes); U-Net++ gets deep supervision when
    ``config.deep_supervision`` is set."""
    if name not in MODEL_NAMES:
        raise ConfigError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if config.image_size % 2 ** (len(config.filters) - 1):
        raise ConfigError(
            f"image_size {config.image_size} is not divisible by 2^{len(config.filters) - 1} "
            f"({len(config.filters)} filter levels)"
        )
    input_shape = (config.image_size, config.image_size, config.input_channels)
    multilabel = num_classes is None and config.output_channels > 1
    num_classes = config.output_channels if num_classes is None else num_classes
    builders: dict[str, Callable[..., keras.Model]] = {
        "unet": lambda: unet(input_shape, config.filters, num_classes, multilabel),
        "attention_unet": lambda: attention_unet(input_shape, config.filters, num_classes, multilabel),
        "nested_unet": lambda: nested_unet(input_shape, config.filters, num_classes, config.deep_supervision,
                                              multilabel),
    }
    return builders[name]()
