"""Load check of the prediction API: N concurrent ``POST /predict`` on loopback against a real uvicorn server.

Starts ``uvicorn metaseg_tf.serve.api:app_from_environment`` as a child process serving RUNS (default: the
newest pipeline run's two models), sends ``--requests`` uploads of a phantom slice from ``--concurrency``
threads at once (model ``all``: every request runs both models) and prints the errors (any status other
than 200), the latency percentiles and the throughput. Side by side, in the same run, the same load on
``GET /health`` shows what the server itself costs without a model. With ``--engines keras onnx openvino``
the server is started once per inference engine (``METASEG_ENGINE``, :mod:`metaseg_tf.inference.engines`; the runs'
exports are made on first use) and the same load is sent to each, one after another; with ``--workers 1 2``
once more per number of uvicorn worker processes (``metaseg serve --workers``). Keras inference is serialised
per model by a lock; the ONNX Runtime and OpenVINO engines run concurrent requests in parallel outside the GIL.
``--level K`` serves U-Net++ pruned to level K (``METASEG_LEVEL``).

Usage: ``python benchmarks/bench_serve.py [--runs RUN RUN] [--requests 200 --concurrency 200]
[--engines keras onnx openvino] [--workers 1 2] [--level K]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests

from metaseg_tf.data import discover_pairs, generate_phantom
from metaseg_tf.serve.served import newest_pipeline_runs
from metaseg_tf.serve.launch import api_command
from timing import wait_for_api


def _load(url: str, n: int, concurrency: int, upload: bytes | None) -> tuple[np.ndarray, int, float]:
    def one(_: int) -> tuple[float, int]:
        started = time.perf_counter()
        try:
            if upload is None:
                response = requests.get(url, timeout=600)
            else:
                response = requests.post(url, files={"file": ("slice.png", upload)}, data={"model": "all"}, timeout=600)
            status = response.status_code
        except requests.RequestException:
            status = -1
        return time.perf_counter() - started, status

    started = time.perf_counter()
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        results = list(pool.map(one, range(n)))
    wall = time.perf_counter() - started
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    errors = sum(status != 200 for _, status in results)
    return latencies, errors, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, nargs="+")
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--engines", nargs="+", default=["keras"], choices=("keras", "onnx", "openvino"))
    parser.add_argument("--workers", type=int, nargs="+", default=[1])
    parser.add_argument("--level", type=int, help="serve U-Net++ pruned to this level")
    args = parser.parse_args()

    runs = args.runs or newest_pipeline_runs()
    with tempfile.TemporaryDirectory() as tmp:
        phantom = generate_phantom(Path(tmp) / "phantom", n_patients=1, n_slices=4, size=256, seed=5, progress=False)
        upload = discover_pairs(phantom.root).pairs[2].image_path.read_bytes()
    print(f"serving {', '.join(Path(r).name for r in runs)}; {args.requests} requests, {args.concurrency} "
          f"concurrent, 256x256 PNG upload, model=all, U-Net++ level {args.level or 'whole'}; "
          f"CPU count {os.cpu_count()}")
    print(f"{'engine':<10}{'workers':>8}  {'endpoint':<16}{'errors':>8}{'p50 ms':>10}{'p95 ms':>10}{'p99 ms':>10}{'max ms':>10}"
          f"{'req/s':>9}")
    for workers in args.workers:
        for engine in args.engines:
            _serve_and_load(runs, engine, workers, upload, args)


def _serve_and_load(runs: list[Path], engine: str, workers: int, upload: bytes, args: argparse.Namespace) -> None:
    environment = {**os.environ, "METASEG_SERVE_RUNS": os.pathsep.join(str(Path(r).resolve()) for r in runs),
                   "METASEG_ENGINE": engine, "METASEG_LEVEL": str(args.level or "")}
    server = subprocess.Popen(api_command("127.0.0.1", args.port, workers), env=environment)
    base = f"http://127.0.0.1:{args.port}"
    try:
        wait_for_api(base, server, 180)
        _load(f"{base}/predict", 4 * workers, 2 * workers, upload)  # warm-up: every worker's models
        for name, url, payload in (("GET /health", f"{base}/health", None), ("POST /predict", f"{base}/predict", upload)):
            latencies, errors, wall = _load(url, args.requests, args.concurrency, payload)
            p50, p95, p99 = np.percentile(latencies, [50, 95, 99])
            print(f"{engine:<10}{workers:>8}  {name:<16}{errors:>8}{p50:>10.0f}{p95:>10.0f}{p99:>10.0f}{latencies.max():>10.0f}"
                  f"{args.requests / wall:>9.1f}")
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
