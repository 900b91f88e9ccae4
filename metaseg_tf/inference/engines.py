"""Inference engines: the same trained network run by Keras, ONNX Runtime or OpenVINO.

An engine maps a normalised batch ``float32 (B, S, S, input_channels)`` to the probabilities of the model's
last output ``float32 (B, S, S, regions)`` (for U-Net++ with deep supervision the deepest head, the one its
validation Dice was monitored on). :class:`~metaseg_tf.inference.predictor.Predictor` does the preprocessing,
the thresholding and the resizing around it, so every engine gives masks on the run's own terms.

* ``keras``: the run's ``.keras`` model, ``predict_on_batch`` under the configured backend.
* ``onnx``: an ONNX export (:mod:`metaseg_tf.inference.export`) in ONNX Runtime on the CPU execution provider.

ONNX Runtime and OpenVINO each take every core for one model by default; ``threads`` bounds that, so a
server holding several models (or an ensemble) does not run more threads than the machine has cores.
* ``openvino``: an OpenVINO IR export compiled for the CPU with ``INFERENCE_PRECISION_HINT=f32``. OpenVINO
  otherwise runs in bf16 on CPUs that have it (this one does), which is faster but moves probabilities by a
  few hundredths: a different model, not the trained one. ``precision="bf16"`` asks for it explicitly.

:func:`flip_averaged` is the one test-time augmentation (horizontal flip) over any engine's ``predict``; the
Predictor and int8 accuracy control (:mod:`metaseg_tf.inference.quantise`) both use it.

The runtimes only: which export a run's engine uses is :func:`~metaseg_tf.inference.export.load_engine`'s
business, so this module imports nothing of ours but the error type users see (:class:`ConfigError`: a missing
runtime is a configuration problem).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Protocol

import numpy as np

from metaseg_tf.config import ConfigError

# openvino-int8 / openvino-bf16: the run's OpenVINO export quantised to int8 (NNCF) or run in bf16
# (metaseg_tf.inference.export); the runtime is the same OpenVinoEngine
ENGINES = ("keras", "onnx", "openvino", "openvino-int8", "openvino-bf16")


def _runtime(package: str, engine: str):
    """The engine's runtime package, or a :class:`ConfigError` that names it."""
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(f"the {engine} engine needs the package {package}: pip install {package}") from None


class Engine(Protocol):
    name: str
    concurrent: bool  # may be called from several threads at once (and runs without holding the GIL)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        """Normalised ``float32 (B, S, S, C)`` -> probabilities ``float32 (B, S, S, R)``."""


class KerasEngine:
    """The Keras model itself; its last output is read."""

    name = "keras"
    concurrent = False  # one call at a time: a backend's model state is not documented as thread-safe

    def __init__(self, model) -> None:
        self.model = model

    def predict(self, batch: np.ndarray) -> np.ndarray:
        import keras

        output = self.model.predict_on_batch(batch)
        output = output[-1] if isinstance(output, (list, tuple)) else output
        return np.asarray(keras.ops.convert_to_numpy(output), np.float32)


class OnnxEngine:
    """An exported ``model.onnx`` in ONNX Runtime (CPU)."""

    name = "onnx"
    concurrent = True  # InferenceSession.run is thread-safe and releases the GIL

    def __init__(self, path: Path | str, threads: int | None = None) -> None:
        onnxruntime = _runtime("onnxruntime", "onnx")
        options = onnxruntime.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        self.threads = threads
        self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def predict(self, batch: np.ndarray) -> np.ndarray:
        return np.asarray(self.session.run(None, {self.input_name: np.ascontiguousarray(batch, np.float32)})[0],
                          np.float32)


class OpenVinoEngine:
    """An exported OpenVINO IR ``model.xml`` compiled for the CPU, in float32 unless ``precision`` says bf16."""

    name = "openvino"
    concurrent = True  # one infer request per call; inference releases the GIL

    def __init__(self, path: Path | str, precision: str = "f32", threads: int | None = None) -> None:
        openvino = _runtime("openvino", "openvino")
        properties = {"INFERENCE_PRECISION_HINT": precision, **({"INFERENCE_NUM_THREADS": threads} if threads else {})}
        self.threads = threads
        self.compiled = openvino.Core().compile_model(str(path), "CPU", properties)
        self.output = self.compiled.output(0)

    def predict(self, batch: np.ndarray) -> np.ndarray:
        request = self.compiled.create_infer_request()
        return np.asarray(request.infer(np.ascontiguousarray(batch, np.float32))[self.output], np.float32)


def flip_averaged(predict: Callable[[np.ndarray], np.ndarray], batch: np.ndarray, flip_tta: bool = True) -> np.ndarray:
    """``predict(batch)`` for a batch ``(B, S, S, C)``; with ``flip_tta`` its mean with the prediction of the
    horizontally flipped batch, flipped back (test-time augmentation), ``(B, S, S, R)``."""
    probabilities = predict(batch)
    if not flip_tta:
        return probabilities
    flipped = predict(np.ascontiguousarray(batch[:, :, ::-1]))
    return (probabilities + flipped[:, :, ::-1]) / 2
