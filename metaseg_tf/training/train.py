"""Training engine: one :class:`~metaseg_tf.config.ExperimentConfig` in, one run folder out.

:func:`train` discovers and preprocesses the data, splits it by patient, builds the model, fits it with
Keras callbacks and writes everything a later step needs into a new run folder (see
:mod:`metaseg_tf.runs.folders`). A run that is killed is resumed by running the same command again
(``keras.callbacks.BackupAndRestore`` restores weights, optimiser state and epoch).

U-Net++ with deep supervision is trained on all its heads, by default with equal weights ``1 / depth`` (the
mean of the heads' losses, Zhou et al. 2018; ``deep_supervision_weights``: :func:`head_loss_weights`);
validation Dice, which selects the best epoch, is that of the deepest head. Mixed precision is used on GPUs
only (``auto``); XLA as Keras decides (``auto``: not for TensorFlow on a CPU; the ``cpu`` pipeline profile
turns it on where it measured faster, see :func:`_jit_compile`).

Several processes (hosts) train one run together under JAX (:mod:`metaseg_tf.training.processes`): process 0
runs :func:`train` as one process would and announces the run; the others join it with :func:`follow_run`,
which writes nothing.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras

from metaseg_tf import paths
from metaseg_tf.config import ConfigError, ExperimentConfig
from metaseg_tf.data.batches import ExperimentData, SegmentationBatches, load_experiment_data, load_recorded_data
from metaseg_tf.environment import accelerator, environment_info
from metaseg_tf.models import build_model
from metaseg_tf.training.transfer import initialise_from
from metaseg_tf.runs.folders import create_run_dir, find_unfinished_run, hold_run_lock, load_run_split, read_json, write_json
from metaseg_tf.training.callbacks import RunProgress, engine_callbacks, saving_alone, settle_backup
from metaseg_tf.training.losses import SegmentationLoss
from metaseg_tf.training.metrics import segmentation_metrics
from metaseg_tf.training.processes import ProcessGroup, announce, current_group, is_leader, receive

logger = logging.getLogger(__name__)


@dataclass
class TrainedRun:
    """Where a run lives and how it ended (``state`` is the content of its ``state.json``)."""

    run_dir: Path
    config: ExperimentConfig
    state: dict[str, Any]

    @property
    def best_model_path(self) -> Path:
        return self.run_dir / "best.keras"


def monitored_metric(model: keras.Model, validation: bool = True) -> str:
    """Name of the Dice the checkpoint and early stopping watch: the (deepest) output's ``dice``."""
    names = model.output_names
    dice = "dice" if len(names) == 1 else f"{names[-1]}_dice"
    return f"val_{dice}" if validation else dice


