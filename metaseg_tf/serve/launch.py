"""``metaseg serve``: start the API (uvicorn) and the UI (Streamlit) as child processes, stop both together.

Everything stays on this machine (loopback by default) and works offline; Streamlit's usage statistics
are switched off.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from metaseg_tf.serve.api import ServeError, load_models, newest_pipeline_runs

UI_SCRIPT = Path(__file__).with_name("ui.py")


def api_command(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn serving the API from the environment; ``workers`` > 1: that many processes, each with its own
    copy of the models, sharing the port."""
    return [sys.executable, "-m", "uvicorn", "metaseg_tf.serve.api:app_from_environment", "--factory",
            "--host", host, "--port", str(port), "--log-level", "warning",
            *(["--workers", str(workers)] if workers > 1 else [])]


def ui_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false"]


def serve(runs: Sequence[Path] | None = None, host: str = "127.0.0.1", api_port: int = 8000, ui_port: int = 8501,
          api: bool = True, ui: bool = True, api_url: str | None = None, engine: str = "keras",
          level: int | None = None, workers: int = 1) -> int:
    """Run the chosen parts until one exits or Ctrl-C; returns the first non-zero exit status (else 0).
    ``engine``: how the API runs the networks (keras, onnx or openvino; :mod:`metaseg_tf.inference.engines`); ``level``:
    serve U-Net++ pruned to that level; ``workers``: API server processes."""
    if workers < 1:
        raise ServeError(f"workers must be >= 1, got {workers}")
    environment = dict(os.environ, METASEG_ENGINE=engine, METASEG_LEVEL="" if level is None else str(level))
    children: list[tuple[str, subprocess.Popen]] = []
    if api:
        run_dirs = list(runs) if runs else newest_pipeline_runs()
        load_models(run_dirs, engine, level)  # fail here, in one line, if a run cannot be loaded (exports made once)
        environment["METASEG_SERVE_RUNS"] = os.pathsep.join(str(Path(r).resolve()) for r in run_dirs)
        children.append(("API", subprocess.Popen(api_command(host, api_port, workers), env=environment)))
        print(f"API  http://{host}:{api_port}  (docs at /docs) serving {', '.join(Path(r).name for r in run_dirs)}")
    if ui:
        environment["METASEG_API_URL"] = api_url or f"http://{host}:{api_port}"
        children.append(("UI", subprocess.Popen(ui_command(host, ui_port), env=environment)))
        print(f"UI   http://{host}:{ui_port}  (backend {environment['METASEG_API_URL']})")
    try:
        while all(child.poll() is None for _, child in children):
            time.sleep(0.5)
    except KeyboardInterrupt:
        print("stopping")
    finally:
        for _, child in children:
            if child.poll() is None:
                child.terminate()
        for _, child in children:
            try:
                child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                child.kill()
    failed = [(name, child.returncode) for name, child in children if child.returncode not in (0, None, -15)]
    for name, code in failed:
        print(f"{name} exited with status {code}", file=sys.stderr)
    return failed[0][1] if failed else 0
