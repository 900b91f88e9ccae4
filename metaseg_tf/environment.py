"""What a run ran on: library versions, Keras backend and device (recorded in every run folder); the CPU's
features (read without importing Keras, so that the pipeline can choose settings before its notebooks start)."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import sys
from pathlib import Path


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator() -> str:
    """``"gpu"`` when the active Keras backend sees a GPU, else ``"cpu"``."""
    import keras

    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return "gpu" if jax.default_backend() in ("gpu", "cuda", "rocm") else "cpu"
    if backend == "tensorflow":
        import tensorflow as tf

        return "gpu" if tf.config.list_physical_devices("GPU") else "cpu"
    if backend == "torch":
        import torch

        return "gpu" if torch.cuda.is_available() else "cpu"
    return "cpu"


def cpu_flags() -> set[str]:
    """The CPU's feature flags (``/proc/cpuinfo``; empty where it does not exist)."""
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.is_file():
        return set()
    line = next((line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")), "")
    return set(line.split(":", 1)[1].split()) if ":" in line else set()


def cpu_has_bf16() -> bool:
    """Whether the CPU computes bfloat16 natively (AVX512-BF16 or AMX-BF16), where ``mixed_bfloat16`` pays."""
    return bool({"avx512_bf16", "amx_bf16"} & cpu_flags())


def cpu_prefers_xla() -> bool:
    """Whether TensorFlow trains faster with XLA on this CPU: an x86 CPU with AVX2 and without AVX512. On the
    2-core AMD EPYC (AVX2) XLA doubled the LGG recipe's training in ``model.fit`` at 64 and 128 px
    (``benchmarks/bench_fit.py``, results/benchmarks.md); on an Intel Xeon with AVX512 and AMX bare XLA train
    steps ran 24-30 % slower, so there (and where the flags are unknown) Keras' rule, no XLA on a CPU, stays."""
    flags = cpu_flags()
    return "avx2" in flags and "avx512f" not in flags


def cpu_model() -> str:
    """The CPU's model name: from ``/proc/cpuinfo`` where ``platform.processor()`` says nothing (Linux)."""
    model = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if not model and cpuinfo.is_file():
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                      if line.startswith("model name")), "")
    return model or "unknown CPU"


def machine_description() -> str:
    """``"<n> CPUs, <CPU model>, <system> <architecture>"`` for the header of a benchmark's table or a
    report."""
    return f"{os.cpu_count()} CPUs, {cpu_model()}, {platform.system()} {platform.machine()}"


def environment_info() -> dict[str, object]:
    """Versions, backend, device, CPU model and count, and the settings that change float results between
    machines (oneDNN's reordered kernels in TensorFlow), as a JSON-serialisable dict."""
    import keras

    packages = ("keras", "tensorflow", "jax", "jaxlib", "torch", "numpy", "opencv-python-headless",
                "scikit-image", "scipy", "metaseg-tf")
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "cpu_model": cpu_model(),
        "tf_enable_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
        "keras_backend": keras.backend.backend(),
        "device": accelerator(),
        "cpu_bf16": cpu_has_bf16(),
        "cpu_prefers_xla": cpu_prefers_xla(),
        "packages": {name: version for name in packages if (version := _version(name))},
    }
