"""Memory and throughput of ``POST /predict/volume`` under concurrent load: the bounded service beside the
unbounded one, in one run.

Starts ``uvicorn metaseg_tf.serve.api:app_from_environment`` as a child process serving RUNS (default: the
newest pipeline run's two models) twice: **bounded** with the service's defaults (``volume_jobs`` from the
machine's memory and the voxel limit, :func:`metaseg_tf.serve.guard.default_volume_jobs`; a queue of 64) and
**unbounded** as the service was before the job gate (``METASEG_VOLUME_JOBS`` = the concurrency: every
request predicts at once, as when only the thread pool limited it). For each concurrency (default 1, 16, 64)
it sends that many volume requests at once (model ``all``: both models predict each) and samples the resident
memory of the server's whole process tree every 0.1 s: peak, the rise over the idle server, and per job at
concurrency 1 (``VOLUME_JOB_BYTES_PER_VOXEL`` of :mod:`metaseg_tf.serve.guard` is this figure, rounded up).
Also printed: statuses (every answer's code), wall time and volumes per minute, and the documented bound
``idle + volume_jobs x per-job peak + waiting requests x files x WAITING_BYTES_PER_FILE`` (a waiting upload
keeps at most 1 MB a file in memory; Starlette spools the rest to disk).

The volumes: ``--volumes FILE ...`` (one for every sequence, or one per sequence of the models), default the
real metastasis case of ``$METASEG_REAL_DATA/mets_nifti_case`` (256x256x224; its T1CE, FLAIR and T1CE again
for the models' t1c, t2f, t1n: the case has no native T1), else a 240x240x155 random volume. The unbounded
server is loaded only up to ``--unbounded-max`` (default 16): at 64 it needs about 64 jobs' memory at once,
more than a 24 GB machine has (that is the finding the gate fixes).

Usage: ``python benchmarks/bench_serve_load.py [--runs RUN RUN] [--concurrency 1 16 64] [--volumes F ...]``.
"""

from __future__ import annotations

import argparse
import gzip
import os
import subprocess
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import requests

from metaseg_tf.serve.guard import WAITING_BYTES_PER_FILE, default_volume_jobs
from metaseg_tf.serve.launch import api_command, stop_children
from metaseg_tf.serve.served import newest_pipeline_runs
from metaseg_tf.serve.uploads import ServeSettings
from timing import wait_for_api

GIB = 1024**3


def _tree_rss(process: psutil.Process) -> int:
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.Error:
            pass
    return total


