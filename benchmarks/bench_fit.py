"""Benchmark: the LGG recipe's training as it runs (``model.fit`` on our batches), XLA off and on, in one run.

``bench_models.py`` times bare train steps against the peers; this script times what a run spends per epoch:
the recipe's network and compilation (:func:`metaseg_tf.training.train.compile_model`: U-Net++ with its four
deep-supervision heads, BCE + Dice on each, the Keras metrics, Adam with cosine decay) fed by
:class:`~metaseg_tf.data.batches.SegmentationBatches` (augmented, as in training) through ``model.fit``, with
``jit_compile`` off (what ``auto`` gives TensorFlow on a CPU) and on (XLA). Data: random 8-bit slices with
random square lesions (speed does not depend on the content), ``--slices`` of them, 128 px, batch 16.

Each setting fits one warm-up epoch (tracing, XLA compilation), then ``--epochs`` timed epochs; the settings
alternate per model, off first. Printed per model and setting: training images per second, seconds per epoch
of the recipe's real split (``--epoch-slices``, 2022: the 56 training patients of fold 0 of the LGG cross-validation) and
minutes for its 15 epochs (validation and checkpoints not included), and XLA's speed-up.

Usage: ``python benchmarks/bench_fit.py [--slices 320 --epochs 2 --epoch-slices 2022 --size 128 --train-epochs 15]``
(``--size 64 --slices 288 --epoch-slices 288 --train-epochs 30``: about the main job's trainings on the phantom).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.batches import SegmentationBatches
from metaseg_tf.data.preprocess import PreprocessedDataset
from metaseg_tf.environment import machine_description
from metaseg_tf.models import build_model
from metaseg_tf.training.train import compile_model

# the LGG recipe itself (its flip TTA, seeds and early stopping do not change a training's speed)
RECIPE = ExperimentConfig.load(Path(__file__).resolve().parents[1] / "results/lgg_recipe/recipe.yml")


def _dataset(slices: int, size: int) -> PreprocessedDataset:
    """Random 3-channel slices, each with a random square lesion on every other slice."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (slices, size, size, 3), dtype=np.uint8)
    masks = np.zeros((slices, size, size), np.uint8)
    for k in range(0, slices, 2):
        top, left = rng.integers(0, size - 24, 2)
        masks[k, top : top + 24, left : left + 24] = 1
    return PreprocessedDataset(images, masks, np.asarray([f"p{k // 20}" for k in range(slices)]), np.arange(slices))


def fit_rate(config: ExperimentConfig, dataset: PreprocessedDataset, epochs: int) -> tuple[float, float]:
    """Training images per second of ``model.fit`` over ``epochs`` epochs after a warm-up epoch, and the
    warm-up epoch's seconds (tracing and, with XLA, compilation included)."""
    keras.utils.set_random_seed(0)
    model = build_model(config.model, config)
    batches = SegmentationBatches(dataset, np.arange(len(dataset)), config, training=True,
                                  target_copies=len(model.outputs))
    compile_model(model, config, steps_per_epoch=len(batches))
    start = time.perf_counter()
    model.fit(batches, epochs=1, verbose=0)
    warm_up = time.perf_counter() - start
    start = time.perf_counter()
    model.fit(batches, epochs=epochs, verbose=0)
    return epochs * batches.slices_per_epoch / (time.perf_counter() - start), warm_up


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=320, help="slices per timed epoch")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per setting")
    parser.add_argument("--epoch-slices", type=int, default=2022, help="slices of the real epoch to project to")
    parser.add_argument("--size", type=int, default=RECIPE.image_size,
                        help="input size (64: the cpu profile's main job on the phantom)")
    parser.add_argument("--train-epochs", type=int, default=RECIPE.epochs, help="epochs to project to")
    args = parser.parse_args()
    dataset = _dataset(args.slices, args.size)
    rows = []
    for model in ("nested_unet", "attention_unet"):
        rates = {}
        for jit in ("off", "on"):
            config = RECIPE.replace(model=model, jit_compile=jit, image_size=args.size)
            rates[jit], warm_up = fit_rate(config, dataset, args.epochs)
            seconds = args.epoch_slices / rates[jit]
            rows.append({"model": model, "XLA": jit, "train img/s": f"{rates[jit]:.1f}",
                         "warm-up epoch, s": f"{warm_up:.0f}",
                         f"s per epoch of {args.epoch_slices}": f"{seconds:.0f}",
                         f"min for {args.train_epochs} epochs": f"{seconds * args.train_epochs / 60:.1f}",
                         "XLA speed-up": "" if jit == "off" else f"{rates['on'] / rates['off']:.2f}x"})
    print(f"machine: {machine_description()}; Keras {keras.__version__} on {keras.backend.backend()}; the LGG "
          f"recipe (filters 8-128, batch 16) at {args.size} px in model.fit, {args.slices} slices x {args.epochs} "
          "epochs after a warm-up epoch")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
