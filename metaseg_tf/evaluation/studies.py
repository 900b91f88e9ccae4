"""Notebook studies of trained runs: U-Net++ pruned to each level (:func:`prune_level_scores`), the
predictions of several runs side by side (:func:`side_by_side_overlays`) and their lesion reports beside the
truth's (:func:`lesion_tables`). Every mask is made by a
:class:`~metaseg_tf.inference.predictor.Predictor` with the run's own inference settings (flip TTA,
threshold, small-lesion removal), as ``metaseg predict`` makes it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from metaseg_tf import plots
from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.batches import ExperimentData, load_recorded_data
from metaseg_tf.evaluation.complexity import model_complexity
from metaseg_tf.evaluation.report import example_slices, mean_dice, model_spacing
from metaseg_tf.evaluation.scores import dice_per_case
from metaseg_tf.inference.lesions import lesion_table
from metaseg_tf.inference.loading import inference_network
from metaseg_tf.inference.predictor import Predictor
from metaseg_tf.models.nested_unet import average_heads, head_names
from metaseg_tf.runs.folders import load_run_config, load_run_split


def _split_images(run_dir: Path | str, config: ExperimentConfig, split: str, data: ExperimentData | None,
                  progress: bool) -> tuple[ExperimentData, np.ndarray]:
    """The run's data with its recorded split, and the slices of ``split``."""
    data, _ = load_recorded_data(config, load_run_split(run_dir), (split,), data=data, progress=progress)
    indices = data.split.indices(data.dataset.case_ids, split)
    if len(indices) == 0:
        raise ValueError(f"the {split} part of the split has no slices")
    return data, indices


def prune_level_scores(run_dir: Path | str, split: str = "val", data: ExperimentData | None = None,
                       progress: bool = True) -> pd.DataFrame:
    """Accuracy against cost of a trained U-Net++ pruned to each level L1..L<depth> (Zhou et al. 2019,
    section III-C) and of the mean of its heads, on ``split`` at the model's resolution, every mask made by the
    run's :class:`~metaseg_tf.inference.predictor.Predictor` at that level (its flip TTA, threshold and
    small-lesion removal: the masks ``metaseg predict --level K`` writes).

    Returns one row per variant: ``label``, ``patient_dice`` (mean over patients), ``global_dice``,
    ``parameters``, ``gflops_per_image`` and ``latency_ms`` (batch 1). The pruned models reuse the trained
    weights; nothing is retrained.
    """
    run_dir = Path(run_dir)
    config = load_run_config(run_dir)
    whole = Predictor.from_run(run_dir, batch_size=config.batch_size)
    levels = head_names(whole.model)
    if not levels:
        raise ValueError(f"{run_dir} holds no U-Net++ with deep-supervision heads")
    data, indices = _split_images(run_dir, config, split, data, progress)
    images, truth = data.model_inputs(config, indices), data.truth(config, indices)[..., 0]
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    variants = {f"L{k}": (Predictor.from_run(run_dir, level=k, threshold=whole.threshold, batch_size=config.batch_size),
                          inference_network(whole.model, k)) for k in range(1, len(levels) + 1)}
    heads = average_heads(whole.model)
    variants["mean of heads"] = (Predictor(heads, config, threshold=whole.threshold, batch_size=config.batch_size,
                                           label_convention=whole.target.convention), heads)
    rows = []
    for label, (predictor, network) in variants.items():
        pred = predictor.masks(predictor.probabilities(images), case_ids, slice_indices)[..., 0] > 0
        complexity = model_complexity(network, batch_size=1, repeats=10)
        rows.append({"label": label, **mean_dice(truth, pred, case_ids), "parameters": complexity.parameters,
                     "gflops_per_image": (complexity.flops_per_image or float("nan")) / 1e9,
                     "latency_ms": complexity.latency_ms})
    return pd.DataFrame(rows)


