"""Export a trained run for serving anywhere: ONNX, OpenVINO IR or a TensorFlow SavedModel.

:func:`export_run` writes a new folder ``<run>/export-<format>/`` (never over an earlier one; a U-Net++ pruned
to level ``K``, the served speed/accuracy choice of Zhou et al. 2019, section III-C: ``export-<format>-L<K>``)
holding

* the network, through Keras 3's own ``model.export``: ``model.onnx`` (tf2onnx under TensorFlow),
  ``model.xml`` + ``model.bin`` (OpenVINO IR) or ``saved_model/`` (TensorFlow SavedModel, ``serve``
  signature). Input ``float32 (batch, S, S, input_channels)`` normalised as the run's config says; output the
  model's last head (or the pruned U-Net++'s head ``K``), probabilities ``float32 (batch, S, S, regions)``;
* ``config.json`` and ``data.json``: the run's preprocessing (window, CLAHE, image size, normalisation,
  sequences, 2.5D context, threshold) and its label convention, so the export is usable without this package;
* ``export.json``: format, which model, the pruning level (``null``: the whole network) and the sha256 of its ``.keras`` file (an export of a model that a
  resumed training has since replaced is never used), Keras version and backend, shapes, and the largest
  absolute probability difference to Keras measured on a check batch (ONNX and OpenVINO, run by
  :mod:`metaseg_tf.inference.engines`).

**Precision** (OpenVINO only, ``--precision``): ``fp32`` (default); ``int8``, NNCF post-training quantisation
calibrated on the run's **training** patients, with accuracy control on its **validation** patients, never its
test patients (:mod:`metaseg_tf.inference.quantise`); ``bf16``, the float32 IR compiled with OpenVINO's
``INFERENCE_PRECISION_HINT`` bf16 (on a CPU without AVX512-BF16 or AMX the runtime computes in float32, and
``export.json`` records the precision it reports).
Their folders are ``export-openvino-int8`` / ``export-openvino-bf16``; reduced precision moves some boundary
pixels' probabilities by far more than :data:`MAX_DIFFERENCE`, so ``export.json`` records the largest and the
mean difference and the Dice between its masks and Keras' on training slices, and refuses one below
:data:`MIN_REDUCED_MASK_DICE` (a broken quantisation); their masks are scored like any engine's (``metaseg
evaluate RUN --engine openvino-int8``).

:func:`load_engine` gives a run's network as an engine: Keras, or its newest export of the engine's format,
precision and level, exported first if there is none.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import tempfile
from pathlib import Path

import numpy as np

from metaseg_tf.config import ConfigError
from metaseg_tf.evaluation.scores import overlap_scores
from metaseg_tf.inference.engines import ENGINES, Engine, KerasEngine, OnnxEngine, OpenVinoEngine
from metaseg_tf.inference.loading import inference_network, load_model
from metaseg_tf.inference.quantise import INT8_MAX_DROP, calibration_inputs, quantise_int8
from metaseg_tf.runs.folders import new_dir, read_json, run_model_path, write_json
from metaseg_tf.runs.records import chosen_threshold

logger = logging.getLogger(__name__)

EXPORT_FORMATS = ("onnx", "openvino", "saved_model")
EXPORT_FILES = {"onnx": "model.onnx", "openvino": "model.xml", "saved_model": "saved_model"}
_KERAS_FORMATS = {"onnx": "onnx", "openvino": "openvino", "saved_model": "tf_saved_model"}
CHECK_BATCH = 4  # images of the check batch that the export is compared to Keras on
MAX_DIFFERENCE = 1e-3  # largest probability difference to Keras an ONNX or OpenVINO export may have
MIN_REDUCED_MASK_DICE = 0.8  # an int8 / bf16 export whose masks agree less with Keras' (check slices) is broken
PRECISIONS = ("fp32", "int8", "bf16")


def read_export(export_dir: Path | str) -> dict:
    """An export folder's ``export.json``."""
    return read_json(Path(export_dir) / "export.json")


