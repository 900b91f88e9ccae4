"""Access token, bounded work, audit lines and a clean stop: metaseg_tf.serve.guard and metaseg_tf.serve.launch,
through the app and as a live `metaseg serve` process."""

from __future__ import annotations

import asyncio
import gzip
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import psutil
import pytest
import requests
from conftest import free_port
from fastapi import HTTPException
from fastapi.testclient import TestClient

from metaseg_tf.cli import main
from metaseg_tf.serve.api import create_app
from metaseg_tf.serve.guard import JobGate, default_volume_jobs, is_loopback, read_token
from metaseg_tf.serve.launch import access_token
from metaseg_tf.serve.served import ServeError
from metaseg_tf.serve.uploads import ServeSettings

TOKEN = "another-test-token-0123456789abcdef"


@pytest.fixture(scope="module")
def guarded(served_runs: list[Path]) -> TestClient:
    return TestClient(create_app(served_runs, ServeSettings(token=TOKEN, volume_jobs=1, queue=1)))


def _volume() -> bytes:
    volume = np.random.default_rng(5).random((40, 36, 6)).astype(np.float32) * 1000  # 6 axial slices of 3 mm
    return gzip.compress(nib.Nifti1Image(volume, np.diag([1.0, 1.0, 3.0, 1.0])).to_bytes())


