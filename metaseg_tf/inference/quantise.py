"""Post-training int8 quantisation of a run's OpenVINO IR with NNCF, under accuracy control.

Two steps, both from NNCF (Intel's Neural Network Compression Framework, ``nncf.quantize`` and
``nncf.quantize_with_accuracy_control``):

1. **Calibration.** Activation ranges are collected on :data:`CALIBRATION_SLICES` slices ``float32 (n, S, S, C)``
   spread evenly over the run's **training** patients (:func:`calibration_inputs`), never its validation or test
   patients, with the default preset (symmetric int8 weights and activations for a convolutional network) and
   NNCF's full bias correction (``fast_bias_correction=False``: on the LGG recipe's validation patients, scored
   without flip TTA, it lost 0.0055 per-patient Dice where the fast one lost 0.0121).
2. **Accuracy control** (``max_drop``, default :data:`INT8_MAX_DROP`). NNCF ranks the quantised operations by how
   much each costs the metric and returns them to floating point, most harmful first, until the metric on the
   run's **validation** patients (:func:`validation_cases`) is at most ``max_drop`` below float32's. The metric
   (:func:`per_patient_dice`) is the per-patient mean Dice of the network's masks at model resolution with the
   run's threshold and its flip TTA: the quantity ``metaseg evaluate`` reports, before the resizing to native
   resolution. Without the flip it misses most of the loss: for an LGG recipe export controlled without it,
   the metric read a loss of 0.0026 on the validation patients, with the flip 0.0066, and ``metaseg evaluate
   --split val`` 0.008. The threshold is the one the float32 model predicts at (:func:`~metaseg_tf.runs.records.run_threshold`):
   for a run trained with ``threshold_from_validation``, the one its newest evaluation chose on the validation
   patients (an export made before that evaluation was controlled at the config's; the engine then warns).
   ``max_drop=None``, or a run without validation patients, gives plain post-training quantisation.

:func:`quantise_int8` returns what :mod:`metaseg_tf.inference.export` records in ``export.json``: the calibration
slices and, under accuracy control, the validation patients, the threshold and where it came from
(``threshold``, ``threshold_source``), both metrics, the drop reached and how many of the
fake-quantise nodes (int8 inputs) the model keeps. Test patients are never read.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from metaseg_tf.config import ConfigError
from metaseg_tf.evaluation.scores import overlap_scores
from metaseg_tf.inference.engines import flip_averaged

logger = logging.getLogger(__name__)

CALIBRATION_SLICES = 300
INT8_MAX_DROP = 0.003  # per-patient Dice on validation patients: the 0.005 asked of test patients, less a margin
_BATCH = 64


def _recorded_part(run_dir: Path | str, part: str, count: int | None = None,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The run's ``part`` patients (``count`` slices spread evenly over them; None: all): network inputs
    ``float32 (n, S, S, C)`` (normalised as in training), target masks ``bool (n, S, S, regions)`` and the case id
    of every slice ``(n,)``. Only the chosen slices are normalised."""
    from metaseg_tf.data.batches import load_recorded_data
    from metaseg_tf.data.discover import DataError
    from metaseg_tf.data.preprocess import normalise
    from metaseg_tf.runs.folders import load_run_config, load_run_split

    config = load_run_config(run_dir)
    try:
        data, _ = load_recorded_data(config, load_run_split(run_dir), (part,), progress=False)
    except DataError as error:
        raise ConfigError(f"int8 quantisation reads the run's {part} patients from {config.data_dir}: "
                          f"{error}") from None
    indices = data.split.indices(data.dataset.case_ids, part)
    if count is not None and len(indices):
        indices = indices[np.linspace(0, len(indices) - 1, min(count, len(indices))).astype(int)]
    inputs = normalise(data.model_inputs(config, indices), config.normalisation).astype(np.float32)
    return inputs, data.truth(config, indices) > 0, data.dataset.case_ids[indices]


def calibration_inputs(run_dir: Path | str, count: int = CALIBRATION_SLICES) -> np.ndarray:
    """``count`` preprocessed slices ``float32 (n, S, S, input_channels)`` spread evenly over the run's recorded
    training patients (normalised as the network's inputs): int8 calibration data, never from test patients."""
    inputs, _, _ = _recorded_part(run_dir, "train", count)
    if len(inputs) == 0:
        raise ConfigError(f"{run_dir} has no training slices to calibrate an int8 export on")
    return inputs


