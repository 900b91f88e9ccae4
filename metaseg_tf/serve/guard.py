"""What stands between the network and the models: the access token, the admission of work, one audit line
per request.

- :class:`TokenGate` (ASGI middleware): every route but ``/health`` needs the service's access token, sent as
  ``Authorization: Bearer <token>`` or ``X-API-Token: <token>`` and compared in constant time
  (:func:`hmac.compare_digest`); otherwise 401 with ``WWW-Authenticate: Bearer``. Without a token (a loopback
  service, or ``--no-auth``) everyone who reaches the port gets in.
- :class:`JobGate`: at most ``jobs`` predictions of one kind (volumes, slices) run at once, each in the gate's
  own threads, at most ``queue`` more wait (first come, first served) and a request that would wait beyond
  them gets 503 with ``Retry-After``; a request that is not answered within ``timeout_s`` (waiting included)
  gets 503 if it never started (and is dropped from the queue) or 504 if it was running (its job finishes and
  only then frees its place, so the bound on memory holds). A waiting request holds its spooled upload
  (Starlette keeps an upload over 1 MB on disk) and no thread.
- :class:`AuditLog` (ASGI middleware): one line per request on the ``metaseg_tf.serve.audit`` logger: method,
  route, status, request bytes, milliseconds, the model asked for and the client's address; never a file
  name, a case id, an image or the token.

The limits' defaults come from the machine (:func:`default_volume_jobs`) and are documented in README's
"Web app" section; ``benchmarks/bench_serve_load.py`` measures the memory they bound.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import ipaddress
import logging
import math
import os
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from fastapi import HTTPException
from fastapi.responses import JSONResponse

OPEN_PATHS = frozenset({"/health"})  # liveness probes of systemd, Docker and Kubernetes carry no token
TOKEN_HEADER = "x-api-token"
MIN_TOKEN_LENGTH = 16
# peak resident bytes of one volume job per voxel of the uploaded grid (3 sequences, both models, the segs
# written back): 41.1 measured by benchmarks/bench_serve_load.py on a real 256x256x224 case (results/benchmarks.md)
VOLUME_JOB_BYTES_PER_VOXEL = 42
WAITING_BYTES_PER_FILE = 1024 * 1024  # what a waiting upload keeps in memory: Starlette spools the rest to disk
MEMORY_SHARE = 0.5  # of the machine's memory, what the volume jobs together may take by default

audit_logger = logging.getLogger("metaseg_tf.serve.audit")
T = TypeVar("T")


class AccessError(ValueError):
    """The access token cannot be used as given (empty, too short, an unreadable file)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address or ``localhost``) reaches only this machine."""
    if host.lower() in ("localhost", "localhost.localdomain"):
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


def read_token(token: str | None = None, token_file: str | Path | None = None,
               environ: dict[str, str] | None = None) -> str | None:
    """The access token: ``token``, else the first line of ``token_file``, else ``METASEG_API_TOKEN``, else
    the file named by ``METASEG_API_TOKEN_FILE``; None when none is given. A token shorter than
    ``MIN_TOKEN_LENGTH`` characters is refused (``python -c "import secrets; print(secrets.token_urlsafe())"``
    makes a good one)."""
    environ = os.environ if environ is None else environ
    if token is None and token_file is None:
        token, token_file = environ.get("METASEG_API_TOKEN") or None, environ.get("METASEG_API_TOKEN_FILE") or None
    if token is None and token_file is not None:
        try:
            token = (Path(token_file).read_text().splitlines() or [""])[0]
        except OSError as error:
            raise AccessError(f"cannot read the token file {token_file}: {error.strerror}") from None
    if token is None:
        return None
    token = token.strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise AccessError(f"the access token has {len(token)} characters; use at least {MIN_TOKEN_LENGTH} "
                          "(e.g. python -c \"import secrets; print(secrets.token_urlsafe())\")")
    return token


def _sent_token(headers: dict[bytes, bytes]) -> bytes:
    authorization = headers.get(b"authorization", b"")
    scheme, _, value = authorization.partition(b" ")
    if scheme.lower() == b"bearer" and value:
        return value.strip()
    return headers.get(TOKEN_HEADER.encode(), b"").strip()


class TokenGate:
    """ASGI middleware: 401 for a request to any path outside ``OPEN_PATHS`` that does not carry ``token``
    (None: let everyone in)."""

    def __init__(self, app: Any, token: str | None) -> None:
        self.app, self.token = app, None if token is None else token.encode()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if self.token is None or scope["type"] != "http" or scope.get("path") in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        if not hmac.compare_digest(_sent_token(dict(scope.get("headers", []))), self.token):
            response = JSONResponse({"detail": "an access token is needed: send 'Authorization: Bearer <token>'"},
                                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)


def machine_memory_bytes() -> int | None:
    """This machine's physical memory, or None where the system does not say."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


def default_volume_jobs(max_voxels: int, memory_bytes: int | None = None, cpus: int | None = None) -> int:
    """Volume jobs at once by default: as many as ``MEMORY_SHARE`` of the machine's memory holds at the
    worst case (``max_voxels`` at ``VOLUME_JOB_BYTES_PER_VOXEL``), and no more than its cores (more would
    only share them), at least 1."""
    memory_bytes = machine_memory_bytes() if memory_bytes is None else memory_bytes
    cpus = cpus or os.cpu_count() or 1
    if memory_bytes is None:
        return 1
    return max(1, min(cpus, math.floor(MEMORY_SHARE * memory_bytes / (max_voxels * VOLUME_JOB_BYTES_PER_VOXEL))))


