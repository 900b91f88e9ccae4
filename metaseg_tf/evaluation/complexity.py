"""Model complexity, measured: parameter counts, FLOPs per image from the compiled graph, inference latency.

FLOPs are counted by the backend's own compiler, not estimated by hand: under JAX from XLA's cost
analysis of the jitted forward pass, under TensorFlow by the TF profiler over the frozen inference graph.
Both count a multiply-add as 2 FLOPs; XLA leaves out the multiplications with the zero padding of
"same" convolutions and the TF profiler does not, so TensorFlow's figures are a few percent higher
(1.58 vs 1.52 GFLOPs for Attention U-Net at 128 x 128 x 3). Under the PyTorch backend FLOPs are not measured (``None``).

To compare with a network of another framework, :func:`convolution_flops` counts the convolutions alone from
the layer shapes, as ``torch.utils.flop_counter.FlopCounterMode`` counts a PyTorch network: 2 FLOPs per
multiply-add, zero-padded taps included, no bias, normalisation or activation.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import keras
import numpy as np


@dataclass(frozen=True)
class Complexity:
    """Size and cost of one model for ``(1, H, W, C)`` inputs; latency for batches of ``batch_size``."""

    name: str
    parameters: int
    trainable_parameters: int
    flops_per_image: float | None
    batch_size: int
    latency_ms: float
    images_per_second: float

    def to_dict(self) -> dict:
        return asdict(self)


def _flops_jax(model: keras.Model, image: np.ndarray) -> float:
    import jax

    def forward(trainable, non_trainable, x):
        return model.stateless_call(trainable, non_trainable, x, training=False)[0]

    trainable = [v.value for v in model.trainable_variables]
    non_trainable = [v.value for v in model.non_trainable_variables]
    cost = jax.jit(forward).lower(trainable, non_trainable, image).compile().cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    return float(cost["flops"])


def _flops_tensorflow(model: keras.Model, image: np.ndarray) -> float:
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import (
        convert_variables_to_constants_v2_as_graph,
    )

    forward = tf.function(lambda x: model(x, training=False))
    concrete = forward.get_concrete_function(tf.TensorSpec(image.shape, tf.float32))
    frozen, _ = convert_variables_to_constants_v2_as_graph(concrete)
    builder = tf.compat.v1.profiler.ProfileOptionBuilder
    options = builder(builder.float_operation()).with_empty_output().build()
    level = tf.get_logger().level
    tf.get_logger().setLevel("ERROR")  # the v1 profiler warns that it is a v1 API
    try:
        profile = tf.compat.v1.profiler.profile(graph=frozen.graph, run_meta=tf.compat.v1.RunMetadata(),
                                                cmd="op", options=options)
    finally:
        tf.get_logger().setLevel(level)
    return float(profile.total_float_ops)


def count_flops(model: keras.Model) -> float | None:
    """FLOPs of one forward pass of one image (inference mode), from the backend's compiler."""
    image = np.zeros((1, *model.input_shape[1:]), np.float32)
    backend = keras.backend.backend()
    if backend == "jax":
        return _flops_jax(model, image)
    if backend == "tensorflow":
        return _flops_tensorflow(model, image)
    return None


def convolution_flops(model: keras.Model) -> int:
    """FLOPs of the convolutions of one forward pass of one image: ``2 H W k_h k_w C_in C_out / groups`` for
    every ``Conv2D`` (``H, W``: its output), the same over the *input* grid for every ``Conv2DTranspose``
    (each input pixel meets the whole kernel), as ``torch.utils.flop_counter`` counts ``conv2d`` and
    ``conv_transpose2d``; any backend, no compilation. Layers nested in sub-models are counted. Refused
    (``ValueError``) rather than miscounted: any other layer with a kernel (dense, depthwise, separable, 1D or
    3D convolutions: not counted here), a layer or sub-model called more than once (its grid is ambiguous),
    and unknown spatial sizes."""
    total = 0
    for layer in model._flatten_layers(include_self=False):
        if len(getattr(layer, "_inbound_nodes", ())) > 1:
            raise ValueError(f"{layer.name} is called {len(layer._inbound_nodes)} times: its FLOPs are ambiguous")
        transposed = isinstance(layer, keras.layers.Conv2DTranspose)
        if not (transposed or isinstance(layer, keras.layers.Conv2D)):
            if getattr(layer, "kernel", None) is not None:
                raise ValueError(f"{layer.name}: {type(layer).__name__} is not counted (only Conv2D and "
                                 "Conv2DTranspose)")
            continue
        shape = (layer.input if transposed else layer.output).shape
        grid = shape[2:4] if layer.data_format == "channels_first" else shape[1:3]
        if None in grid:
            raise ValueError(f"{layer.name}: spatial size {tuple(grid)} unknown; build the model for a fixed size")
        total += 2 * int(np.prod(grid)) * int(np.prod(layer.kernel.shape))  # (k_h, k_w, C_in / groups, C_out)
    return total


def measure_latency(model: keras.Model, batch_size: int = 1, repeats: int = 10, warmup: int = 2) -> float:
    """Median wall-clock milliseconds of ``predict_on_batch`` on a random batch, after ``warmup`` calls
    (compilation and first-call costs excluded)."""
    batch = np.random.default_rng(0).normal(size=(batch_size, *model.input_shape[1:])).astype(np.float32)
    for _ in range(warmup):
        keras.tree.map_structure(np.asarray, model.predict_on_batch(batch))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        keras.tree.map_structure(np.asarray, model.predict_on_batch(batch))
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000)


def model_complexity(model: keras.Model, batch_size: int = 1, repeats: int = 10, flops: bool = True) -> Complexity:
    """Parameters, FLOPs per image (``flops=False`` skips counting) and median inference latency."""
    latency = measure_latency(model, batch_size, repeats)
    return Complexity(
        name=model.name,
        parameters=int(model.count_params()),
        trainable_parameters=int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        flops_per_image=count_flops(model) if flops else None,
        batch_size=batch_size,
        latency_ms=latency,
        images_per_second=batch_size / latency * 1000,
    )
