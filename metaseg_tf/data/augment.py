"""Joint image/mask augmentation for training batches, in NumPy and OpenCV (no deep-learning backend).

Geometric changes (rotation, zoom, flips) are one affine warp applied to the image with bilinear and to
the mask with nearest-neighbour interpolation, so the mask stays binary and aligned with the image.
Intensity changes touch the image only: a per-channel gamma on ``[0, 1]`` intensities before
normalisation, then a per-channel gain and offset after it. (A gain or offset before a z-score would be
undone by the z-score itself; a gamma is not.) A missing-sequence fill (off by default) first replaces every
sequence of a slice by one of them, as datasets fill a sequence that was not acquired: the Kaggle LGG set
puts the FLAIR in place of a missing pre- or post-contrast T1 (Buda et al., Comput. Biol. Med. 2019), and
models trained without seeing it miss those patients (``results/lgg_recipe/README.md``).
"""

from __future__ import annotations

from dataclasses import dataclass

import cv2
import numpy as np

from metaseg_tf.config import ExperimentConfig


@dataclass(frozen=True)
class AugmentationSettings:
    """Ranges of the random changes; zero (or False) switches one off."""

    rotation_degrees: float = 15.0
    zoom_range: float = 0.1
    horizontal_flip: bool = True
    vertical_flip: bool = False
    intensity_jitter: float = 0.1
    sequence_fill_probability: float = 0.0
    sequence_fill_channel: int = 1
    sequences: int = 3  # channels per 2.5D block: the fill works within each block

    @classmethod
    def from_config(cls, config: ExperimentConfig) -> AugmentationSettings:
        return cls(config.rotation_degrees, config.zoom_range, config.horizontal_flip, config.vertical_flip,
                   config.intensity_jitter, config.sequence_fill_probability, config.sequence_fill_channel,
                   config.channels)


def fill_sequences(image: np.ndarray, rng: np.random.Generator, settings: AugmentationSettings) -> np.ndarray:
    """``image (H, W, B * C)`` of ``B`` 2.5D blocks of ``C = settings.sequences`` sequences; with probability
    ``settings.sequence_fill_probability`` every sequence of every block becomes sequence
    ``settings.sequence_fill_channel`` of its block. No random number is drawn when the probability is 0, so
    runs without the fill augment as they did before it existed."""
    if settings.sequence_fill_probability <= 0 or rng.random() >= settings.sequence_fill_probability:
        return image
    height, width, channels = image.shape
    blocks = image.reshape(height, width, channels // settings.sequences, settings.sequences)
    filled = np.repeat(blocks[..., settings.sequence_fill_channel : settings.sequence_fill_channel + 1],
                       settings.sequences, axis=-1)
    return filled.reshape(image.shape)


def random_affine(rng: np.random.Generator, settings: AugmentationSettings, size: int) -> np.ndarray:
    """A ``(2, 3)`` matrix: flips, then rotation and zoom about the image centre."""
    angle = rng.uniform(-settings.rotation_degrees, settings.rotation_degrees)
    zoom = rng.uniform(1.0 - settings.zoom_range, 1.0 + settings.zoom_range)
    centre = ((size - 1) / 2.0, (size - 1) / 2.0)
    matrix = np.vstack([cv2.getRotationMatrix2D(centre, angle, zoom), [0.0, 0.0, 1.0]])
    flip = np.eye(3)
    if settings.horizontal_flip and rng.random() < 0.5:
        flip = np.array([[-1.0, 0.0, size - 1.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]) @ flip
    if settings.vertical_flip and rng.random() < 0.5:
        flip = np.array([[1.0, 0.0, 0.0], [0.0, -1.0, size - 1.0], [0.0, 0.0, 1.0]]) @ flip
    return (matrix @ flip)[:2]


def warp_pair(image: np.ndarray, mask: np.ndarray, matrix: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Apply one ``(2, 3)`` affine to ``image (H, W, C)`` (bilinear) and ``mask (H, W)`` (nearest)."""
    height, width = mask.shape
    warped_image = cv2.warpAffine(image, matrix, (width, height), flags=cv2.INTER_LINEAR,
                                  borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    warped_mask = cv2.warpAffine(mask, matrix, (width, height), flags=cv2.INTER_NEAREST,
                                 borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return warped_image.reshape(image.shape), warped_mask


def random_gamma(image: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """``[0, 1]`` float image -> the same with a per-channel gamma drawn from ``exp(U(-jitter, jitter))``."""
    gamma = np.exp(rng.uniform(-jitter, jitter, image.shape[-1])).astype(np.float32)
    return np.power(image, gamma)


def random_gain_offset(image: np.ndarray, rng: np.random.Generator, jitter: float) -> np.ndarray:
    """Normalised image -> ``image * (1 + U(-j, j)) + U(-j, j)``, per channel."""
    gain = 1.0 + rng.uniform(-jitter, jitter, image.shape[-1]).astype(np.float32)
    offset = rng.uniform(-jitter, jitter, image.shape[-1]).astype(np.float32)
    return image * gain + offset