def stale_control_threshold(export_dir: Path | str, run_dir: Path | str, which: str = "best") -> float | None:
    """The threshold the run now predicts at, chosen on the validation patients (``threshold_from_validation``),
    where the int8 export in ``export_dir`` was accuracy-controlled at another one (made before that
    evaluation: at the config's); None where they agree or the export was not accuracy-controlled."""
    record = read_export(export_dir)
    chosen = chosen_threshold(run_dir, which) if "threshold" in record else None
    return None if chosen is None or np.isclose(chosen, record["threshold"]) else chosen


def model_digest(run_dir: Path | str, which: str = "best") -> str:
    """sha256 of the run's ``which`` model file: an export records it, so an export of a model that training
    has since replaced (a resumed run writes a new ``best.keras``) is never used for the new one."""
    return hashlib.sha256(run_model_path(run_dir, which).read_bytes()).hexdigest()


def _export_stem(format: str, level: int | None, precision: str = "fp32") -> str:
    stem = f"export-{format}" if precision == "fp32" else f"export-{format}-{precision}"
    return stem if level is None else f"{stem}-L{level}"


def newest_export(run_dir: Path | str, format: str, which: str = "best", level: int | None = None,
                  precision: str = "fp32") -> Path | None:
    """The newest export (by its ``export.json``'s modification time) of ``run_dir`` in ``format`` and
    ``precision`` made from the run's current ``which`` model, pruned to ``level`` (None: the whole network), or
    None."""
    digest = model_digest(run_dir, which)
    found = []
    for folder in Path(run_dir).glob(f"{_export_stem(format, level, precision)}*"):
        record = read_export(folder) if (folder / "export.json").is_file() else {}
        if (record.get("which"), record.get("model_sha256"), record.get("level"), record.get("precision", "fp32")) \
                == (which, digest, level, precision):
            found.append(folder)
    return max(found, key=lambda p: (p / "export.json").stat().st_mtime) if found else None