def make_optimizer(config: ExperimentConfig, steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Adam (default), AdamW or SGD with Nesterov momentum; with ``lr_schedule="cosine"`` the learning rate
    warms up linearly over ``warmup_epochs`` and then decays along a cosine to 1 % of its peak."""
    learning_rate: float | keras.optimizers.schedules.LearningRateSchedule = config.learning_rate
    if config.lr_schedule == "cosine":
        warmup = config.warmup_epochs * steps_per_epoch
        learning_rate = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0 if warmup else config.learning_rate,
            decay_steps=max(1, config.epochs * steps_per_epoch - warmup),
            alpha=0.01,
            warmup_target=config.learning_rate if warmup else None,
            warmup_steps=warmup,
        )
    if config.optimizer == "adamw":
        return keras.optimizers.AdamW(learning_rate, weight_decay=1e-4)
    if config.optimizer == "sgd":
        return keras.optimizers.SGD(learning_rate, momentum=0.9, nesterov=True)
    return keras.optimizers.Adam(learning_rate)


def _jit_compile(config: ExperimentConfig) -> bool | str:
    """XLA: ``auto`` passes Keras' own ``"auto"``: JAX always; TensorFlow only where there is an accelerator
    (Keras turns XLA off on CPU-only machines; ``benchmarks/bench_models.py`` measured bare XLA steps at
    0.70-0.76x on an Intel Xeon with AMX, while ``benchmarks/bench_fit.py`` measured 2x in ``fit`` on an AVX2
    AMD EPYC, where the ``cpu`` pipeline profile sets ``on``: :func:`~metaseg_tf.environment.cpu_prefers_xla`);
    PyTorch off."""
    if config.jit_compile != "auto":
        return config.jit_compile == "on"
    return "auto" if keras.backend.backend() in ("jax", "tensorflow") else False


def head_loss_weights(config: ExperimentConfig, heads: int) -> list[float]:
    """The loss weights of a deeply supervised U-Net++'s ``heads`` outputs (``head_1 .. head_depth``):
    ``config.deep_supervision_weights`` normalised to sum 1, or equal weights where it is empty (Zhou et al.
    2018, "UNet++", average the heads' losses)."""
    weights = config.deep_supervision_weights or (1.0,) * heads
    if len(weights) != heads:
        raise ConfigError(f"deep_supervision_weights gives {len(weights)} weights for a model of {heads} outputs")
    return [weight / sum(weights) for weight in weights]


def compile_model(model: keras.Model, config: ExperimentConfig, steps_per_epoch: int = 1) -> keras.Model:
    """Compile ``model`` with the config's loss on every output (their weighted mean:
    :func:`head_loss_weights`), the optimiser and schedule, and Dice/IoU/precision/recall on the (deepest)
    output."""
    names = model.output_names
    metrics = segmentation_metrics(config.threshold)
    model.compile(
        optimizer=make_optimizer(config, steps_per_epoch),
        loss=[SegmentationLoss(config.loss) for _ in names] if len(names) > 1 else SegmentationLoss(config.loss),
        loss_weights=head_loss_weights(config, len(names)) if len(names) > 1 else None,
        # weighted: the padding slices of sharded evaluation batches (sample weight 0) must not count
        weighted_metrics={names[-1]: metrics} if len(names) > 1 else metrics,
        jit_compile=_jit_compile(config),
    )
    return model


@contextlib.contextmanager
def precision_policy(config: ExperimentConfig) -> Iterator[str]:
    """The Keras dtype policy while building and training (Micikevicius et al. 2018, "Mixed precision
    training"; variables stay float32, the heads' sigmoids too): on a GPU ``mixed_float16`` (``mixed_precision``
    ``auto`` or ``on``); on a CPU ``mixed_bfloat16`` with ``on`` (bfloat16 needs no loss scaling; fast where the
    CPU has AVX512-BF16 or AMX, :func:`~metaseg_tf.environment.cpu_has_bf16`, recorded in the run's
    ``environment.json``), else ``float32``."""
    gpu = accelerator() == "gpu"
    wanted = config.mixed_precision == "on" or (config.mixed_precision == "auto" and gpu)
    previous = keras.config.dtype_policy().name
    policy = ("mixed_float16" if gpu else "mixed_bfloat16") if wanted else "float32"
    keras.config.set_dtype_policy(policy)
    try:
        yield policy
    finally:
        keras.config.set_dtype_policy(previous)


@contextlib.contextmanager
def device_scope(devices: int, group: ProcessGroup | None = None) -> Iterator[None]:
    """Data-parallel training on ``devices`` devices through the backend's own engine:
    ``tf.distribute.MirroredStrategy`` under TensorFlow, ``keras.distribution.DataParallel`` under JAX; in a
    process ``group``, ``DataParallel`` over every device of every process (``devices`` is not used)."""
    if group is not None:
        previous = keras.distribution.distribution()
        # each process's batches are already its shard (SegmentationBatches' ``shard``): no auto-sharding
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=keras.distribution.list_devices(), auto_shard_dataset=False))
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)
        return
    if devices == 1:
        yield
        return
    backend = keras.backend.backend()
    if backend == "tensorflow":
        import tensorflow as tf

        kind = "GPU" if tf.config.list_logical_devices("GPU") else "CPU"
        names = [device.name for device in tf.config.list_logical_devices(kind)]
        if len(names) < devices:
            raise ConfigError(f"devices={devices} but TensorFlow sees {len(names)} {kind} device(s)")
        with tf.distribute.MirroredStrategy(names[:devices]).scope():
            yield
    elif backend == "jax":
        available = keras.distribution.list_devices()
        if len(available) < devices:
            raise ConfigError(f"devices={devices} but JAX sees {len(available)} device(s)")
        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=available[:devices]))
        try:
            yield
        finally:
            keras.distribution.set_distribution(previous)
    else:
        raise ConfigError(f"devices > 1 needs the TensorFlow or JAX backend, not {backend}")


