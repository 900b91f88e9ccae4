"""Timing helpers the benchmark scripts share (``python benchmarks/bench_*.py`` puts this folder on the path)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

Label = TypeVar("Label")


def images_per_second(step: Callable[[], object], steps: int, images: int) -> float:
    """Images per second of ``steps`` calls of ``step``, each handling ``images`` images (wall clock)."""
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * images / (time.perf_counter() - start)


def rotated(labels: Sequence[Label], round_index: int, rounds: int) -> list[Label]:
    """The order of ``labels`` in round ``round_index`` of ``rounds``: rotated so that the first place moves
    evenly through the list over the rounds, and machine drift does not always favour the same row."""
    shift = round_index * len(labels) // max(rounds, 1)
    return [*labels[shift:], *labels[:shift]]


def wait_for_api(base_url: str, server: subprocess.Popen, seconds: float = 300) -> None:
    """Return once the API started as ``server`` answers ``GET /health``; exits if it dies or never does."""
    import requests

    deadline = time.time() + seconds
    while True:
        try:
            if requests.get(f"{base_url}/health", timeout=2).ok:
                return
        except requests.RequestException:
            if time.time() > deadline or server.poll() is not None:
                raise SystemExit("the API did not start") from None
            time.sleep(0.5)
