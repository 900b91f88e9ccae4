"""End to end in a real headless Chromium: `metaseg serve` starts API and UI on loopback, a person uploads a
phantom slice with its mask and sees four image panels and the metrics."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from conftest import free_port

CHROMIUM_CANDIDATES = ("chromium", "chromium-browser", "google-chrome")


def _chromium() -> str:
    found = os.environ.get("METASEG_CHROMIUM") or next(
        (path for name in CHROMIUM_CANDIDATES if (path := shutil.which(name))), None)
    if not found:
        pytest.skip("no Chromium on this machine (Debian: apt-get install chromium; .ci/run installs it)")
    return found


def _wait_for(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"`metaseg serve` exited with status {server.returncode}")
        try:
            if requests.get(url, timeout=2).ok:
                return
        except requests.RequestException:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not come up within {seconds} s")


def test_upload_shows_four_panels_and_metrics(served_runs: list[Path], phantom_slice: tuple[Path, Path],
                                              tmp_path: Path) -> None:
    chromium = _chromium()
    from playwright.sync_api import expect, sync_playwright

    api_port, ui_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "metaseg_tf.cli", "serve", "--runs", *map(str, served_runs),
         "--api-port", str(api_port), "--ui-port", str(ui_port)],
        stdout=(tmp_path / "serve.log").open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{api_port}/health", server)
        _wait_for(f"http://127.0.0.1:{ui_port}/_stcore/health", server)
        image_path, mask_path = phantom_slice
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=chromium, headless=True,
                                                 args=["--no-sandbox", "--disable-gpu"])
            page = browser.new_page(viewport={"width": 1500, "height": 1100})
            page.goto(f"http://127.0.0.1:{ui_port}", wait_until="domcontentloaded")
            expect(page.get_by_text("Upload a slice")).to_be_visible(timeout=90_000)
            uploads = page.locator('input[type="file"]')
            uploads.nth(0).set_input_files(str(image_path))
            uploads.nth(1).set_input_files(str(mask_path))
            for caption in ("original", "ground truth", "nested_unet", "attention_unet"):
                expect(page.get_by_alt_text(caption, exact=True)).to_be_visible(timeout=90_000)
            table = page.locator('[data-testid="stTable"]')
            expect(table).to_contain_text("dice", timeout=30_000)
            for text in ("iou", "precision", "recall", "nested_unet", "attention_unet"):
                expect(table).to_contain_text(text)
            screenshot = tmp_path / "app.png"
            page.screenshot(path=str(screenshot), full_page=True)
            browser.close()
        assert screenshot.stat().st_size > 10_000
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert server.returncode in (0, -15), (tmp_path / "serve.log").read_text()[-3000:]