class PeakMemory:
    """The peak resident memory of a process tree, sampled every 0.1 s while in use."""

    def __init__(self, pid: int) -> None:
        self.process, self.peak, self._stop = psutil.Process(pid), 0, threading.Event()

    def __enter__(self) -> PeakMemory:
        self.peak = _tree_rss(self.process)
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak = max(self.peak, _tree_rss(self.process))

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def _default_volumes() -> tuple[list[tuple[str, bytes]], str]:
    real = Path(os.environ.get("METASEG_REAL_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
    case = real / "mets_nifti_case"
    if case.is_dir():
        t1ce, flair = (next(case.glob(f"*_{name}_aligned.nii.gz")) for name in ("t1ce", "flair"))
        shape = nib.load(t1ce).shape
        files = [("case-t1c.nii.gz", t1ce.read_bytes()), ("case-t2f.nii.gz", flair.read_bytes()),
                 ("case-t1n.nii.gz", t1ce.read_bytes())]
        return files, f"real mets_nifti_case {'x'.join(map(str, shape))} (T1CE, FLAIR, T1CE)"
    volume = (np.random.default_rng(0).random((240, 240, 155)) * 1000).astype(np.float32)
    data = gzip.compress(nib.Nifti1Image(volume, np.eye(4)).to_bytes(), compresslevel=1)
    return [("case.nii.gz", data)], "random 240x240x155 (one file for every sequence)"


def _load(url: str, volumes: list[tuple[str, bytes]], concurrency: int) -> tuple[Counter, float]:
    def one(_: int) -> int:
        try:
            return requests.post(url, files=[("files", volume) for volume in volumes], data={"model": "all"},
                                 timeout=3600).status_code
        except requests.RequestException:
            return -1

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        statuses = Counter(pool.map(one, range(concurrency)))
    return statuses, time.perf_counter() - started


def _serve(runs: list[Path], port: int, volume_jobs: int | None) -> subprocess.Popen:
    environment = {**os.environ, "METASEG_SERVE_RUNS": os.pathsep.join(str(Path(r).resolve()) for r in runs),
                   **({"METASEG_VOLUME_JOBS": str(volume_jobs)} if volume_jobs else {})}
    environment.pop("METASEG_API_TOKEN", None)
    server = subprocess.Popen(api_command("127.0.0.1", port), env=environment, start_new_session=True)
    wait_for_api(f"http://127.0.0.1:{port}", server)
    return server


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+")
    parser.add_argument("--volumes", type=Path, nargs="+")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--unbounded-max", type=int, default=16)
    parser.add_argument("--port", type=int, default=8766)
    args = parser.parse_args()

    runs = args.runs or newest_pipeline_runs()
    if args.volumes:
        volumes, described = [(p.name, p.read_bytes()) for p in args.volumes], ", ".join(p.name for p in args.volumes)
    else:
        volumes, described = _default_volumes()
    jobs = default_volume_jobs(ServeSettings().max_voxels)
    print(f"serving {', '.join(Path(r).name for r in runs)}; volumes: {described}; model=all; "
          f"{os.cpu_count()} CPUs, {psutil.virtual_memory().total / GIB:.1f} GiB; bounded default volume_jobs={jobs}")
    print(f"{'server':<11}{'concurrent':>11}{'statuses':>22}{'wall s':>9}{'vol/min':>9}{'idle GiB':>10}"
          f"{'peak GiB':>10}{'rise GiB':>10}{'bound GiB':>11}")
    per_job = None
    voxels = int(np.prod(nib.Nifti1Image.from_bytes(_raw(volumes[0][1])).shape[:3]))
    for name, volume_jobs in (("bounded", None), ("unbounded", "concurrency")):
        for concurrency in args.concurrency:
            if name == "unbounded" and concurrency > args.unbounded_max:
                print(f"{name:<11}{concurrency:>11}  not run: about {concurrency} jobs' memory at once (see --unbounded-max)")
                continue
            server = _serve(runs, args.port, concurrency if volume_jobs else None)
            try:
                url = f"http://127.0.0.1:{args.port}/predict/volume"
                _load(url, volumes, 1)  # warm-up: both models traced once
                idle = _tree_rss(psutil.Process(server.pid))
                with PeakMemory(server.pid) as memory:
                    statuses, wall = _load(url, volumes, concurrency)
            finally:
                stop_children([server])
            rise = memory.peak - idle
            if per_job is None:  # the first row: one job alone
                per_job = rise
                print(f"{'':<11}per job: {rise / GIB:.2f} GiB = {rise / voxels:.1f} bytes per voxel of the "
                      f"{voxels}-voxel grid")
            bound = (idle + jobs * per_job + max(0, concurrency - jobs) * len(volumes) * WAITING_BYTES_PER_FILE
                     if name == "bounded" else float("nan"))
            print(f"{name:<11}{concurrency:>11}{dict(sorted(statuses.items()))!s:>22}{wall:>9.1f}"
                  f"{60 * concurrency / wall:>9.1f}{idle / GIB:>10.2f}{memory.peak / GIB:>10.2f}{rise / GIB:>10.2f}"
                  f"{bound / GIB:>11.2f}")


def _raw(data: bytes) -> bytes:
    return gzip.decompress(data) if data[:2] == b"\x1f\x8b" else data


if __name__ == "__main__":
    main()
