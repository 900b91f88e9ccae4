"""Benchmark: inference of our models in each engine, Keras against ONNX Runtime and OpenVINO, in one run.

Both architectures are built untrained at one configuration (128 x 128 x 3, filters 16-256, batch 8 by
default), exported with :func:`metaseg_tf.inference.export.export_run` through a throw-away run folder, and timed in
rounds that alternate the engines (the first engine of each round moves evenly through the list, so machine
drift cancels). Rows:
images/s as the median and min-max over rounds, the ratio to Keras, and the largest absolute probability
difference to Keras on the timed batch. OpenVINO runs in float32 (the trained model) and, for reference,
in bf16 (``INFERENCE_PRECISION_HINT=bf16``: faster on CPUs with AVX512-BF16/AMX, not the same
probabilities).

Usage: ``python benchmarks/bench_engines.py [--size 128 --batch 8 --rounds 5 --steps 10]``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from timing import images_per_second, rotated

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.environment import machine_description
from metaseg_tf.inference.engines import KerasEngine, OnnxEngine, OpenVinoEngine
from metaseg_tf.inference.export import EXPORT_FILES, export_run
from metaseg_tf.models import build_model

FILTERS = (16, 32, 64, 128, 256)


def _run_folder(root: Path, name: str, size: int) -> Path:
    """A run folder holding an untrained model of ``name`` (what ``export_run`` reads)."""
    config = ExperimentConfig(image_size=size, filters=FILTERS, model=name)
    run = root / name
    run.mkdir(parents=True)
    build_model(name, config).save(run / "best.keras")
    config.save(run / "config.json")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as temporary:
        for name in ("nested_unet", "attention_unet"):
            run = _run_folder(Path(temporary), name, args.size)
            onnx_dir, openvino_dir = export_run(run, "onnx"), export_run(run, "openvino")
            import keras

            model = keras.saving.load_model(run / "best.keras", compile=False)
            engines = {"keras": KerasEngine(model), "onnx": OnnxEngine(onnx_dir / EXPORT_FILES["onnx"]),
                       "openvino f32": OpenVinoEngine(openvino_dir / EXPORT_FILES["openvino"]),
                       "openvino bf16": OpenVinoEngine(openvino_dir / EXPORT_FILES["openvino"], precision="bf16")}
            batch = np.random.default_rng(0).normal(size=(args.batch, args.size, args.size, 3)).astype(np.float32)
            reference = engines["keras"].predict(batch)
            for engine in engines.values():  # warm-up (graph compilation, kernel selection)
                engine.predict(batch)
            rates: dict[str, list[float]] = {label: [] for label in engines}
            labels = list(engines)
            for round_index in range(args.rounds):
                for label in rotated(labels, round_index, args.rounds):
                    rates[label].append(images_per_second(lambda e=engines[label]: e.predict(batch), args.steps,
                                                          len(batch)))
            keras_median = float(np.median(rates["keras"]))
            for label, values in rates.items():
                difference = float(np.abs(engines[label].predict(batch) - reference).max())
                rows.append({"model": name, "engine": label,
                             "img/s median (min-max)": f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})",
                             "vs keras": f"{np.median(values) / keras_median:.2f}",
                             "max |p - p_keras|": f"{difference:.1e}"})
    print(f"machine: {machine_description()}; "
          f"{args.size}x{args.size}x3, batch {args.batch}, {args.rounds} rounds of {args.steps} batches")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