def _start_or_resume(config: ExperimentConfig, runs_root: Path, name: str, data: ExperimentData,
                     run_dir: Path | None, locks: contextlib.ExitStack) -> tuple[Path, dict, dict]:
    """The resumed run (already locked by the caller) or a new run folder, locked before its state is written
    so that no other process can take it for a killed run."""
    if run_dir is not None:
        state, timings = read_json(run_dir / "state.json"), read_json(run_dir / "timings.json")
        if state.get("status") != "running":
            raise ConfigError(f"{run_dir} finished while this process was starting; train again for a new run")
        state["resumed"] = state.get("resumed", 0) + 1
        settle_backup(run_dir, state, timings)
        return run_dir, state, timings
    run_dir = create_run_dir(runs_root, name)
    locks.enter_context(hold_run_lock(run_dir))
    config.save(run_dir / "config.json")
    write_json(run_dir / "data.json", data.to_dict())
    write_json(run_dir / "environment.json", environment_info())
    state = {"name": name, "status": "running", "epochs_done": 0, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    timings = {"epoch_seconds": [], "train_seconds": 0.0}
    write_json(run_dir / "state.json", state)
    write_json(run_dir / "timings.json", timings)
    return run_dir, state, timings


def train(
    config: ExperimentConfig,
    runs_root: Path | str = paths.RUNS_ROOT,
    name: str | None = None,
    progress: bool = True,
    resume: bool = True,
    data: ExperimentData | None = None,
    callbacks: list[keras.callbacks.Callback] | None = None,
    resume_since: str = "",
) -> TrainedRun:
    """Train ``config.model`` on ``config.data_dir`` into a run folder under ``runs_root``.

    ``name`` (default: the model name) is the folder's suffix after the timestamp. With ``resume`` an
    unfinished run of the same name and configuration is continued instead of starting a new one, on the
    patient split recorded when it started (a clear error if the data no longer holds those patients); with
    ``resume_since`` (``%Y-%m-%d %H:%M:%S``) only one started at or after then (a cross-validation continues
    its own runs, not those of an older one in the same folder). ``data`` skips discovery and preprocessing
    when the caller has already loaded them; ``callbacks`` are added after the engine's own (e.g. live plots
    in a notebook).
    """
    group = current_group()
    if not is_leader():
        raise ConfigError(f"process {group.process_id} of {group.num_processes} joins the trainings process 0 "
                          "announces (follow); it does not start its own")
    runs_root = paths.resolve(runs_root)
    name = name or config.model
    unfinished = find_unfinished_run(runs_root, name, config, resume_since) if resume else None
    with contextlib.ExitStack() as locks:
        if unfinished is None:
            data = data or load_experiment_data(config, progress=progress)
        else:  # the split is part of the run: resume on the recorded patients, never on a new split
            locks.enter_context(hold_run_lock(unfinished))
            data, _ = load_recorded_data(config, load_run_split(unfinished), ("train", "val"), data=data,
                                         progress=progress)
        run_dir, state, timings = _start_or_resume(config, runs_root, name, data, unfinished, locks)
        recorded = state.get("distribution", {}).get("processes", 1)
        if unfinished is not None and recorded != (1 if group is None else group.num_processes):
            raise ConfigError(f"{run_dir} was trained by {recorded} process(es); resume it with as many (an epoch "
                              "has another number of steps otherwise), or train again with --no-resume")
        if group is not None:
            check_shards(config, group)
            state["distribution"] = distribution_record(config, group)
            announce({"config": config.to_dict(), "run_dir": str(run_dir), "state": state, "timings": timings})
        return _fit(config, data, run_dir, state, timings, progress, callbacks)


def check_shards(config: ExperimentConfig, group: ProcessGroup) -> None:
    """Refuse, before any process starts training, a global batch the group cannot split evenly over its
    processes and their devices."""
    local_devices = len(keras.distribution.list_devices()) // group.num_processes
    if config.batch_size % (group.num_processes * local_devices):
        raise ConfigError(f"the batch size {config.batch_size} must be a multiple of the {group.num_processes} "
                          f"processes x {local_devices} device(s) each")


def distribution_record(config: ExperimentConfig, group: ProcessGroup) -> dict[str, Any]:
    """What ``state.json`` records of a run trained by a process group: how many processes and devices, the
    global batch (``config.batch_size``), each process's share of it and the learning rate."""
    return {"processes": group.num_processes, "devices": len(keras.distribution.list_devices()),
            "coordinator": group.coordinator, "global_batch": config.batch_size,
            "per_process_batch": config.batch_size // group.num_processes, "learning_rate": config.learning_rate}


def follow_run(message: dict[str, Any], progress: bool = True,
               callbacks: list[keras.callbacks.Callback] | None = None) -> TrainedRun:
    """A follower's part of the training process 0 announced in ``message`` (its config, run folder, state and
    timings): the recorded split's data, the leader's backup when the run resumes, its shard of every batch;
    it writes nothing (``callbacks`` are added after the engine's own, as in :func:`train`)."""
    config = ExperimentConfig.from_dict(message["config"])
    run_dir = Path(message["run_dir"])
    data, _ = load_recorded_data(config, load_run_split(run_dir), ("train", "val"), progress=progress)
    return _fit(config, data, run_dir, message["state"], message["timings"], progress, callbacks, writer=False)


def follow(progress: bool = True) -> int:
    """A follower's whole work: join every training the leader announces until it announces the end."""
    group = current_group()
    if group is None or group.leader:
        raise ConfigError("only processes other than 0 of a process group follow")
    joined = 0
    while (message := receive()) is not None:
        if "failed" in message:
            raise ConfigError(f"process 0 ended with an error: {message['failed']}")
        follow_run(message, progress=progress)
        joined += 1
    print(f"process {group.process_id} of {group.num_processes}: the leader has finished; joined {joined} training(s)")
    return 0


def fit_verbosity(progress: bool) -> int:
    """Keras ``fit``'s ``verbose``: a live progress bar (1) where someone watches a terminal or a notebook,
    else one line per epoch (2), so that a log file (a background job, CI) gets no bar redrawn per step."""
    watched = sys.stdout.isatty() or "ipykernel" in sys.modules
    return 1 if progress and watched else 2


def _fit(config: ExperimentConfig, data: ExperimentData, run_dir: Path, state: dict[str, Any],
         timings: dict[str, Any], progress: bool, callbacks: list[keras.callbacks.Callback] | None,
         writer: bool = True) -> TrainedRun:
    """Build, compile and fit the model into ``run_dir`` (held by this process); finish the run's files
    (``writer`` False: a follower of a process group, which writes none)."""
    keras.utils.set_random_seed(config.seed)
    group = current_group()
    shard = (group.process_id, group.num_processes) if group is not None else (0, 1)
    with precision_policy(config) as policy, device_scope(config.devices, group):
        model = build_model(config.model, config)
        if config.init_from and not state["epochs_done"]:  # a resumed run restores its own backup instead
            state["initialised_from"] = initialise_from(model, config)
            if writer:
                print(f"initialised from {config.init_from}"
                      + "".join(f"; {note}" for note in state["initialised_from"]["adapted"]))
        targets = len(model.outputs)
        train_batches = SegmentationBatches(data.dataset, data.split.indices(data.dataset.case_ids, "train"),
                                            config, training=True, target_copies=targets, shard=shard)
        if len(train_batches) == 0:
            raise ConfigError(f"the global batch of {config.batch_size} is larger than the "
                              f"{train_batches.slices_per_epoch} training slices of an epoch")
        val_indices = data.split.indices(data.dataset.case_ids, "val")
        val_batches = (SegmentationBatches(data.dataset, val_indices, config, target_copies=targets, shard=shard)
                       if len(val_indices) else None)
        train_batches.start_at_epoch(state["epochs_done"])
        compile_model(model, config, steps_per_epoch=len(train_batches))
        monitor = monitored_metric(model, validation=val_batches is not None)
        sizes = data.part_sizes()
        what = "resuming" if state.get("resumed") else "training"
        together = "" if group is None else (
            f"; {group.num_processes} processes, {train_batches.batch_size // group.num_processes} slices of every "
            f"batch each, {train_batches.dropped_per_epoch} slice(s) per epoch after the last whole batch left out")
        if not writer:
            print(f"process {group.process_id} of {group.num_processes} joins {what} {run_dir}")
        else:
            print(f"{what} {config.model} ({model.count_params() / 1e6:.2f} M parameters, {targets} output(s)) on "
                  f"{data.report.root}: {sizes['train'][0]} train / {sizes['val'][0]} val patients "
                  f"({sizes['train'][1]} / {sizes['val'][1]} slices) at {config.image_size} px, "
                  f"CLAHE {'on' if config.clahe else 'off'}; {config.epochs} epochs of batch {config.batch_size}, "
                  f"{keras.backend.backend()} on {accelerator()} ({policy}){together}; run folder {run_dir}")
        run_progress = RunProgress(run_dir if writer else None, state, timings, monitor, config.max_train_minutes * 60)
        early_stopping = keras.callbacks.EarlyStopping(monitor=monitor, mode="max",
                                                       patience=config.early_stopping_patience)
        try:
            model.fit(train_batches, validation_data=val_batches, epochs=config.epochs,
                      callbacks=[*engine_callbacks(run_dir, config, monitor, state, run_progress, early_stopping, writer),
                                 *(callbacks or [])],
                      verbose=fit_verbosity(progress))
        except KeyboardInterrupt:
            print(f"interrupted after epoch {state['epochs_done']}; run the same command again to resume {run_dir}")
            raise
        if writer:
            with saving_alone():
                model.save(run_dir / "last.keras")
    reason = ("time limit" if run_progress.hit_time_limit else
              "early stopping" if early_stopping.stopped_epoch else "completed")
    if not writer:
        return TrainedRun(run_dir, config, {**state, "status": "finished", "stop_reason": reason})
    if not (run_dir / "best.keras").exists():
        model.save(run_dir / "best.keras")
    state.update(status="finished", stop_reason=reason, monitor=monitor,
                 finished=time.strftime("%Y-%m-%d %H:%M:%S"))
    write_json(run_dir / "state.json", state)
    print(f"finished ({reason}) after {state['epochs_done']} epochs; best {monitor} "
          f"{state.get('best_value', float('nan')):.4f} at epoch {state.get('best_epoch')}; {run_dir}")
    return TrainedRun(run_dir, config, state)