class JobGate:
    """At most ``jobs`` calls of one kind at once, ``queue`` more waiting, each answered within ``timeout_s``
    (see the module docstring); ``kind`` names them in the answers ("volume", "slice")."""

    def __init__(self, kind: str, jobs: int, queue: int, timeout_s: float) -> None:
        if jobs < 1 or queue < 0 or timeout_s <= 0:
            raise ValueError(f"{kind} jobs must be >= 1, the queue >= 0 and the time limit > 0 "
                             f"(got {jobs}, {queue}, {timeout_s})")
        self.kind, self.jobs, self.queue, self.timeout_s = kind, jobs, queue, timeout_s
        self._executor, self._closed = self._new_executor(), False
        self._lock = threading.Lock()
        self._admitted = 0  # running or waiting
        self._seconds = 0.0  # a running mean of a job's duration, for Retry-After
        self.refused = 0

    @property
    def admitted(self) -> int:
        return self._admitted

    def _retry_after(self) -> str:
        per_job = self._seconds or 5.0
        return str(max(1, math.ceil(per_job * (self._admitted - self.jobs + 1) / self.jobs)))

    def _finished(self, future: concurrent.futures.Future, seconds: list[float]) -> None:
        """A job left the gate (done, failed, or cancelled before it started): its place is free; the mean
        duration (for Retry-After) learns from jobs that succeeded only, not from quick refusals."""
        succeeded = not future.cancelled() and future.exception() is None
        with self._lock:
            self._admitted -= 1
            if succeeded and seconds:
                self._seconds = seconds[0] if not self._seconds else 0.8 * self._seconds + 0.2 * seconds[0]

    async def run(self, work: Callable[[], T]) -> T:
        """``work()`` in one of the gate's threads once a place is free; 503/504 as the module says."""
        with self._lock:
            if self._admitted >= self.jobs + self.queue:
                self.refused += 1
                raise HTTPException(503, f"busy: {self.jobs} {self.kind} prediction(s) running and {self.queue} "
                                         "waiting; try again later", headers={"Retry-After": self._retry_after()})
            self._admitted += 1
        seconds: list[float] = []

        def job() -> T:
            started = time.perf_counter()
            try:
                return work()
            finally:
                seconds.append(time.perf_counter() - started)

        try:
            future = self._executor.submit(job)
        except RuntimeError:  # the executor is shut down: the service is stopping
            with self._lock:
                self._admitted -= 1
            raise HTTPException(503, "the service is stopping", headers={"Retry-After": "30"}) from None
        future.add_done_callback(lambda done: self._finished(done, seconds))  # every way out frees the place once
        try:
            return await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(future)), self.timeout_s)
        except asyncio.TimeoutError:  # the built-in TimeoutError from Python 3.11 on, another class on 3.10
            if future.cancel():  # still in the queue: it never starts and leaves the queue now
                raise HTTPException(503, f"waited {self.timeout_s:g} s for a free place among {self.jobs} "
                                         f"{self.kind} prediction(s); try again later",
                                    headers={"Retry-After": self._retry_after()}) from None
            raise HTTPException(504, f"the {self.kind} prediction took longer than the limit of "
                                     f"{self.timeout_s:g} s") from None
        except asyncio.CancelledError:
            if future.cancelled():  # dropped from the queue by close(): the service is stopping
                raise HTTPException(503, "the service is stopping", headers={"Retry-After": "30"}) from None
            raise

    def _new_executor(self) -> concurrent.futures.ThreadPoolExecutor:
        return concurrent.futures.ThreadPoolExecutor(self.jobs, thread_name_prefix=f"metaseg-{self.kind}")

    def open(self) -> None:
        """Take work again after :meth:`close` (an app started a second time, as test clients do)."""
        if self._closed:
            self._executor, self._closed = self._new_executor(), False

    def close(self) -> None:
        """Drop what waits (those requests get 503), let what runs finish."""
        self._closed = True
        self._executor.shutdown(wait=False, cancel_futures=True)


class AuditLog:
    """ASGI middleware: one ``audit`` line per HTTP request (see the module docstring). A route handler adds
    the model asked for as ``request.state.audit_model``."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started, status, received = time.perf_counter(), [500], [0]
        state = scope.setdefault("state", {})

        async def counted() -> dict:
            message = await receive()
            received[0] += len(message.get("body", b""))
            return message

        async def sent(message: dict) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, counted, sent)
        finally:
            client = scope.get("client") or ("-", 0)
            audit_logger.info("audit method=%s route=%s status=%d bytes=%d ms=%.1f model=%s client=%s",
                              _printable(scope.get("method", "-")), _printable(scope.get("path", "-")), status[0],
                              received[0], (time.perf_counter() - started) * 1000,
                              _printable(state.get("audit_model", "-")), _printable(str(client[0])))


def _printable(text: str, limit: int = 200) -> str:
    """``text`` as one line of at most ``limit`` characters: control characters, spaces and backslashes
    escaped, so that a request cannot write a line of its own into the audit log."""
    escaped = text.encode("unicode_escape").decode("ascii").replace(" ", "\\x20")
    return escaped if len(escaped) <= limit else escaped[:limit] + "..."
