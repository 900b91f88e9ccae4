"""Segmentation architectures: U-Net (baseline), U-Net++ (nested) and Attention U-Net."""

from metaseg_tf.models.attention_unet import attention_maps, attention_unet
from metaseg_tf.models.nested_unet import average_heads, nested_unet, prune_nested_unet
from metaseg_tf.models.registry import MODEL_NAMES, build_model
from metaseg_tf.models.unet import unet

__all__ = [
    "MODEL_NAMES",
    "attention_maps",
    "attention_unet",
    "average_heads",
    "build_model",
    "nested_unet",
    "prune_nested_unet",
    "unet",
]
