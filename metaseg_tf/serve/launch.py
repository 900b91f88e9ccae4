"""``metaseg serve``: start the API (uvicorn) and the UI (Streamlit) as child processes, stop both together.

Everything stays on this machine (loopback by default) and works offline; Streamlit's usage statistics and
its developer menu ("Deploy", rerun, clear cache) are switched off. Bound beyond loopback, the service needs
an access token (:func:`access_token`) or an explicit ``--no-auth``. The token reaches the API through its
environment, never its command line (which every user of the machine can read), and never the UI, whose user
types it.

SIGTERM (systemd, Docker, Kubernetes) and SIGINT (Ctrl-C) stop the service: each child's process group gets
SIGTERM, then, after ``STOP_GRACE_S`` seconds, SIGKILL for whatever is still there (uvicorn's worker
processes included), and ``serve`` returns 0. (The handlers are installed when ``serve`` runs in the main
thread; called from another thread, it stops when a child ends.) A child that ends by itself ends the service
with its exit status (128 + the signal for one killed by a signal).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from metaseg_tf.serve.guard import AccessError, is_loopback, read_token
from metaseg_tf.serve.served import ServeError, load_models, newest_pipeline_runs

UI_SCRIPT = Path(__file__).with_name("ui.py")
STOP_GRACE_S = 10.0
GRACEFUL_S = 5  # uvicorn's wait for open requests at a stop, within STOP_GRACE_S
MAX_CONNECTIONS = 256  # requests one API process takes in at once (uvicorn --limit-concurrency)
TOKEN_VARIABLES = ("METASEG_API_TOKEN", "METASEG_API_TOKEN_FILE")
# serve()'s limits -> the API's environment (metaseg_tf.serve.api.app_from_environment)
LIMIT_VARIABLES = {"volume_jobs": "METASEG_VOLUME_JOBS", "slice_jobs": "METASEG_SLICE_JOBS", "queue": "METASEG_QUEUE",
                   "volume_timeout": "METASEG_VOLUME_TIMEOUT_S", "slice_timeout": "METASEG_SLICE_TIMEOUT_S"}


def api_command(host: str, port: int, workers: int = 1) -> list[str]:
    """uvicorn serving the API from the environment; ``workers`` > 1: that many processes, each with its own
    copy of the models, sharing the port. At most ``MAX_CONNECTIONS`` requests per process are taken in at
    once (uvicorn answers more with 503), so uploads still arriving are bounded too; at a stop, uvicorn waits
    ``GRACEFUL_S`` for open requests, then the gates drop what waits (503) before ``STOP_GRACE_S`` ends."""
    return [sys.executable, "-m", "uvicorn", "metaseg_tf.serve.api:app_from_environment", "--factory",
            "--host", host, "--port", str(port), "--log-level", "warning",
            "--limit-concurrency", str(MAX_CONNECTIONS), "--timeout-graceful-shutdown", str(GRACEFUL_S),
            *(["--workers", str(workers)] if workers > 1 else [])]


def ui_command(host: str, port: int) -> list[str]:
    return [sys.executable, "-m", "streamlit", "run", str(UI_SCRIPT), "--server.address", host,
            "--server.port", str(port), "--server.headless", "true", "--browser.gatherUsageStats", "false",
            "--client.toolbarMode", "viewer"]


def access_token(host: str, token: str | None = None, token_file: str | Path | None = None,
                 no_auth: bool = False) -> str | None:
    """The token the API runs with (:func:`~metaseg_tf.serve.guard.read_token`: ``token``, ``token_file``,
    else the environment), or None. Binding ``host`` beyond loopback without one is refused unless
    ``no_auth`` says the network is trusted."""
    try:
        found = read_token(token, token_file)
    except AccessError as error:
        raise ServeError(str(error)) from None
    if found is not None and no_auth:
        raise ServeError("--no-auth and an access token exclude each other: choose one")
    if found is None and not no_auth and not is_loopback(host):
        raise ServeError(f"--host {host} lets everyone on the network use the service: give an access token "
                         "(--token-file FILE or METASEG_API_TOKEN), or --no-auth on a trusted network")
    return found


def stop_children(children: Sequence[subprocess.Popen], grace_s: float = STOP_GRACE_S) -> None:
    """SIGTERM to each child's process group, then SIGKILL to the groups still there after ``grace_s``."""
    for child in children:
        if child.poll() is None:
            _signal_group(child, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for child in children:
        try:
            child.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for child in children:  # the group too: a worker can outlive its uvicorn supervisor
        _signal_group(child, signal.SIGKILL)
        child.wait()


def _signal_group(child: subprocess.Popen, sig: signal.Signals) -> None:
    try:
        os.killpg(child.pid, sig)
    except (ProcessLookupError, PermissionError):  # the group is gone already
        pass


def serve(runs: Sequence[Path] | None = None, host: str = "127.0.0.1", api_port: int = 8000, ui_port: int = 8501,
          api: bool = True, ui: bool = True, api_url: str | None = None, engine: str = "keras",
          level: int | None = None, workers: int = 1, token: str | None = None,
          token_file: str | Path | None = None, no_auth: bool = False,
          limits: dict[str, float | None] | None = None) -> int:
    """Run the chosen parts until one exits, SIGTERM or Ctrl-C; returns the first non-zero exit status of a
    child that failed by itself (else 0). ``engine``: how the API runs the networks (keras, onnx or openvino;
    :mod:`metaseg_tf.inference.engines`); ``level``: serve U-Net++ pruned to that level; ``workers``: API server
    processes; ``token``/``token_file``/``no_auth``: :func:`access_token`; ``limits``: the API's job limits by
    their ``LIMIT_VARIABLES`` names (None: the default; :class:`~metaseg_tf.serve.uploads.ServeSettings`)."""
    if workers < 1:
        raise ServeError(f"workers must be >= 1, got {workers}")
    environment = {name: value for name, value in os.environ.items() if name not in TOKEN_VARIABLES}
    environment.update(METASEG_ENGINE=engine, METASEG_LEVEL="" if level is None else str(level),
                       **{LIMIT_VARIABLES[name]: str(value) for name, value in (limits or {}).items() if value is not None})
    found = access_token(host, token, token_file, no_auth) if api else None
    run_dirs = (list(runs) if runs else newest_pipeline_runs()) if api else []
    if api:
        load_models(run_dirs, engine, level)  # fail here, in one line, if a run cannot be loaded (exports made once)
    stop = threading.Event()
    received: list[str] = []

    def on_signal(signum: int, _frame: object) -> None:  # sets a flag only: a second signal cannot interrupt
        received.append(signal.Signals(signum).name)
        stop.set()

    handled = threading.current_thread() is threading.main_thread()  # elsewhere the caller stops us
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)} if handled else {}
    children: list[tuple[str, subprocess.Popen]] = []
    ended: list[tuple[str, int]] = []
    try:
        if api:
            api_environment = {**environment, "METASEG_SERVE_RUNS": os.pathsep.join(str(Path(r).resolve()) for r in run_dirs),
                               **({"METASEG_API_TOKEN": found} if found else {})}
            children.append(("API", subprocess.Popen(api_command(host, api_port, workers), env=api_environment,
                                                     start_new_session=True)))
            print(f"API  http://{host}:{api_port}  (docs at /docs) serving {', '.join(Path(r).name for r in run_dirs)}; "
                  + ("access token required (on /docs too)" if found else "no access token"), flush=True)
            if no_auth and not is_loopback(host):
                print(f"WARNING: --no-auth: everyone who reaches {host}:{api_port} can send images to the models and "
                      "read their masks; use it only on a trusted network", file=sys.stderr, flush=True)
        if ui:
            environment["METASEG_API_URL"] = api_url or f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{api_port}"
            children.append(("UI", subprocess.Popen(ui_command(host, ui_port), env=environment, start_new_session=True)))
            print(f"UI   http://{host}:{ui_port}  (backend {environment['METASEG_API_URL']})", flush=True)
        while not stop.is_set() and not ended:
            stop.wait(0.5)
            ended = [(name, child.returncode) for name, child in children if child.poll() is not None]
        if received:
            print(f"stopping ({received[0]})", flush=True)
    finally:
        stop_children([child for _, child in children])
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    failed = [(name, code if code >= 0 else 128 - code) for name, code in ended if code != 0]  # by itself
    for name, code in failed:
        print(f"{name} exited with status {code}", file=sys.stderr)
    return failed[0][1] if failed else 0
