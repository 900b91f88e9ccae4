"""Data-parallel training over several processes and hosts: ``jax.distributed`` + ``keras.distribution``.

A :class:`ProcessGroup` is ``N`` processes (one per host, or per GPU) that train one model together: every
process holds a replica of the weights, reads its own ``1/N`` of every global batch from disk
(:class:`~metaseg_tf.data.batches.SegmentationBatches` with ``shard``), and ``keras.distribution.DataParallel``
over the devices of all processes averages the gradients (an all-reduce: NCCL on GPUs, gloo on CPUs, JAX's
default since 0.5.1). The global batch is ``config.batch_size`` and the learning rate ``config.learning_rate``,
as in one process, so a run means the same whatever ``N``; both are recorded in the run's ``state.json``.

Process 0, the *leader*, is the process of one-process training: it finds or makes the run folder, holds its
lock, writes every file (config, split, checkpoints, history, backups) and, when a training starts, announces
the run folder to the others (:func:`announce`). The others, *followers*, train what the leader announces
(:func:`~metaseg_tf.training.train.follow`): they read the recorded split and, on a resumed run, the leader's backup, and write nothing.
So any command the leader runs (``train``, ``crossval``) is followed without the followers knowing it, and a
run killed in any process resumes when the same command is started again in every process.

The group comes from ``--coordinator HOST:PORT --num-processes N --process-id I``, else Keras' variables
``KERAS_DISTRIBUTION_JOB_ADDRESSES`` (the first address is the coordinator) / ``_NUM_PROCESSES`` /
``_PROCESS_ID``, else, inside a SLURM step of several tasks (``srun``), ``SLURM_PROCID``, ``SLURM_NTASKS`` and
the first host of ``SLURM_STEP_NODELIST`` (or ``SLURM_NODELIST``) with port ``METASEG_COORDINATOR_PORT``
(default :data:`DEFAULT_PORT` plus the job id modulo 1000, so that two jobs on one node do not meet). A batch
script alone, outside ``srun``, is one process. A process that cannot form the group in ``timeout_s`` seconds ends with one
line (:func:`initialize`), not a hang. Multi-process training needs the JAX backend; under TensorFlow it is
refused (:func:`check_backend`).
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import keras
import numpy as np

from metaseg_tf.config import ConfigError

DEFAULT_PORT = 29431
DEFAULT_TIMEOUT_S = 300.0
TENSORFLOW_REFUSAL = (
    "multi-process training needs the JAX backend (KERAS_BACKEND=jax): TensorFlow's MultiWorkerMirroredStrategy "
    "does not train Keras 3 models (keras-team/keras#20585); on one host, --devices N works under both")


@dataclass(frozen=True)
class ProcessGroup:
    """``num_processes`` processes that train together; ``coordinator`` (``HOST:PORT``) is where process 0
    listens for the others."""

    coordinator: str
    num_processes: int
    process_id: int
    timeout_s: float = DEFAULT_TIMEOUT_S

    def __post_init__(self) -> None:
        if self.num_processes < 1 or not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"process id {self.process_id} is not in [0, {self.num_processes}) processes")
        host, _, port = self.coordinator.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"coordinator {self.coordinator!r} is not HOST:PORT")
        if self.timeout_s <= 0:
            raise ConfigError("the coordinator timeout must be > 0 seconds")

    @property
    def leader(self) -> bool:
        """Process 0: the one that writes."""
        return self.process_id == 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[03-04,07],cpu1`` -> ``gpu03``, ``a1,b2`` -> ``a1``."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise ConfigError(f"cannot read the SLURM node list {nodelist!r}")
    prefix, ranges = match.groups()
    return prefix + (re.split(r"[-,]", ranges)[0] if ranges else "")


def group_from_environment(environ: Mapping[str, str] = os.environ,
                           timeout_s: float = DEFAULT_TIMEOUT_S) -> ProcessGroup | None:
    """The group Keras' ``KERAS_DISTRIBUTION_*`` variables or a SLURM step of several tasks describe; ``None``
    for one process (see the module docstring)."""
    if "KERAS_DISTRIBUTION_JOB_ADDRESSES" in environ:
        addresses = environ["KERAS_DISTRIBUTION_JOB_ADDRESSES"].split(",")
        try:
            count = int(environ.get("KERAS_DISTRIBUTION_NUM_PROCESSES", len(addresses)))
            process_id = int(environ["KERAS_DISTRIBUTION_PROCESS_ID"])
        except (KeyError, ValueError):
            raise ConfigError("KERAS_DISTRIBUTION_JOB_ADDRESSES needs KERAS_DISTRIBUTION_PROCESS_ID (an integer) and "
                              "an integer KERAS_DISTRIBUTION_NUM_PROCESSES") from None
        return ProcessGroup(addresses[0].strip(), count, process_id, timeout_s) if count > 1 else None
    tasks = environ.get("SLURM_STEP_NUM_TASKS", "")  # set inside an srun step only, not in the batch script
    if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in environ:
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_NODELIST") or "127.0.0.1"
        job = environ.get("SLURM_JOB_ID", "")
        port = environ.get("METASEG_COORDINATOR_PORT",
                           str(DEFAULT_PORT + int(job) % 1000 if job.isdigit() else DEFAULT_PORT))
        return ProcessGroup(f"{first_slurm_host(nodelist)}:{port}", int(tasks), int(environ["SLURM_PROCID"]), timeout_s)
    return None


def resolve_group(coordinator: str | None, num_processes: int | None, process_id: int | None,
                  timeout_s: float | None = None, environ: Mapping[str, str] = os.environ) -> ProcessGroup | None:
    """The group the flags describe (all three, or none and the environment's); ``None`` for one process."""
    timeout = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
    given = [value is not None for value in (coordinator, num_processes, process_id)]
    if any(given) and not all(given):
        raise ConfigError("--coordinator, --num-processes and --process-id go together")
    if all(given):
        group = ProcessGroup(str(coordinator), int(num_processes), int(process_id), timeout)  # type: ignore[arg-type]
        return group if group.num_processes > 1 else None
    return group_from_environment(environ, timeout)


def check_backend(backend: str | None = None) -> None:
    """Refuse, in one line, a backend that cannot train across processes (all but JAX)."""
    backend = backend or keras.backend.backend()
    if backend == "tensorflow":
        raise ConfigError(TENSORFLOW_REFUSAL)
    if backend != "jax":
        raise ConfigError(f"multi-process training needs the JAX backend (KERAS_BACKEND=jax), not {backend}")


_GROUP: ProcessGroup | None = None


def current_group() -> ProcessGroup | None:
    """The group this process joined with :func:`initialize`; ``None`` when it trains alone."""
    return _GROUP


def is_leader() -> bool:
    """Whether this process writes: it trains alone, or it is process 0 of its group."""
    return _GROUP is None or _GROUP.leader


def initialize(group: ProcessGroup) -> None:
    """Join ``group`` (``jax.distributed.initialize``, before any other JAX call of this process).

    ``keras.distribution.initialize`` takes no timeout and JAX's own ends in a C++ abort with a stack trace,
    so a watchdog ends the process first, with one line on stderr and exit status 2, when the group is not
    complete after ``group.timeout_s`` seconds (a coordinator that cannot be reached, a process missing).
    """
    global _GROUP
    check_backend()
    if _GROUP is not None:
        if _GROUP != group:
            raise ConfigError(f"this process already joined {_GROUP}")
        return
    import jax

    def give_up() -> None:
        role = "process 0 waited for the others" if group.leader else f"cannot reach the coordinator {group.coordinator}"
        print(f"metaseg: error: process {group.process_id} of {group.num_processes}: {role} for {group.timeout_s:g} s; "
              "start every process with the same --coordinator and --num-processes (or raise --coordinator-timeout)",
              file=sys.stderr, flush=True)
        os._exit(2)

    watchdog = threading.Timer(group.timeout_s, give_up)
    watchdog.daemon = True
    watchdog.start()
    try:  # no cluster auto-detection: it would narrow each process to one local device (SLURM_LOCALID)
        jax.distributed.initialize(group.coordinator, group.num_processes, group.process_id,
                                   initialization_timeout=int(group.timeout_s) + 60,
                                   cluster_detection_method="deactivate")
    except Exception as error:  # a port in use, a host that does not resolve, JAX already started
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ConfigError(f"process {group.process_id} of {group.num_processes} cannot join the group at "
                          f"{group.coordinator}: {first}") from None
    finally:
        watchdog.cancel()
    _GROUP = group


def _broadcast(payload: bytes) -> bytes:
    """``payload`` of process 0, on every process (two ``broadcast_one_to_all``: its length, then its bytes)."""
    from jax.experimental import multihost_utils

    length = int(np.asarray(multihost_utils.broadcast_one_to_all(np.array([len(payload)], np.int64)))[0])
    data = np.frombuffer(payload, np.uint8) if is_leader() else np.zeros(length, np.uint8)
    return np.asarray(multihost_utils.broadcast_one_to_all(data), np.uint8).tobytes()


def announce(message: dict[str, Any] | None) -> None:
    """Process 0: tell the followers what comes next (a training to join, ``{"failed": reason}``, or ``None``:
    nothing more); elsewhere nothing."""
    if _GROUP is not None and _GROUP.leader:
        _broadcast(json.dumps(message).encode())


def receive() -> dict[str, Any] | None:
    """A follower: the leader's next :func:`announce`."""
    return json.loads(_broadcast(b"").decode())


def agree(flag: bool) -> bool:
    """Process 0's ``flag`` on every process (e.g. "stop now: the time limit is reached"), so that all
    processes take the same number of steps."""
    if _GROUP is None:
        return flag
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.broadcast_one_to_all(np.array([int(flag)], np.int32))).item())