def validation_cases(run_dir: Path | str) -> list[tuple[np.ndarray, np.ndarray]]:
    """One ``(inputs float32 (n, S, S, C), truth bool (n, S, S, regions))`` pair per validation patient of the run
    (empty if it has none): the data accuracy control is measured on."""
    inputs, truth, cases = _recorded_part(run_dir, "val")
    return [(inputs[cases == case], truth[cases == case]) for case in np.unique(cases)]


def per_patient_dice(compiled, cases: list[tuple[np.ndarray, np.ndarray]], threshold: float = 0.5,
                     flip_tta: bool = False) -> tuple[float, list[float]]:
    """Mean and per-patient Dice (all of a patient's slices and regions pooled; both masks empty: 1) of the masks
    ``probability >= threshold`` of an OpenVINO compiled model (its first output, ``(n, S, S, regions)``, averaged
    with the horizontally flipped slices' if ``flip_tta``, as the Predictor does) against each case's truth:
    NNCF's validation function (higher is better; one value per case to rank by)."""
    def predict(batch: np.ndarray) -> np.ndarray:
        return np.asarray(compiled(batch)[0])

    scores = []
    for inputs, truth in cases:
        probabilities = np.concatenate([flip_averaged(predict, inputs[k : k + _BATCH], flip_tta)
                                        for k in range(0, len(inputs), _BATCH)])
        scores.append(overlap_scores(truth, probabilities >= threshold)["dice"])
    return float(np.mean(scores)), scores


def quantise_int8(xml: Path, run_dir: Path, max_drop: float | None = INT8_MAX_DROP, which: str = "best") -> dict:
    """Quantise the OpenVINO IR at ``xml``, an export of the run's model ``which``, to int8 in place (see the
    module docstring); the record for ``export.json``. ``max_drop``: the largest per-patient Dice drop on
    validation patients that accuracy control allows (None: plain post-training quantisation)."""
    try:
        import nncf
        import openvino
    except ImportError as error:
        raise ConfigError(f"an int8 export needs the package {error.name}; pip install nncf openvino") from None
    from metaseg_tf.runs.folders import load_run_config
    from metaseg_tf.runs.records import run_threshold

    if max_drop is not None and not 0 <= max_drop < 1:
        raise ConfigError(f"max_drop {max_drop}: a Dice drop in [0, 1)")
    inputs = calibration_inputs(run_dir)
    calibration = nncf.Dataset([inputs[k : k + 1] for k in range(len(inputs))])
    model = openvino.Core().read_model(str(xml))
    settings = dict(subset_size=len(inputs), fast_bias_correction=False)
    cases = validation_cases(run_dir) if max_drop is not None else []
    record: dict = {"calibration_slices": len(inputs), "calibration": "training patients", "max_drop": max_drop}
    if not cases:
        if max_drop is not None:
            logger.warning("%s has no validation patients: int8 without accuracy control", run_dir)
            record["max_drop"] = None
        quantised = nncf.quantize(model, calibration, **settings)
    else:
        config = load_run_config(run_dir)
        threshold, source = run_threshold(run_dir, which)

        def validate(compiled, items) -> tuple[float, list[float]]:
            return per_patient_dice(compiled, list(items), threshold, config.flip_tta)

        quantised = nncf.quantize_with_accuracy_control(model, calibration, nncf.Dataset(cases), validate,
                                                        max_drop=max_drop, **settings)
        core = openvino.Core()
        reference, _ = validate(core.compile_model(model, "CPU"), cases)
        reached, _ = validate(core.compile_model(quantised, "CPU"), cases)
        record.update(validation="validation patients", validation_patients=len(cases), threshold=threshold,
                      threshold_source=source,
                      validation_dice_fp32=reference, validation_dice_int8=reached, validation_drop=reference - reached)
        if reference - reached > max_drop:
            logger.warning("int8 accuracy control stopped at a validation Dice drop of %.4f (asked: at most %.4f)",
                           reference - reached, max_drop)
    record["fake_quantize_nodes"] = sum(op.get_type_name() == "FakeQuantize" for op in quantised.get_ops())
    for path in (xml, xml.with_suffix(".bin")):
        path.unlink()
    openvino.save_model(quantised, str(xml), compress_to_fp16=False)
    return record
