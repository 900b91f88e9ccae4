"""Benchmark: our U-Net++ and Attention U-Net against faithful peers, training and inference, in one run.

Every model gets the same input (128 x 128 x 3, channels last for Keras, channels first for PyTorch), filters
16-256 over five levels (``--filters``: the LGG recipe's are 8-128), batch norm + ReLU, transposed-convolution
up-sampling, one sigmoid output, batch 8, Adam (lr 1e-3) and binary cross-entropy, on this machine's CPU with the same number of threads (PyTorch's
``set_num_threads`` = the CPU count, TensorFlow's default pools = the CPU count):

* ours: ``metaseg_tf.models.build_model`` (Keras 3, the configured backend, ``jit_compile="auto"``), in float32;
  levers measured as extra rows: XLA on (``jit_compile=True``), bf16 mixed precision (``mixed_bfloat16``),
  and for inference the ONNX Runtime and OpenVINO (float32) engines of :mod:`metaseg_tf.inference.engines` on
  exports made by Keras 3's ``model.export``, and the OpenVINO export quantised to int8 by NNCF (every operation
  it can, calibrated on the benchmark batch: the speed an accuracy-controlled ``--precision int8`` export
  approaches from below);
* MONAI (PyTorch): ``BasicUNetPlusPlus`` (features 16-256, up-sampling 16, ``upsample="deconv"``, no deep
  supervision) and ``AttentionUnet`` (channels 16-256, strides 2): faithful U-Net++ and Attention U-Net; each
  also under ``torch.autocast("cpu", torch.bfloat16)`` (training and inference: the peer of our bf16 rows) and
  exported with ``torch.onnx.export`` to ONNX Runtime (run by the same :class:`OnnxEngine` as ours: the peer of
  our engine rows), and that export quantised by ONNX Runtime's ``quantize_static`` (QDQ, int8 weights and
  activations, calibrated on the benchmark batch: the peer of our int8 row);
* keras-unet-collection: ``att_unet_2d`` (additive attention, batch norm, max pooling, transposed
  convolutions), and ``unet_plus_2d`` only for the record: it passes ``concat=False`` to every decoder call
  and so drops U-Net++'s skip connections; it is never a ratio's reference.

Every row also gives the network's convolution GFLOPs per image, counted alike for both frameworks (2 per
multiply-add of every convolution, from the layer shapes: :func:`~metaseg_tf.evaluation.complexity.convolution_flops`
for Keras, ``torch.utils.flop_counter.FlopCounterMode`` for PyTorch), and the ratios also per FLOP, since
"faithful" peers need not do the same work (MONAI's ``AttentionUnet`` has one convolution per decoder stage
where Oktay et al.'s, ours and keras-unet-collection's have two). ``--flops-only`` prints the counts alone,
without timing (they do not depend on the load of the machine).

``--rounds`` rounds; in each every model runs ``--steps`` training steps and ``--steps`` inference batches
(after warm-up steps in round 0: compilation excluded), the order rotating every round so machine drift
cancels. Printed: img/s (median and min-max over rounds) per row, and per architecture the ratio ours /
best faithful peer *of the same precision class* (float32: eager or exported to a runtime; bf16: Keras
``mixed_bfloat16`` against ``torch.autocast``; int8: OpenVINO + NNCF against ONNX Runtime's static
quantisation), computed per round, as median (min-max). The bf16 rows are
measured where the CPU computes bf16 natively (AVX512-BF16 or AMX; ``--bf16 on`` measures them anyway: both
frameworks then emulate it, far slower than float32). Optional peers that
are not installed are listed with the reason: ``pip install torch==2.13.0 monai onnxscript keras-unet-collection``.

Usage: ``python benchmarks/bench_models.py [--size 128 --batch 8 --steps 5 --rounds 3 --filters 16 32 64 128 256]
[--flops-only]``.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import keras
import numpy as np
import pandas as pd
from timing import images_per_second

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.environment import cpu_has_bf16, machine_description
from metaseg_tf.evaluation.complexity import convolution_flops
from metaseg_tf.inference.engines import OnnxEngine, OpenVinoEngine
from metaseg_tf.models import build_model

FILTERS = (16, 32, 64, 128, 256)
BF16_SKIPPED = "no AVX512-BF16 / AMX: bf16 emulated (--bf16 on)"
FAITHFUL_PEERS = {"nested_unet": ("MONAI BasicUNetPlusPlus",),
                  "attention_unet": ("MONAI AttentionUnet", "keras-unet-collection att_unet_2d")}


@dataclass
class Candidate:
    """One row: a train step and an inference step on fixed data, or the reason it cannot be measured."""

    name: str
    architecture: str
    train: Callable[[], object] | None = None
    infer: Callable[[], object] | None = None
    skipped: str = ""
    precision: str = "float32"  # the class a ratio compares within: float32, bf16 or int8
    conv_flops: int | None = None  # per image, counted alike for Keras and PyTorch (module docstring)


def _data(size: int, batch: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, size, size, 3)).astype(np.float32)
    y = (rng.random((batch, size, size, 1)) < 0.1).astype(np.float32)
    return x, y


def _keras_candidate(name: str, architecture: str, model: keras.Model, x: np.ndarray, y: np.ndarray,
                     jit_compile: bool | str = "auto", precision: str = "float32") -> Candidate:
    targets = y if len(model.outputs) == 1 else [y] * len(model.outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="binary_crossentropy", jit_compile=jit_compile)
    return Candidate(name, architecture, lambda: model.train_on_batch(x, targets),
                     lambda: keras.tree.map_structure(np.asarray, model.predict_on_batch(x)), precision=precision,
                     conv_flops=convolution_flops(model))


def _ours(size: int, x: np.ndarray, y: np.ndarray, export_root: Path, bf16: bool,
          filters: tuple[int, ...] = FILTERS) -> list[Candidate]:
    candidates = []
    for architecture in ("nested_unet", "attention_unet"):
        config = ExperimentConfig(image_size=size, filters=filters, model=architecture, deep_supervision=False)
        keras.utils.set_random_seed(0)
        model = build_model(architecture, config)
        candidates.append(_keras_candidate(f"ours {architecture}", architecture, model, x, y))
        flops = candidates[-1].conv_flops  # the exported engines run this same network
        keras.utils.set_random_seed(0)
        candidates.append(_keras_candidate(f"ours {architecture}, XLA", architecture,
                                           build_model(architecture, config), x, y, jit_compile=True))
        if bf16:
            keras.mixed_precision.set_global_policy("mixed_bfloat16")
            try:
                keras.utils.set_random_seed(0)
                candidates.append(_keras_candidate(f"ours {architecture}, bf16", architecture,
                                                   build_model(architecture, config), x, y, precision="bf16"))
            finally:
                keras.mixed_precision.set_global_policy("float32")
        else:
            candidates.append(Candidate(f"ours {architecture}, bf16", architecture, skipped=BF16_SKIPPED,
                                        precision="bf16"))
        model.predict_on_batch(x)  # traced before export
        for engine, kind, file in (("onnx", "onnx", "model.onnx"), ("openvino f32", "openvino", "model.xml")):
            path = export_root / f"{architecture}-{kind}" / file
            path.parent.mkdir(parents=True)
            if keras.backend.backend() != "tensorflow":  # the JAX graph exports neither format (jax2onnx, XlaCallModule)
                candidates.append(Candidate(f"ours {architecture}, {engine} engine", architecture,
                                            skipped="exported from the TensorFlow backend: see its run"))
                continue
            model.export(str(path), format=kind, verbose=False)
            runner = OnnxEngine(path) if kind == "onnx" else OpenVinoEngine(path)
            candidates.append(Candidate(f"ours {architecture}, {engine} engine", architecture,
                                        infer=lambda runner=runner: runner.predict(x), conv_flops=flops))
            if kind == "openvino":
                candidates.append(_openvino_int8(architecture, path, x, flops))
    return candidates


def _openvino_int8(architecture: str, path: Path, x: np.ndarray, flops: int) -> Candidate:
    """Our OpenVINO IR quantised by NNCF (every operation it can, calibrated on the benchmark batch: a speed row,
    the upper bound of an accuracy-controlled export's) in our :class:`OpenVinoEngine`."""
    name = f"ours {architecture}, openvino int8 engine"
    try:
        import nncf
        import openvino
    except ImportError as error:
        return Candidate(name, architecture, skipped=f"not installed ({error.name})", precision="int8")
    calibration = nncf.Dataset([x[k : k + 1] for k in range(len(x))])
    quantised = nncf.quantize(openvino.Core().read_model(str(path)), calibration, subset_size=len(x),
                              fast_bias_correction=False)
    out = path.with_name("model-int8.xml")
    openvino.save_model(quantised, str(out), compress_to_fp16=False)
    runner = OpenVinoEngine(out)
    return Candidate(name, architecture, infer=lambda: runner.predict(x), precision="int8", conv_flops=flops)


def _monai(size: int, x: np.ndarray, y: np.ndarray, export_root: Path, bf16: bool,
           filters: tuple[int, ...] = FILTERS) -> list[Candidate]:
    try:
        import torch
        from monai.networks.nets import AttentionUnet, BasicUNetPlusPlus
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError as error:
        return [Candidate(f"MONAI {name}", architecture, skipped=f"not installed ({error.name})")
                for name, architecture in (("BasicUNetPlusPlus", "nested_unet"), ("AttentionUnet", "attention_unet"))]
    torch.set_num_threads(os.cpu_count() or 1)
    torch.manual_seed(0)
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
    yt = torch.from_numpy(np.ascontiguousarray(y.transpose(0, 3, 1, 2)))
    networks = {
        "BasicUNetPlusPlus": ("nested_unet", BasicUNetPlusPlus(
            spatial_dims=2, in_channels=3, out_channels=1, features=(*filters, filters[0]), deep_supervision=False,
            act="relu", norm="batch", upsample="deconv")),
        "AttentionUnet": ("attention_unet", AttentionUnet(
            spatial_dims=2, in_channels=3, out_channels=1, channels=filters, strides=(2,) * (len(filters) - 1))),
    }
    candidates = []
    for name, (architecture, network) in networks.items():
        optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
        loss = torch.nn.BCEWithLogitsLoss()  # the sigmoid inside the loss, as PyTorch users write it
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            network.eval()(xt[:1])
        flops = int(counter.get_total_flops())

        def output(network=network):
            result = network(xt)
            return result[-1] if isinstance(result, (list, tuple)) else result

        def train(network=network, optimizer=optimizer, loss=loss, output=output) -> None:
            network.train()
            optimizer.zero_grad()
            loss(output(), yt).backward()
            optimizer.step()

        def infer(network=network, output=output) -> np.ndarray:
            network.eval()
            with torch.inference_mode():
                return torch.sigmoid(output()).numpy()

        def train_bf16(train=train) -> None:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                train()

        def infer_bf16(network=network, output=output) -> np.ndarray:
            network.eval()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                return torch.sigmoid(output()).float().numpy()

        candidates.append(Candidate(f"MONAI {name}", architecture, train, infer, conv_flops=flops))
        candidates.append(Candidate(f"MONAI {name}, autocast bf16", architecture, train_bf16, infer_bf16,
                                    precision="bf16", conv_flops=flops) if bf16 else
                          Candidate(f"MONAI {name}, autocast bf16", architecture, skipped=BF16_SKIPPED, precision="bf16"))
        candidates.extend(_monai_onnx(name, architecture, network, xt, export_root, flops))
    return candidates


def _monai_onnx(name: str, architecture: str, network, xt, export_root: Path, flops: int) -> list[Candidate]:
    """The MONAI network exported by ``torch.onnx.export`` (sigmoid included), run by our :class:`OnnxEngine`,
    and that export quantised to int8 by ONNX Runtime's static quantisation (QDQ, calibrated on the benchmark
    batch): the peers of our engine rows."""
    import torch

    class Probabilities(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.network = network

        def forward(self, images):
            result = self.network(images)
            return torch.sigmoid(result[-1] if isinstance(result, (list, tuple)) else result)

    path = export_root / f"monai-{name}" / "model.onnx"
    path.parent.mkdir(parents=True)
    try:
        torch.onnx.export(Probabilities().eval(), (xt,), str(path), input_names=["images"], output_names=["mask"])
    except Exception as error:  # an exporter that cannot trace the network is a row with its reason
        return [Candidate(f"MONAI {name}, onnx runtime", architecture, skipped=f"export failed ({error})"[:120])]
    runner, images = OnnxEngine(path), xt.numpy()
    rows = [Candidate(f"MONAI {name}, onnx runtime", architecture, infer=lambda: runner.predict(images),
                      conv_flops=flops)]
    from onnxruntime.quantization import CalibrationDataReader, quantize_static

    class Batch(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter([{"images": images}])  # the export's batch is fixed: one calibration batch

        def get_next(self):
            return next(self.items, None)

    quantised = path.with_name("model-int8.onnx")
    quantize_static(str(path), str(quantised), Batch())
    int8 = OnnxEngine(quantised)
    return rows + [Candidate(f"MONAI {name}, onnx runtime int8", architecture, infer=lambda: int8.predict(images),
                             precision="int8", conv_flops=flops)]


def _keras_unet_collection(size: int, x: np.ndarray, y: np.ndarray,
                           filters: tuple[int, ...] = FILTERS) -> list[Candidate]:
    try:
        from keras_unet_collection import models
    except ImportError as error:
        return [Candidate("keras-unet-collection att_unet_2d", "attention_unet", skipped=f"not installed ({error.name})")]
    options = dict(filter_num=list(filters), n_labels=1, stack_num_down=2, stack_num_up=2, activation="ReLU",
                   output_activation="Sigmoid", batch_norm=True, pool="max", unpool=False)
    keras.utils.set_random_seed(0)
    attention = models.att_unet_2d((size, size, 3), atten_activation="ReLU", attention="add", **options)
    keras.utils.set_random_seed(0)
    plus = models.unet_plus_2d((size, size, 3), deep_supervision=False, **options)
    return [_keras_candidate("keras-unet-collection att_unet_2d", "attention_unet", attention, x, y),
            _keras_candidate("keras-unet-collection unet_plus_2d (no skip connections: not U-Net++)", "record",
                             plus, x, y)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5, help="timed steps per model, per round and mode")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--filters", type=int, nargs=5, default=FILTERS, help="filters of the five levels")
    parser.add_argument("--bf16", choices=("auto", "on", "off"), default="auto",
                        help="the bf16 rows: auto measures them where the CPU has AVX512-BF16 or AMX")
    parser.add_argument("--flops-only", action="store_true", help="count each row's convolution GFLOPs, time nothing")
    args = parser.parse_args()
    bf16 = args.bf16 == "on" or (args.bf16 == "auto" and cpu_has_bf16())
    x, y = _data(args.size, args.batch)
    with tempfile.TemporaryDirectory() as temporary:
        filters = tuple(args.filters)
        candidates = (_ours(args.size, x, y, Path(temporary), bf16, filters)
                      + _monai(args.size, x, y, Path(temporary), bf16, filters)
                      + _keras_unet_collection(args.size, x, y, filters))
        measured = [c for c in candidates if not c.skipped] if not args.flops_only else []
        for candidate in measured:  # warm-up: graph tracing, XLA compilation, kernel selection
            for step in (candidate.train, candidate.infer):
                if step is not None:
                    step(), step()
        rates = {(c.name, mode): [] for c in measured for mode in ("train", "infer")}
        for round_index in range(args.rounds if measured else 0):
            shift = round_index % len(measured)
            for candidate in measured[shift:] + measured[:shift]:
                for mode, step in (("train", candidate.train), ("infer", candidate.infer)):
                    if step is not None:
                        rates[(candidate.name, mode)].append(images_per_second(step, args.steps, args.batch))
    rows = []
    for candidate in candidates:
        row = {"model": candidate.name, "precision": candidate.precision,
               "conv GFLOPs / image": f"{candidate.conv_flops / 1e9:.2f}" if candidate.conv_flops else
               (candidate.skipped if args.flops_only else "") or "-"}
        for mode in ("train", "infer") if not args.flops_only else ():
            values = rates.get((candidate.name, mode), [])
            row[f"{mode} img/s"] = (f"{np.median(values):.1f} ({min(values):.1f}-{max(values):.1f})" if values
                                    else candidate.skipped or "-")
        rows.append(row)
    ratios = []
    for candidate in (c for c in measured if c.name.startswith("ours")):
        peers = [c for c in measured if c.name.split(",")[0] in FAITHFUL_PEERS[candidate.architecture]
                 and c.precision == candidate.precision]
        for mode in ("train", "infer"):
            ours = rates[(candidate.name, mode)]
            timed = [peer for peer in peers if rates[(peer.name, mode)]]
            if not ours or not timed:
                continue
            per_round = [value / max(rates[(peer.name, mode)][k] for peer in timed) for k, value in enumerate(ours)]
            best = max(timed, key=lambda peer: np.median(rates[(peer.name, mode)]))
            # per FLOP: convolution GFLOP/s against those of the same (fastest) peer, round by round
            per_flop = [value * candidate.conv_flops / (rates[(best.name, mode)][k] * best.conv_flops)
                        for k, value in enumerate(ours)]
            ratios.append({"ours": candidate.name, "mode": mode, "precision": candidate.precision,
                           "best faithful peer": best.name,
                           "ratio median (min-max)": f"{np.median(per_round):.2f} ({min(per_round):.2f}-"
                                                     f"{max(per_round):.2f})",
                           "per conv FLOP": f"{np.median(per_flop):.2f} ({min(per_flop):.2f}-{max(per_flop):.2f})"})
    print(f"machine: {machine_description()}; Keras {keras.__version__} on {keras.backend.backend()}; input "
          f"{args.size}x{args.size}x3, filters {tuple(args.filters)}, "
          + ("convolution FLOPs counted, nothing timed" if args.flops_only else
             f"batch {args.batch}, {args.rounds} rounds x {args.steps} steps"))
    print(pd.DataFrame(rows).to_markdown(index=False))
    if not args.flops_only:
        print()
        print(pd.DataFrame(ratios).to_markdown(index=False))


if __name__ == "__main__":
    main()