def side_by_side_overlays(run_dirs: Sequence[Path | str], labels: Sequence[str], path: Path | str,
                          split: str = "test", data: ExperimentData | None = None, progress: bool = True) -> Path:
    """Best, median and worst patients (ranked by the models' mean per-patient Dice) with every model's
    prediction (its run's :class:`~metaseg_tf.inference.predictor.Predictor`) beside the truth, at the model's
    resolution. The runs must share one patient split."""
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    data, indices = _split_images(run_dirs[0], configs[0], split, data, progress)
    images, truth = data.dataset.images[indices], data.truth(configs[0], indices)[..., 0]
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    predictions, dice = {}, []
    for label, run_dir, config in zip(labels, run_dirs, configs):
        if (config.image_size, config.target) != (configs[0].image_size, configs[0].target) or \
                load_run_split(run_dir) != load_run_split(run_dirs[0]):
            raise ValueError(f"{run_dir} was trained at another size, on another target or on another patient "
                             f"split than {run_dirs[0]}")
        predictor = Predictor.from_run(run_dir, batch_size=config.batch_size)
        probabilities = predictor.probabilities(data.model_inputs(config, indices))
        predictions[label] = predictor.masks(probabilities, case_ids, slice_indices)[..., 0] > 0
        dice.append(dice_per_case(truth, predictions[label], case_ids))
    mean_per_case = {case: float(np.mean([scores[case] for scores in dice])) for case in dice[0]}
    ranked = sorted(mean_per_case, key=mean_per_case.get, reverse=True)
    rows, titles = example_slices(ranked, truth, case_ids)
    return plots.overlay_grid([images[k] for k in rows], [truth[k] for k in rows],
                              {label: [pred[k] for k in rows] for label, pred in predictions.items()}, titles, path)


def lesion_tables(run_dirs: Sequence[Path | str], labels: Sequence[str], out_dir: Path | str, split: str = "test",
                  data: ExperimentData | None = None, progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The lesion report (:func:`~metaseg_tf.inference.lesions.lesion_table`: 26-connected lesions per region,
    volume in mm³, largest axial diameter) of the truth and of every model's masks on the ``split`` patients, at
    the model's resolution (slices of a case stacked by slice number, spacing scaled to the model's pixels).

    Returns ``(lesions, per_case)``: every lesion with ``source`` (``truth`` or a label) and ``case_id``; and per
    case and source the lesion count, total volume and largest diameter of each region. Both are also written to
    ``out_dir`` as ``lesions.csv`` and ``lesions_per_case.csv``. The runs must share one patient split."""
    configs = [load_run_config(run_dir) for run_dir in run_dirs]
    data, indices = _split_images(run_dirs[0], configs[0], split, data, progress)
    case_ids, slice_indices = data.dataset.case_ids[indices], data.dataset.slice_indices[indices]
    sources = {}
    for label, run_dir, config in zip(labels, run_dirs, configs):
        predictor = Predictor.from_run(run_dir, batch_size=config.batch_size)
        probabilities = predictor.probabilities(data.model_inputs(config, indices))
        sources[label] = (predictor.masks(probabilities, case_ids, slice_indices), predictor.target)
    sources = {"truth": (data.truth(configs[0], indices), sources[labels[0]][1]), **sources}
    spacing = model_spacing(data, configs[0].image_size)
    tables = []
    for case in dict.fromkeys(case_ids.tolist()):
        rows = np.flatnonzero(case_ids == case)
        rows = rows[np.argsort(slice_indices[rows])]
        for source, (masks, target) in sources.items():
            table = lesion_table(masks[rows], target.names, spacing.get(case))
            table.insert(0, "case_id", case)
            table.insert(0, "source", source)
            tables.append(table)
    lesions = pd.concat(tables, ignore_index=True)
    per_case = (lesions.groupby(["case_id", "source", "region"], sort=False)
                .agg(lesions=("lesion", "count"), volume_mm3=("volume_mm3", "sum"),
                     largest_diameter_mm=("largest_axial_diameter_mm", "max")).reset_index())
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lesions.to_csv(out_dir / "lesions.csv", index=False)
    per_case.to_csv(out_dir / "lesions_per_case.csv", index=False)
    return lesions, per_case
