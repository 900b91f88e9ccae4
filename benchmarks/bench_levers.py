"""Benchmark: speed levers for Attention U-Net on this CPU, each against the model as built, in one run.

Issue 14 asks whether the attention gate's resampling and multiply, the batch size or the backend's settings
make our Attention U-Net faster without changing its outputs. Rows (128 x 128 x 3, filters 16-256, Adam + BCE,
as ``bench_models.py``), timed in rounds whose order rotates so that machine drift cancels:

* ``as built``: :func:`metaseg_tf.models.attention_unet.attention_unet` (gate coefficients resampled by Keras'
  ``UpSampling2D(interpolation="bilinear")``);
* ``gate resampling by weighted neighbours``: the same network and weights, each gate's 2x bilinear resampling
  written as the weighted sum of neighbouring coefficients (0.25 / 0.75, edges clamped) in ``keras.ops``: the
  same function (largest output difference printed), with no resize kernel and no resize gradient;
* ``no gates (upper bound)``: our U-Net with the same encoder and decoder and no attention gates: a different
  network, listed as the upper bound of what any rewrite of the gates could gain;
* ``batch 4`` and ``batch 16`` of the model as built (img/s, so comparable with batch 8).

Thread and oneDNN settings are process-wide: run the script again with e.g. ``TF_ENABLE_ONEDNN_OPTS=0`` and
compare its ``as built`` row.

Usage: ``python benchmarks/bench_levers.py [--size 128 --batch 8 --steps 4 --rounds 3]``.
"""

from __future__ import annotations

import argparse
import os

import keras
import numpy as np
import pandas as pd
from keras import layers, ops
from timing import images_per_second, rotated

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.environment import machine_description
from metaseg_tf.models import build_model

FILTERS = (16, 32, 64, 128, 256)


class NeighbourBilinear2x(layers.Layer):
    """2x bilinear up-sampling (half-pixel centres, edges clamped, as ``UpSampling2D(interpolation="bilinear")``)
    as weighted neighbours: ``out[2i] = 0.25 a[i-1] + 0.75 a[i]``, ``out[2i+1] = 0.75 a[i] + 0.25 a[i+1]`` along
    each axis. ``(B, H, W, C)`` -> ``(B, 2H, 2W, C)``."""

    @staticmethod
    def _along(a, axis: int):
        size = a.shape[axis]
        before = ops.concatenate([ops.take(a, [0], axis=axis), ops.take(a, list(range(size - 1)), axis=axis)], axis)
        after = ops.concatenate([ops.take(a, list(range(1, size)), axis=axis), ops.take(a, [size - 1], axis=axis)], axis)
        even, odd = 0.25 * before + 0.75 * a, 0.75 * a + 0.25 * after
        shape = list(ops.shape(a))
        shape[axis] = 2 * size
        return ops.reshape(ops.stack([even, odd], axis=axis + 1), shape)

    def call(self, inputs):
        return self._along(self._along(inputs, 1), 2)


def _with_neighbour_resampling(model: keras.Model) -> keras.Model:
    def clone(layer: layers.Layer) -> layers.Layer:
        if isinstance(layer, layers.UpSampling2D):
            return NeighbourBilinear2x(name=layer.name)
        return layer.__class__.from_config(layer.get_config())

    clone_ = keras.models.clone_model(model, clone_function=clone)
    clone_.set_weights(model.get_weights())
    return clone_


def _compiled(model: keras.Model) -> keras.Model:
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy")
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    def build(architecture: str) -> keras.Model:
        keras.utils.set_random_seed(0)
        return build_model(architecture, ExperimentConfig(image_size=args.size, filters=FILTERS, model=architecture,
                                                          deep_supervision=False))

    rng = np.random.default_rng(0)
    data = {batch: (rng.normal(size=(batch, args.size, args.size, 3)).astype(np.float32),
                    (rng.random((batch, args.size, args.size, 1)) < 0.1).astype(np.float32)) for batch in (4, 8, 16)}
    built = build("attention_unet")
    rewritten = _with_neighbour_resampling(built)
    x = data[args.batch][0]
    difference = float(np.abs(ops.convert_to_numpy(built.predict_on_batch(x))
                              - ops.convert_to_numpy(rewritten.predict_on_batch(x))).max())
    rows = {"as built": (_compiled(built), args.batch),
            "gate resampling by weighted neighbours": (_compiled(rewritten), args.batch),
            "no gates (upper bound: a different network)": (_compiled(build("unet")), args.batch),
            "batch 4": (_compiled(build("attention_unet")), 4), "batch 16": (_compiled(build("attention_unet")), 16)}
    steps = {}
    for label, (model, batch) in rows.items():
        images, masks = data[batch]
        steps[label] = (lambda m=model, i=images, t=masks: m.train_on_batch(i, t),
                        lambda m=model, i=images: m.predict_on_batch(i), batch)
        for _ in range(2):  # warm-up: tracing and kernel selection
            steps[label][0]()
            steps[label][1]()
    rates = {label: ([], []) for label in rows}
    labels = list(rows)
    for round_index in range(args.rounds):
        for label in rotated(labels, round_index, args.rounds):
            train, infer, batch = steps[label]
            rates[label][0].append(images_per_second(train, args.steps, batch))
            rates[label][1].append(images_per_second(infer, args.steps, batch))
    base_train, base_infer = (np.median(values) for values in rates["as built"])
    table = pd.DataFrame([{"lever": label,
                           "train img/s": f"{np.median(train):.1f} ({min(train):.1f}-{max(train):.1f})",
                           "vs as built": f"{np.median(train) / base_train:.2f}",
                           "infer img/s": f"{np.median(infer):.1f} ({min(infer):.1f}-{max(infer):.1f})",
                           "vs as built ": f"{np.median(infer) / base_infer:.2f}"}
                          for label, (train, infer) in rates.items()])
    print(f"machine: {machine_description()}; backend {keras.backend.backend()}, TF_ENABLE_ONEDNN_OPTS="
          f"{os.environ.get('TF_ENABLE_ONEDNN_OPTS', 'default')}; {args.size} px, batch {args.batch}, "
          f"{args.rounds} rounds of {args.steps} steps (median, min-max)")
    print(f"largest output difference, gate resampling by weighted neighbours vs as built: {difference:.1e}")
    print(table.to_markdown(index=False))


if __name__ == "__main__":
    main()
