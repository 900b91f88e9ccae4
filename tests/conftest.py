"""Shared fixtures: small datasets the tests write themselves, and the optional real-data folder."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import cv2
import numpy as np
import pytest

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.synthetic import generate_phantom


def write_image(path: Path, array: np.ndarray) -> Path:
    """Write ``array`` (RGB order for colour) with OpenCV, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3 and array.shape[2] in (3, 4):
        code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
        array = cv2.cvtColor(array, code)
    assert cv2.imwrite(str(path), array), path
    return path


def square_pair(size: int = 32, top: int = 8, side: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """An RGB slice with a bright square and its 0/255 mask."""
    image = np.full((size, size, 3), 40, np.uint8)
    image[top : top + side, top : top + side] = 220
    mask = np.zeros((size, size), np.uint8)
    mask[top : top + side, top : top + side] = 255
    return image, mask


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tiny_config(phantom_dir: Path, tmp_path: Path, **changes) -> ExperimentConfig:
    """A small, quick training config (32 px, filters 4-8-16, two epochs) on ``phantom_dir``."""
    settings = dict(data_dir=str(phantom_dir), cache_dir=str(tmp_path / "cache"), image_size=32,
                    filters=(4, 8, 16), batch_size=8, epochs=2, model="attention_unet", early_stopping_patience=0)
    return ExperimentConfig(**{**settings, **changes})


def add_patient_copy(data_dir: Path, source_case: str, new_case: str) -> Path:
    """Copy one kaggle_3m patient folder of ``data_dir`` under a new case id (files renamed too)."""
    target = data_dir / new_case
    target.mkdir()
    for path in (data_dir / source_case).iterdir():
        (target / path.name.replace(source_case, new_case)).write_bytes(path.read_bytes())
    return target


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small phantom (6 patients x 8 slices at 64 px), generated once per test session."""
    root = tmp_path_factory.mktemp("phantom") / "phantom"
    generate_phantom(root, n_patients=6, n_slices=8, size=64, seed=3, progress=False)
    return root


@pytest.fixture(scope="session")
def real_data() -> Path:
    """The shared real-MRI folder named by METASEG_REAL_DATA; the test is skipped without it."""
    location = os.environ.get("METASEG_REAL_DATA")
    if not location:
        pytest.skip("METASEG_REAL_DATA is not set (the shared real MRI folder); .ci/run sets it")
    root = Path(location)
    if not root.is_dir():
        pytest.skip(f"METASEG_REAL_DATA={root} is not a folder")
    return root


@pytest.fixture(scope="session")
def served_runs(phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A U-Net++ and an Attention U-Net trained for one epoch on the phantom at 32 px (real, small runs)."""
    from metaseg_tf.config import ExperimentConfig
    from metaseg_tf.training.train import train

    root = tmp_path_factory.mktemp("served")
    config = ExperimentConfig(data_dir=str(phantom_dir), cache_dir=str(root / "cache"), image_size=32,
                              filters=(4, 8, 16), batch_size=8, epochs=1, jit_compile="off")
    return [train(config.replace(model=model), runs_root=root / "runs", progress=False).run_dir
            for model in ("nested_unet", "attention_unet")]


@pytest.fixture(scope="session")
def phantom_slice(phantom_dir: Path) -> tuple[Path, Path]:
    """The phantom slice with the largest lesion: (image file, mask file)."""
    from metaseg_tf.data import discover_pairs, read_mask

    pairs = discover_pairs(phantom_dir).pairs
    pair = max(pairs, key=lambda p: int(read_mask(p.mask_path).sum()))
    return pair.image_path, pair.mask_path


@pytest.fixture(scope="session")
def brats_phantom_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small BraTS-METS-layout phantom (4 cases x 8 slices at 64 px, NIfTI, labels 1/2/3), once per session."""
    root = tmp_path_factory.mktemp("brats") / "phantom"
    generate_phantom(root, n_patients=4, n_slices=8, size=64, seed=4, progress=False, layout="brats_mets")
    return root


@pytest.fixture(scope="session")
def brats_run(brats_phantom_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A U-Net++ trained for one epoch on the BraTS phantom: multilabel (WT, TC, ET), 2.5D context of one
    slice each side, half of the lesion-free slices drawn per epoch."""
    from metaseg_tf.training.train import train

    root = tmp_path_factory.mktemp("brats_run")
    config = ExperimentConfig(data_dir=str(brats_phantom_dir), cache_dir=str(root / "cache"), image_size=32,
                              filters=(4, 8, 16), batch_size=8, epochs=1, jit_compile="off", model="nested_unet",
                              target="multilabel", context_slices=1, empty_slice_fraction=0.5,
                              test_fraction=0.25, val_fraction=0.25)
    return train(config, runs_root=root / "runs", progress=False).run_dir
