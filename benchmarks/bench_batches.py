"""Benchmark: preprocessing and augmented-batch throughput, ours against Keras' own augmentation layers.

Prints one table, measured in one run on one machine:

* ``preprocess (disk -> cache)``: read + window + CLAHE + resize, slices/s (cold, no cache).
* ``cache load``: the same slices from the .npz cache, slices/s.
* ``ours, augmented`` / ``ours, no augmentation``: ``SegmentationBatches`` batches/s.
* ``peer: keras.layers Random{Flip,Rotation,Zoom}``: the keras-io way of joint augmentation (image and mask
  concatenated on the channel axis, one random transform, mask re-binarised), on the same cached slices,
  under whatever ``KERAS_BACKEND`` is set.

Usage: ``python benchmarks/bench_batches.py [--patients 8 --slices 24 --size 128 --batch 16 --batches 40]``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import keras
import numpy as np

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.batches import SegmentationBatches
from metaseg_tf.data.discover import discover_pairs
from metaseg_tf.data.preprocess import normalise, preprocess_dataset
from metaseg_tf.data.synthetic import generate_phantom


def _rate(count: int, seconds: float) -> str:
    return f"{count / seconds:10.1f}"


def _time_batches(batches: SegmentationBatches, n: int) -> float:
    batches[0]  # warm-up
    start = time.perf_counter()
    for i in range(n):
        batches[i % len(batches)]
        if (i + 1) % len(batches) == 0:
            batches.on_epoch_end()
    return time.perf_counter() - start


def _keras_layers_peer(images: np.ndarray, masks: np.ndarray, config: ExperimentConfig, n: int) -> float:
    augment = keras.Sequential([
        keras.layers.RandomFlip("horizontal", seed=1),
        keras.layers.RandomRotation(config.rotation_degrees / 360.0, fill_mode="constant", seed=2),
        keras.layers.RandomZoom(config.zoom_range, fill_mode="constant", seed=3),
    ])
    batch = config.batch_size

    def one(i: int) -> tuple[np.ndarray, np.ndarray]:
        start = (i * batch) % (len(images) - batch)
        x = normalise(images[start : start + batch], config.normalisation)
        y = masks[start : start + batch, ..., None].astype(np.float32)
        joint = augment(np.concatenate([x, y], axis=-1), training=True)
        joint = keras.ops.convert_to_numpy(joint)
        return joint[..., :-1], np.round(joint[..., -1:])

    one(0)
    start = time.perf_counter()
    for i in range(n):
        one(i)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--slices", type=int, default=24)
    parser.add_argument("--size", type=int, default=128, help="network input size")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--batches", type=int, default=40, help="batches timed per variant")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        generate_phantom(root / "phantom", args.patients, args.slices, 256, seed=0, progress=False)
        config = ExperimentConfig(image_size=args.size, batch_size=args.batch, cache_dir=str(root / "cache"))
        report = discover_pairs(root / "phantom")
        start = time.perf_counter()
        dataset = preprocess_dataset(report, config, progress=False)
        cold = time.perf_counter() - start
        start = time.perf_counter()
        preprocess_dataset(report, config, progress=False)
        warm = time.perf_counter() - start
        indices = np.arange(len(dataset))
        ours = SegmentationBatches(dataset, indices, config, training=True, seed=0)
        plain = SegmentationBatches(dataset, indices, config.replace(augment=False), training=True, seed=0)
        rows = [
            ("preprocess (disk -> cache), slices/s", _rate(len(dataset), cold)),
            ("cache load, slices/s", _rate(len(dataset), warm)),
            ("ours, augmented, batches/s", _rate(args.batches, _time_batches(ours, args.batches))),
            ("ours, no augmentation, batches/s", _rate(args.batches, _time_batches(plain, args.batches))),
            ("peer: keras.layers Random{Flip,Rotation,Zoom}, batches/s",
             _rate(args.batches, _keras_layers_peer(dataset.images, dataset.masks, config, args.batches))),
        ]
    print(f"backend {keras.backend.backend()}, {len(dataset)} slices at {args.size} px, batch {args.batch}")
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
