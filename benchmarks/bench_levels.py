"""Benchmark: U-Net++ pruned to each level as a served choice, accuracy against speed per inference engine.

A trained U-Net++ with deep supervision can be served pruned to level L (Zhou et al. 2019, "UNet++:
Redesigning Skip Connections...", IEEE TMI, section III-C): the sub-network up to head L, with the trained
weights and nothing retrained (``metaseg predict/serve/export --level L``). For each level of RUN this prints
the per-patient and global Dice on the run's recorded ``--split`` (at the model's input resolution, the run's
threshold; :func:`metaseg_tf.evaluation.report.prune_level_scores`), parameters and GFLOPs per image, and
images/s of a batch in each engine (Keras, ONNX Runtime, OpenVINO f32), timed in rounds that rotate the order
of levels and engines so that machine drift cancels.

Usage: ``python benchmarks/bench_levels.py RUN [--split test --batch 8 --rounds 3 --steps 10]``.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd
from timing import images_per_second, rotated

from metaseg_tf.environment import machine_description
from metaseg_tf.evaluation.studies import prune_level_scores
from metaseg_tf.inference.export import load_engine
from metaseg_tf.inference.loading import load_model
from metaseg_tf.models.nested_unet import head_names
from metaseg_tf.runs.folders import load_run_config

ENGINES = ("keras", "onnx", "openvino")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a trained U-Net++ run folder (deep supervision)")
    parser.add_argument("--split", default="test", choices=("val", "test"))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=10)
    args = parser.parse_args()

    config = load_run_config(args.run)
    depth = len(head_names(load_model(args.run)))
    scores = prune_level_scores(args.run, split=args.split).set_index("label")
    levels = list(range(1, depth + 1))
    engines = {(level, name): load_engine(args.run, name, level=level) for level in levels for name in ENGINES}
    batch = np.random.default_rng(0).normal(
        size=(args.batch, config.image_size, config.image_size, config.input_channels)).astype(np.float32)
    for engine in engines.values():  # warm-up: graph compilation, kernel selection
        engine.predict(batch)
    keys = list(engines)
    rates: dict[tuple[int, str], list[float]] = {key: [] for key in keys}
    for round_index in range(args.rounds):
        for key in rotated(keys, round_index, args.rounds):
            rates[key].append(images_per_second(lambda e=engines[key]: e.predict(batch), args.steps, len(batch)))
    whole = float(np.median(rates[(depth, "keras")]))
    rows = []
    for level in levels:
        row = scores.loc[f"L{level}"]
        rows.append({"level": f"L{level}" + (" (whole network)" if level == depth else ""),
                     f"{args.split} per-patient Dice": f"{row['patient_dice']:.3f}",
                     "global Dice": f"{row['global_dice']:.3f}", "params M": f"{row['parameters'] / 1e6:.2f}",
                     "GFLOPs / image": f"{row['gflops_per_image']:.2f}",
                     **{f"{name} img/s": f"{np.median(rates[(level, name)]):.0f}" for name in ENGINES},
                     "keras vs whole": f"{np.median(rates[(level, 'keras')]) / whole:.2f}x"})
    print(f"run {args.run.name}: {config.image_size} px, filters {list(config.filters)}; machine: "
          f"{machine_description()}; batch {args.batch}, {args.rounds} rounds of {args.steps} batches (median)")
    print(pd.DataFrame(rows).to_markdown(index=False))


if __name__ == "__main__":
    main()
