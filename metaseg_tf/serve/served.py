"""The served models: which runs are served by default, each run (or cross-validation folder) loaded as one
:class:`~metaseg_tf.inference.predictor.Predictor`, and what ``/models`` says of it: architecture, input,
what it was trained on (a model trained on the synthetic phantom says that its masks on real scans are not
meaningful), its target and its test-split scores."""

from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from metaseg_tf import paths
from metaseg_tf.data.synthetic import is_phantom
from metaseg_tf.data.volumes import resolve_sequences
from metaseg_tf.inference.loading import inference_network
from metaseg_tf.runs.folders import list_runs, load_run_config, read_json
from metaseg_tf.runs.records import crossval_runs, is_crossval_dir, newest_evaluation

SERVE_ARCHITECTURES = ("nested_unet", "attention_unet")
PHANTOM_NOTE = ("trained on the synthetic phantom: its masks on real scans are not meaningful; serve a run "
                "trained on real data (metaseg serve --runs RUN)")


class ServeError(RuntimeError):
    """The service cannot start: no runs to serve, or a run folder that cannot be loaded."""


def newest_pipeline_runs(pipeline_root: str | Path = paths.PIPELINE_ROOT) -> list[Path]:
    """The newest finished run of each served model in the newest pipeline folder that has one."""
    root = paths.resolve(pipeline_root)
    for pipeline in sorted(root.glob("*/runs"), reverse=True):
        found = {read_json(run / "state.json").get("name"): run for run in list_runs(pipeline)}
        if any(name in found for name in SERVE_ARCHITECTURES):
            return [found[name] for name in SERVE_ARCHITECTURES if name in found]
    raise ServeError(f"no trained models under {root}: run the main job first (`bash scripts/run.sh`, or "
                     f"`metaseg pipeline`), or name run folders with `metaseg serve --runs RUN ...`")


@dataclass
class LoadedModel:
    """One loaded run: its predictor, what to say about it, and a lock that serialises what must not run in
    several threads at once (the Keras model)."""

    name: str
    run_dir: Path
    predictor: Any
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serialised(self) -> contextlib.AbstractContextManager:
        """The lock around inference when the predictor's engine cannot be called from several threads at once,
        else nothing (ONNX Runtime, OpenVINO)."""
        return contextlib.nullcontext() if self.predictor.concurrent else self.lock


def _model_info(name: str, run_dir: Path, config: Any, parameters: int) -> dict[str, Any]:
    data = read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    evaluation = newest_evaluation(run_dir, "test")
    test = {}
    if evaluation is not None:
        summary = read_json(evaluation / "summary.json")
        dice = summary["per_patient"]["dice"]
        test = {"patients": summary["patients"], "per_patient_dice": dice["mean"], "per_patient_dice_ci95": dice["ci95"],
                "global_dice": summary["global"]["dice"],
                f"hd95_{summary.get('distance_unit', 'px')}": summary["per_patient"]["hd95"]["mean"]}
    synthetic = data.get("synthetic_phantom")
    if synthetic is None and Path(config.data_dir).is_dir():  # a run recorded before data.json said so
        synthetic = is_phantom(config.data_dir)
    dataset = "synthetic phantom" if synthetic else Path(data.get("root", config.data_dir)).name
    return {"name": name, "architecture": config.model, "run": run_dir.name, "input_size": config.image_size,
            "context_slices": config.context_slices, "target": config.target,
            "trained_on": {"dataset": dataset, "synthetic_phantom": synthetic, "layout": data.get("layout"),
                           "label_convention": data.get("label_convention")},
            "note": PHANTOM_NOTE if synthetic else None,
            "channels": config.channels, "sequences": list(resolve_sequences(config.sequences, config.channels)),
            "clahe": config.clahe, "parameters": parameters,
            "training_data": {"data_dir": config.data_dir, "layout": data.get("layout"), "slices_used": data.get("pairs_used", data.get("slices_used")),
                              "patients_per_part": {part: len(cases) for part, cases in data.get("split", {}).items()},
                              "slices_per_part": data.get("slices_per_part", {}),
                              "skipped": len(data.get("skipped_at_reading", {}))
                              + sum(len(v) for v in data.get("skipped_at_discovery", {}).values())},
            "test_metrics": test}


def _model_entries(run_dirs: list[Path]) -> list[tuple[str | None, list[Path], Path]]:
    """``(architecture, runs, folder)`` to load: a run folder by itself, or for a cross-validation folder one
    entry per architecture it trained, its fold runs as one ensemble."""
    entries: list[tuple[str | None, list[Path], Path]] = []
    for run_dir in map(paths.resolve, run_dirs):
        if is_crossval_dir(run_dir):
            models = read_json(run_dir / "crossval.json").get("models", [])
            entries += [(model, crossval_runs(run_dir, (model,)), run_dir) for model in models]
        else:
            entries.append((None, [run_dir], run_dir))
    return entries


def load_models(run_dirs: list[Path], engine: str = "keras", level: int | None = None) -> dict[str, LoadedModel]:
    """Load each run's best model; names are the architectures (the run folder's name on a clash). A
    cross-validation folder gives one model per architecture it trained: the ensemble of its fold models
    (:meth:`~metaseg_tf.inference.predictor.Predictor.from_runs`). ``level`` prunes every U-Net++ trained with
    deep supervision to that level; other models are served whole, and ``/models`` says which level each one
    runs at."""
    from metaseg_tf.inference.predictor import Predictor

    models: dict[str, LoadedModel] = {}
    entries = _model_entries(run_dirs)
    # ONNX Runtime / OpenVINO sessions share the cores rather than each taking all of them
    threads = max(1, (os.cpu_count() or 1) // max(1, sum(len(runs) for _, runs, _ in entries)))
    for architecture, runs, folder in entries:
        try:
            config = load_run_config(runs[0])
            pruned = level if config.model == "nested_unet" and config.deep_supervision else None
            predictor = Predictor.from_runs(runs, engine=engine, level=pruned,
                                            threads=None if engine == "keras" else threads)
        except Exception as error:  # a broken run folder must stop the start-up with its reason
            raise ServeError(f"cannot load {folder}: {error}") from error
        name = predictor.config.model
        if name in models:
            name = folder.name if architecture is None else f"{folder.name}-{architecture}"
        info = {**_model_info(name, runs[0], predictor.config,
                              inference_network(predictor.model, pruned).count_params()),
                "engine": predictor.engine_name, "level": pruned, "members": len(predictor.members),
                "threshold": predictor.threshold, "threshold_source": predictor.threshold_source}
        if architecture is not None:  # a fold's test scores are not the ensemble's: see the crossval's summary
            info.update(run=folder.name, test_metrics={},
                        test_metrics_note=f"ensemble of {len(runs)} fold models; out-of-fold scores in "
                                          f"{folder / 'summary.md'}")
        elif pruned is not None and info["test_metrics"]:
            info["test_metrics_note"] = f"of the whole network; served pruned to level {pruned}"
        models[name] = LoadedModel(name, folder, predictor, info)
    return models
