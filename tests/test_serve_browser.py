"""End to end in a real headless Chromium: `metaseg serve` starts API and UI on loopback; a person uploads a
phantom slice with its mask and sees four image panels and the metrics, or a phantom case's three sequences,
moves the slice slider and downloads each model's seg. Streamlit's developer menu ("Deploy") is not offered."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import free_port

from metaseg_tf.data.volumes import canonical_shape

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


@pytest.fixture(scope="module")
def served_app(served_runs: list[Path], tmp_path_factory: pytest.TempPathFactory):
    """`metaseg serve` (API and UI) on loopback ports: ``(UI port, log file)``; stopped with SIGTERM after the
    module, which must end it cleanly."""
    chromium = _chromium()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    api_port, ui_port = free_port(), free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "metaseg_tf.cli", "serve", "--runs", *map(str, served_runs),
         "--api-port", str(api_port), "--ui-port", str(ui_port)], stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        _wait_for(f"http://127.0.0.1:{api_port}/health", server)
        _wait_for(f"http://127.0.0.1:{ui_port}/_stcore/health", server)
        yield chromium, ui_port
    finally:
        server.terminate()
        server.wait(timeout=60)
    assert server.returncode == 0, log.read_text()[-3000:]


def _page(playwright, chromium: str, ui_port: int):
    browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox", "--disable-gpu"])
    page = browser.new_page(viewport={"width": 1500, "height": 1100}, accept_downloads=True)
    page.goto(f"http://127.0.0.1:{ui_port}", wait_until="domcontentloaded")
    return browser, page


def _upload_in_mode(page, mode: str, prompt: str, paths: list[Path]) -> None:
    """Choose the input ``mode``, upload ``paths`` once its ``prompt`` shows, wait for the original and both
    models' panels."""
    from playwright.sync_api import expect

    expect(page.get_by_text("Upload a slice")).to_be_visible(timeout=90_000)
    page.get_by_text(mode, exact=True).click()
    expect(page.get_by_text(prompt)).to_be_visible(timeout=30_000)
    page.locator('input[type="file"]').nth(0).set_input_files([str(path) for path in paths])
    for caption in ("original", "nested_unet", "attention_unet"):
        expect(page.get_by_alt_text(caption, exact=True)).to_be_visible(timeout=120_000)


def test_upload_shows_four_panels_and_metrics(served_app, phantom_slice: tuple[Path, Path], tmp_path: Path) -> None:
    chromium, ui_port = served_app
    from playwright.sync_api import expect, sync_playwright

    image_path, mask_path = phantom_slice
    with sync_playwright() as playwright:
        browser, page = _page(playwright, chromium, ui_port)
        expect(page.get_by_text("Upload a slice")).to_be_visible(timeout=90_000)
        assert page.get_by_test_id("stAppDeployButton").count() == 0
        assert page.get_by_text("Deploy", exact=True).count() == 0, "no cloud deploy offered to a radiologist"
        uploads = page.locator('input[type="file"]')
        uploads.nth(0).set_input_files(str(image_path))
        # the rerun the image starts must end before the mask is given, or a busy machine can drop the mask
        expect(page.get_by_alt_text("original", exact=True)).to_be_visible(timeout=90_000)
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


def test_a_volume_upload_browses_its_slices_and_downloads_each_seg(served_app, brats_phantom_dir: Path,
                                                                   tmp_path: Path) -> None:
    """A phantom BraTS-METS case's t1c, t2f and t1n (the served models' order) uploaded in the volume mode."""
    chromium, ui_port = served_app
    import nibabel as nib
    from playwright.sync_api import expect, sync_playwright

    case = sorted(brats_phantom_dir.glob("BraTS-MET-*"))[0]
    sequences = [next(case.glob(f"*-{name}.nii.gz")) for name in ("t1c", "t2f", "t1n")]
    shape = nib.load(sequences[0]).shape
    slices = canonical_shape(shape, nib.load(sequences[0]).affine)[0]
    with sync_playwright() as playwright:
        browser, page = _page(playwright, chromium, ui_port)
        _upload_in_mode(page, "NIfTI volume", "Upload a NIfTI volume", sequences)
        caption = page.get_by_text(f"{case.name}: {'x'.join(map(str, shape))} voxels")
        expect(caption).to_be_visible()
        slider = page.get_by_role("slider")
        slider.focus()
        slider.press("Home")
        expect(page.get_by_text(f"slice 1 of {slices}", exact=False)).to_be_visible(timeout=30_000)
        slider.press("ArrowRight")
        expect(page.get_by_text(f"slice 2 of {slices}", exact=False)).to_be_visible(timeout=30_000)
        for model in ("nested_unet", "attention_unet"):
            with page.expect_download(timeout=30_000) as download:
                page.get_by_role("button", name=f"{model}: {case.name}-seg.nii.gz").click()
            saved = tmp_path / f"{model}-{download.value.suggested_filename}"
            download.value.save_as(saved)
            seg = nib.load(saved)
            assert download.value.suggested_filename == f"{case.name}-seg.nii.gz"
            assert seg.shape == shape and set(np.unique(np.asarray(seg.dataobj))) <= {0, 1}
        browser.close()


def test_a_dicom_series_upload_shows_the_series_and_downloads_a_seg_that_highdicom_reads(
        served_app, brats_phantom_dir: Path, tmp_path: Path) -> None:
    """A phantom case written as three DICOM MR series (the tests' pydicom writer) uploaded file by file in the
    DICOM mode: the slices are browsed, the lesion and per-model tables shown, and each model's DICOM SEG
    downloaded, read by highdicom and found to reference the uploaded T1c series."""
    chromium, ui_port = served_app
    import highdicom as hd
    import pydicom
    from helpers.dicom_series import write_case
    from playwright.sync_api import expect, sync_playwright

    case = sorted(brats_phantom_dir.glob("BraTS-MET-*"))[0]
    study = write_case(case, tmp_path / "study", {"t1c": "AX T1 POST GD", "t2f": "T2 FLAIR AX", "t1n": "T1 SE pre"})
    files = sorted(study.rglob("*.dcm"))
    t1c_uids = {str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
                for path in sorted((study / "series1").glob("*.dcm"))}
    with sync_playwright() as playwright:
        browser, page = _page(playwright, chromium, ui_port)
        _upload_in_mode(page, "DICOM series", "Upload a DICOM series", files)
        expect(page.get_by_text("DICOM series found: 3")).to_be_visible()
        slider = page.get_by_role("slider")
        slider.focus()
        slider.press("Home")
        expect(page.get_by_text("slice 1 of 8", exact=False)).to_be_visible(timeout=30_000)
        for model in ("nested_unet", "attention_unet"):
            with page.expect_download(timeout=30_000) as download:
                page.get_by_role("button", name=f"{model}: dicom-case-seg.dcm (DICOM SEG)").click()
            saved = tmp_path / f"{model}-{download.value.suggested_filename}"
            download.value.save_as(saved)
            seg = hd.seg.segread(str(saved))
            assert seg.Modality == "SEG" and seg.SegmentSequence[0].SegmentLabel
            referenced = {str(item.ReferencedSOPInstanceUID) for series in seg.ReferencedSeriesSequence
                          for item in series.ReferencedInstanceSequence}
            assert referenced == t1c_uids
        browser.close()
