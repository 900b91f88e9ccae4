"""Benchmark: our U-Net++ and Attention U-Net against published Keras implementations, side by side.

Every model gets the same input (128 x 128 x 3), filters (16, 32, 64, 128, 256), batch 8, sigmoid output,
Adam, binary cross-entropy, ``jit_compile="auto"``, and is timed in the same process one after another:

* ``train img/s``: ``train_on_batch`` after two warm-up steps (compilation excluded);
* ``infer img/s``: ``predict_on_batch`` likewise;
* parameters and GFLOPs per image (counted by the backend's compiler, :func:`metaseg_tf.evaluation.complexity.count_flops`),
  because implementations that share a name need not compute the same network.

Peers: keras-unet-collection's ``unet_plus_2d`` and ``att_unet_2d`` (batch norm on, transposed-convolution
up-sampling, max pooling: the options closest to ours) and medicai's ``UNetPlusPlus`` / ``AttentionUNet``.
A peer that is not installed or cannot be built at this configuration is listed with the reason.
Install the peers with ``pip install keras-unet-collection medicai``.

Usage: ``python benchmarks/bench_models.py [--size 128 --batch 8 --steps 5]``.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import keras
import numpy as np

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.evaluation.complexity import count_flops
from metaseg_tf.models import build_model

FILTERS = (16, 32, 64, 128, 256)


def _ours(name: str, deep_supervision: bool = False) -> Callable[[int], keras.Model]:
    def build(size: int) -> keras.Model:
        config = ExperimentConfig(image_size=size, filters=FILTERS, deep_supervision=deep_supervision)
        return build_model(name, config)
    return build


def _kuc(kind: str) -> Callable[[int], keras.Model]:
    def build(size: int) -> keras.Model:
        from keras_unet_collection import models

        options = dict(filter_num=list(FILTERS), n_labels=1, stack_num_down=2, stack_num_up=2, activation="ReLU",
                       output_activation="Sigmoid", batch_norm=True, pool="max", unpool=False)
        if kind == "unet_plus_2d":
            return models.unet_plus_2d((size, size, 3), deep_supervision=False, **options)
        return models.att_unet_2d((size, size, 3), atten_activation="ReLU", attention="add", **options)
    return build


def _medicai(kind: str) -> Callable[[int], keras.Model]:
    def build(size: int) -> keras.Model:
        from medicai import models

        model_class = models.UNetPlusPlus if kind == "UNetPlusPlus" else models.AttentionUNet
        return model_class(input_shape=(size, size, 3), encoder_depth=4, decoder_filters=FILTERS[::-1][1:],
                           num_classes=1, classifier_activation="sigmoid")
    return build


CANDIDATES: dict[str, Callable[[int], keras.Model]] = {
    "ours nested_unet": _ours("nested_unet"),
    "ours nested_unet (deep supervision)": _ours("nested_unet", deep_supervision=True),
    "keras-unet-collection unet_plus_2d": _kuc("unet_plus_2d"),
    "medicai UNetPlusPlus": _medicai("UNetPlusPlus"),
    "ours attention_unet": _ours("attention_unet"),
    "keras-unet-collection att_unet_2d": _kuc("att_unet_2d"),
    "medicai AttentionUNet": _medicai("AttentionUNet"),
}


def _time(step: Callable[[], object], steps: int) -> float:
    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def measure(build: Callable[[int], keras.Model], size: int, batch: int, steps: int) -> dict[str, float]:
    keras.utils.set_random_seed(0)
    model = build(size)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    y = (rng.random((batch, size, size, 1)) < 0.1).astype(np.float32)
    targets = y if len(model.outputs) == 1 else [y] * len(model.outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile="auto")
    train_s = _time(lambda: model.train_on_batch(x, targets), steps)
    infer_s = _time(lambda: keras.tree.map_structure(np.asarray, model.predict_on_batch(x)), steps)
    flops = count_flops(model)
    return {"params": model.count_params(), "gflops": flops / 1e9 if flops else float("nan"),
            "train": batch / train_s, "infer": batch / infer_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model after 2 warm-up steps")
    args = parser.parse_args()
    print(f"backend {keras.backend.backend()}, input {args.size}x{args.size}x3, filters {FILTERS}, "
          f"batch {args.batch}, {args.steps} timed steps")
    print(f"{'model':<40} {'params':>10} {'GFLOPs':>7} {'train img/s':>12} {'infer img/s':>12}")
    for name, build in CANDIDATES.items():
        try:
            result = measure(build, args.size, args.batch, args.steps)
        except Exception as error:  # a peer that cannot be installed or built: say why, go on
            reason = str(error).splitlines()[0][:90] if str(error) else type(error).__name__
            print(f"{name:<40} not measured: {type(error).__name__}: {reason}")
            continue
        print(f"{name:<40} {result['params']:>10,} {result['gflops']:>7.2f} {result['train']:>12.2f} "
              f"{result['infer']:>12.2f}")


if __name__ == "__main__":
    main()