def export_run(run_dir: Path | str, format: str, which: str = "best", level: int | None = None,
               precision: str = "fp32", max_drop: float | None = INT8_MAX_DROP) -> Path:
    """Export the run's ``which`` model, pruned to ``level`` if given (U-Net++ only), in ``format`` (and, for
    OpenVINO, ``precision``: ``fp32``, ``int8`` or ``bf16``) into a new folder (see the module docstring).
    ``max_drop``: int8 only, the per-patient Dice drop on validation patients that accuracy control allows (None:
    none, plain post-training quantisation; :func:`~metaseg_tf.inference.quantise.quantise_int8`).

    The export is written into a hidden scratch folder of the run and becomes ``export-<format>`` only once it
    is complete and, for ONNX and OpenVINO, gives Keras' probabilities within :data:`MAX_DIFFERENCE`; a failed
    or interrupted export leaves no folder that could be taken for a good one. A missing converter or runtime
    (e.g. ``tf2onnx`` under TensorFlow, ``jax2onnx`` under JAX, ``openvino``) is a :class:`ConfigError`
    naming it."""
    import keras

    if format not in EXPORT_FORMATS:
        raise ValueError(f"unknown export format {format!r}; choose one of {', '.join(EXPORT_FORMATS)}")
    if precision not in PRECISIONS or (precision != "fp32" and format != "openvino"):
        raise ConfigError(f"precision {precision!r}: fp32 for every format, int8 or bf16 for openvino")
    run_dir = Path(run_dir)
    digest = model_digest(run_dir, which)
    model = load_model(run_dir, which)
    served = inference_network(model, level)
    served.predict_on_batch(np.zeros((1, *served.inputs[0].shape[1:]), np.float32))  # traced before export
    scratch = Path(tempfile.mkdtemp(prefix=f".export-{format}-", dir=run_dir))
    try:
        try:
            served.export(str(scratch / EXPORT_FILES[format]), format=_KERAS_FORMATS[format], verbose=False)
        except ImportError as error:
            raise ConfigError(f"exporting to {format} under the {keras.backend.backend()} backend needs the package "
                              f"{error.name or error}; install it, or export under another backend") from None
        for name in ("config.json", "data.json"):
            if (run_dir / name).is_file():
                shutil.copy(run_dir / name, scratch / name)
        quantisation = (quantise_int8(scratch / EXPORT_FILES[format], run_dir, max_drop, which)
                        if precision == "int8" else {})
        record = {"format": format, "precision": precision, "which": which, "level": level, "run": str(run_dir),
                  "file": EXPORT_FILES[format],
                  "model_sha256": digest, "keras": keras.__version__, "backend": keras.backend.backend(),
                  "input_shape": [None, *served.inputs[0].shape[1:]],
                  "output_shape": [None, *served.outputs[0].shape[1:]],
                  **quantisation}
        write_json(scratch / "export.json", record)
        if format in ("onnx", "openvino"):
            check = (np.random.default_rng(0).normal(size=(CHECK_BATCH, *served.inputs[0].shape[1:])).astype(np.float32)
                     if precision == "fp32" else calibration_inputs(run_dir, 4 * CHECK_BATCH))  # in range, for int8
            engine = engine_from_export(scratch)
            exported, reference = engine.predict(check), KerasEngine(served).predict(check)
            difference = float(np.abs(exported - reference).max())
            if precision == "fp32" and difference > MAX_DIFFERENCE:
                raise ValueError(f"the {format} export differs from Keras by up to {difference:.3g} in probability "
                                 f"(limit {MAX_DIFFERENCE}); it is not kept")
            record["max_abs_difference_to_keras"] = difference
            if precision != "fp32":  # a few boundary pixels may swing: the masks are what must agree
                theirs = reference >= 0.5
                agreement = overlap_scores(theirs, exported >= 0.5)["dice"] if theirs.any() else 1.0
                record.update(mean_abs_difference_to_keras=float(np.abs(exported - reference).mean()),
                              mask_dice_to_keras=agreement)
                if agreement < MIN_REDUCED_MASK_DICE:
                    raise ValueError(f"the {format} {precision} export's masks agree with Keras' at Dice {agreement:.3f} "
                                     f"on training slices (limit {MIN_REDUCED_MASK_DICE}); it is not kept")
            if format == "openvino":
                hint = engine.compiled.get_property("INFERENCE_PRECISION_HINT")
                record["runtime_precision"] = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)
            write_json(scratch / "export.json", record)
        out_dir = new_dir(run_dir, _export_stem(format, level, precision))
        for path in scratch.iterdir():
            path.replace(out_dir / path.name)
        return out_dir
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def engine_from_export(export_dir: Path | str, threads: int | None = None) -> Engine:
    """The engine of an export folder (``onnx`` or ``openvino``), using at most ``threads`` threads."""
    export_dir = Path(export_dir)
    kind = read_export(export_dir)["format"]
    if kind == "onnx":
        return OnnxEngine(export_dir / EXPORT_FILES["onnx"], threads=threads)
    if kind == "openvino":
        precision = "bf16" if read_export(export_dir).get("precision") == "bf16" else "f32"
        return OpenVinoEngine(export_dir / EXPORT_FILES["openvino"], precision=precision, threads=threads)
    raise ValueError(f"{export_dir} holds a {kind} export, which no engine here runs; use onnx or openvino")


def load_engine(run_dir: Path | str, engine: str, which: str = "best", model=None, level: int | None = None,
                threads: int | None = None) -> Engine:
    """The run's ``which`` model, pruned to ``level`` if given (U-Net++ only,
    :func:`~metaseg_tf.inference.loading.inference_network`), as ``engine``: Keras (``model`` if given, else
    loaded), or the newest export of that format and level (written first if there is none), using at most
    ``threads`` threads (ONNX Runtime, OpenVINO; None: the runtime's default, every core); ``openvino-int8`` and
    ``openvino-bf16`` are the OpenVINO exports of that precision."""
    if engine not in ENGINES:
        raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "keras":
        return KerasEngine(inference_network(model if model is not None else load_model(run_dir, which), level))
    format, _, precision = engine.partition("-")
    precision = precision or "fp32"
    export_dir = newest_export(run_dir, format, which, level, precision) or export_run(run_dir, format, which, level,
                                                                                       precision)
    if precision == "int8" and (chosen := stale_control_threshold(export_dir, run_dir, which)) is not None:
        logger.warning("%s was quantised under accuracy control at threshold %g; the run now predicts "
                       "at %g, chosen on validation: `metaseg export %s --format %s --precision int8` controls a "
                       "new export at it", export_dir, read_export(export_dir)["threshold"], chosen, run_dir, format)
    return engine_from_export(export_dir, threads)