def test_every_route_but_health_needs_the_token(guarded: TestClient, phantom_slice) -> None:
    assert guarded.get("/health").status_code == 200
    for path in ("/models", "/limits", "/docs", "/openapi.json"):
        refused = guarded.get(path)
        assert refused.status_code == 401 and refused.headers["WWW-Authenticate"] == "Bearer", path
        assert "access token" in refused.json()["detail"]
        assert guarded.get(path, headers={"Authorization": "Bearer " + TOKEN[:-1] + "x"}).status_code == 401
        assert guarded.get(path, headers={"Authorization": f"Basic {TOKEN}"}).status_code == 401
        assert guarded.get(path, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200, path
        assert guarded.get(path, headers={"X-API-Token": TOKEN}).status_code == 200, path
    image = phantom_slice[0].read_bytes()
    assert guarded.post("/predict", files={"file": ("s.png", image)}).status_code == 401
    assert guarded.post("/predict/volume", files={"files": ("v.nii.gz", _volume())}).status_code == 401
    answered = guarded.post("/predict", files={"file": ("s.png", image)}, headers={"X-API-Token": TOKEN})
    assert answered.status_code == 200 and len(answered.json()["predictions"]) == 2


def test_a_token_is_read_from_its_flag_file_or_environment(tmp_path: Path) -> None:
    (tmp_path / "token").write_text(f"  {TOKEN}\nsecond line ignored\n")
    assert read_token(TOKEN, environ={}) == TOKEN
    assert read_token(token_file=tmp_path / "token", environ={}) == TOKEN
    assert read_token(environ={"METASEG_API_TOKEN": TOKEN}) == TOKEN
    assert read_token(environ={"METASEG_API_TOKEN_FILE": str(tmp_path / "token")}) == TOKEN
    assert read_token(environ={}) is None
    with pytest.raises(ValueError, match="at least 16"):
        read_token("short", environ={})
    with pytest.raises(ValueError, match="cannot read the token file"):
        read_token(token_file=tmp_path / "missing", environ={})


def test_binding_beyond_loopback_needs_a_token_or_an_explicit_no_auth(monkeypatch: pytest.MonkeyPatch,
                                                                    capsys) -> None:
    monkeypatch.delenv("METASEG_API_TOKEN", raising=False)
    monkeypatch.delenv("METASEG_API_TOKEN_FILE", raising=False)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("10.1.2.3") and not is_loopback("pacs-gw.example")
    assert access_token("127.0.0.1") is None
    assert access_token("0.0.0.0", token=TOKEN) == TOKEN and access_token("0.0.0.0", no_auth=True) is None
    with pytest.raises(ServeError, match="lets everyone on the network use the service"):
        access_token("0.0.0.0")
    with pytest.raises(ServeError, match="exclude each other"):
        access_token("0.0.0.0", token=TOKEN, no_auth=True)
    # the command refuses in one line, before it loads or starts anything
    assert main(["serve", "--api-only", "--host", "0.0.0.0", "--runs", "/nonexistent"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and "--no-auth on a trusted network" in error


def test_the_default_number_of_volume_jobs_follows_memory_and_cores() -> None:
    gib = 1024**3
    assert default_volume_jobs(40_000_000, memory_bytes=24 * gib, cpus=2) == 2
    assert default_volume_jobs(40_000_000, memory_bytes=24 * gib, cpus=64) == 7  # 12 GiB / 1.68 GB a job
    assert default_volume_jobs(40_000_000, memory_bytes=2 * gib, cpus=8) == 1


def _run(coroutine):
    return asyncio.run(coroutine)


def test_a_gate_runs_at_most_its_jobs_and_refuses_beyond_its_queue() -> None:
    gate, release, running, peak = JobGate("volume", jobs=2, queue=1, timeout_s=30), threading.Event(), [0], [0]
    lock = threading.Lock()

    def work() -> str:
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        release.wait(10)
        with lock:
            running[0] -= 1
        return "done"

    async def scenario() -> tuple[list, HTTPException]:
        admitted = [asyncio.ensure_future(gate.run(work)) for _ in range(3)]
        while gate.admitted < 3:
            await asyncio.sleep(0.01)
        with pytest.raises(HTTPException) as full:
            await gate.run(work)
        release.set()
        return await asyncio.gather(*admitted), full.value

    results, full = _run(scenario())
    assert results == ["done"] * 3 and peak[0] == 2 and gate.admitted == 0 and gate.refused == 1
    assert full.status_code == 503 and "2 volume prediction(s) running and 1 waiting" in full.detail
    assert int(full.headers["Retry-After"]) >= 1


def test_a_gate_answers_in_time_and_frees_a_place_only_when_its_job_ends() -> None:
    gate, release = JobGate("slice", jobs=1, queue=4, timeout_s=0.3), threading.Event()

    async def scenario() -> tuple[HTTPException, HTTPException, int]:
        running = asyncio.ensure_future(gate.run(lambda: release.wait(10)))
        await asyncio.sleep(0.05)
        with pytest.raises(HTTPException) as waited:  # never got a place: 503, and it leaves the queue
            await gate.run(lambda: "never run")
        with pytest.raises(HTTPException) as slow:
            await running
        held = gate.admitted  # the timed-out job still runs and still holds its place
        release.set()
        while gate.admitted:
            await asyncio.sleep(0.01)
        return waited.value, slow.value, held

    waited, slow, held = _run(scenario())
    assert waited.status_code == 503 and "waited 0.3 s for a free place" in waited.detail and "Retry-After" in waited.headers
    assert slow.status_code == 504 and "took longer than the limit of 0.3 s" in slow.detail
    assert held == 1 and gate.admitted == 0


def test_closing_a_gate_answers_what_waits_with_503_and_frees_every_place() -> None:
    gate, release = JobGate("volume", jobs=1, queue=2, timeout_s=30), threading.Event()

    async def scenario() -> tuple[str, HTTPException]:
        running = asyncio.ensure_future(gate.run(lambda: release.wait(10) and "finished"))
        waiting = asyncio.ensure_future(gate.run(lambda: "never run"))
        while gate.admitted < 2:
            await asyncio.sleep(0.01)
        gate.close()  # as at a stop: what waits is dropped, what runs finishes
        with pytest.raises(HTTPException) as dropped:
            await waiting
        release.set()
        return await running, dropped.value

    finished, dropped = _run(scenario())
    assert finished == "finished" and dropped.status_code == 503 and "stopping" in dropped.detail
    assert gate.admitted == 0
    gate.open()
    assert _run(gate.run(lambda: "again")) == "again" and gate.admitted == 0


def test_a_full_volume_queue_answers_503_with_retry_after(served_runs: list[Path]) -> None:
    """One volume job at a time and one waiting (``volume_jobs=1, queue=1``): while a prediction is held, a
    second request waits and a third gets 503; then both admitted ones are answered."""
    app = create_app(served_runs, ServeSettings(volume_jobs=1, queue=1))
    client, release = TestClient(app), threading.Event()
    served = app.state.models["nested_unet"]
    predict_volume = served.predictor.predict_volume

    def held(volume):
        release.wait(60)
        return predict_volume(volume)

    served.predictor.predict_volume = held
    answers: list = []

    def post() -> None:
        answers.append(client.post("/predict/volume", files={"files": ("v.nii.gz", _volume())},
                                   data={"model": "nested_unet"}))

    threads = [threading.Thread(target=post) for _ in range(2)]
    try:
        for thread in threads:
            thread.start()
        deadline = time.time() + 60
        while client.get("/limits").json()["jobs"]["volume"]["admitted"] < 2 and time.time() < deadline:
            time.sleep(0.05)
        refused = client.post("/predict/volume", files={"files": ("v.nii.gz", _volume())})
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
    assert refused.status_code == 503 and int(refused.headers["Retry-After"]) >= 1
    assert "1 volume prediction(s) running and 1 waiting" in refused.json()["detail"]
    assert [answer.status_code for answer in answers] == [200, 200]
    limits = client.get("/limits").json()["jobs"]
    assert limits["volume"] == {"at_once": 1, "queue": 1, "timeout_s": 900.0, "admitted": 0, "refused": 1}
    assert limits["slice"]["at_once"] == os.cpu_count() and limits["slice"]["timeout_s"] == 120.0


def test_every_request_leaves_one_audit_line_without_patient_data(guarded: TestClient, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="metaseg_tf.serve.audit"):
        guarded.post("/predict/volume", files={"files": ("BraTS-MET-00110-000-t1c.nii.gz", _volume())},
                     data={"model": "attention_unet"}, headers={"Authorization": f"Bearer {TOKEN}"})
        guarded.get("/models")
    lines = [record.getMessage() for record in caplog.records if record.name == "metaseg_tf.serve.audit"]
    assert len(lines) == 2
    assert lines[0].startswith("audit method=POST route=/predict/volume status=200 bytes=")
    assert "model=attention_unet" in lines[0] and " ms=" in lines[0]
    assert lines[1].startswith("audit method=GET route=/models status=401")
    assert not any("BraTS" in line or TOKEN in line for line in lines)


def test_a_request_cannot_write_a_line_of_its_own_into_the_audit_log(guarded: TestClient, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="metaseg_tf.serve.audit"):
        guarded.get("/%0Aaudit method=POST route=/predict status=200")
        guarded.post("/predict", files={"file": ("s.png", b"x")}, data={"model": "Jane Doe, born 1950"},
                     headers={"X-API-Token": TOKEN})
    lines = [record.getMessage() for record in caplog.records if record.name == "metaseg_tf.serve.audit"]
    assert len(lines) == 2 and all("\n" not in line for line in lines)
    assert "route=/\\naudit\\x20method=POST" in lines[0] and lines[0].count(" route=") == 1
    assert "model=unknown" in lines[1] and "Jane" not in lines[1]


def test_children_that_ignore_sigterm_are_killed_with_their_whole_group(tmp_path: Path) -> None:
    from metaseg_tf.serve.launch import stop_children

    stubborn = ("import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
                "subprocess.Popen([sys.executable, '-c', 'import signal, time; "
                "signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(120)']); time.sleep(120)")
    child = subprocess.Popen([sys.executable, "-c", stubborn], start_new_session=True)
    deadline = time.time() + 30
    while len(_children(child.pid)) < 1 and time.time() < deadline:
        time.sleep(0.1)
    (grandchild,) = _children(child.pid)
    started = time.time()
    stop_children([child], grace_s=1.0)
    assert child.returncode == -signal.SIGKILL and time.time() - started < 10
    grandchild.wait(timeout=10)  # killed with the group, not left behind as an orphan
    assert not grandchild.is_running()


def _children(pid: int) -> list[psutil.Process]:
    return psutil.Process(pid).children(recursive=True)


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_stops_the_service_and_all_its_processes(served_runs: list[Path], tmp_path: Path,
                                                         workers: int) -> None:
    """As systemd, Docker and Kubernetes stop a service: SIGTERM to `metaseg serve`; it exits 0, its uvicorn
    child and that child's workers are gone, and the port is free again. On the way: the token file and the
    job limits given to `metaseg serve` are what its API process enforces."""
    port = free_port()
    log = (tmp_path / "serve.log").open("w")
    (tmp_path / "token").write_text(TOKEN + "\n")
    parts = ["--api-only"] if workers > 1 else ["--ui-port", str(free_port())]  # with one worker, the UI too
    server = subprocess.Popen([sys.executable, "-m", "metaseg_tf.cli", "serve", *parts, "--runs",
                               *map(str, served_runs), "--api-port", str(port), "--workers", str(workers),
                               "--token-file", str(tmp_path / "token"), "--volume-jobs", "3", "--queue", "5"],
                              stdout=log, stderr=subprocess.STDOUT,
                              env={**os.environ, "METASEG_API_TOKEN_FILE": str(tmp_path / "token")})
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert server.poll() is None, (tmp_path / "serve.log").read_text()[-2000:]
            try:
                if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                    break
            except requests.RequestException:
                time.sleep(0.5)
        base = f"http://127.0.0.1:{port}"
        assert requests.get(f"{base}/limits", timeout=10).status_code == 401
        limits = requests.get(f"{base}/limits", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=10).json()
        assert (limits["jobs"]["volume"]["at_once"], limits["jobs"]["volume"]["queue"]) == (3, 5)
        assert TOKEN not in " ".join(" ".join(child.cmdline()) for child in _children(server.pid))
        children = _children(server.pid)
        if workers == 1:
            (ui,) = [child for child in children if "streamlit" in " ".join(child.cmdline())]
            assert not {"METASEG_API_TOKEN", "METASEG_API_TOKEN_FILE"} & set(ui.environ()), "the UI holds no token"
        assert len(children) >= workers, "uvicorn (and its workers) run as children"
        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=60) == 0, (tmp_path / "serve.log").read_text()[-2000:]
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after SIGTERM: {alive}"
        with pytest.raises(requests.ConnectionError):
            requests.get(f"http://127.0.0.1:{port}/health", timeout=2)
        assert "stopping (SIGTERM)" in (tmp_path / "serve.log").read_text()
    finally:
        if server.poll() is None:
            server.kill()
