"""The metaseg command line: summaries, phantom generation, the main job, and one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from metaseg_tf.cli import build_parser, main
from metaseg_tf.pipeline import PROFILES


def test_summary_prints_patients_pairs_and_skips(phantom_dir: Path, tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    data = tmp_path / "data"
    shutil.copytree(phantom_dir, data)
    case = sorted(p for p in data.iterdir() if p.is_dir())[0]
    next(case.glob("*_1_mask.png")).unlink()  # one image loses its mask
    (next(case.glob("*_2.png"))).write_bytes(b"truncated")  # one image is broken
    assert main(["-q", "data", "summary", str(data)]) == 0
    out = capsys.readouterr().out
    assert "patients    : 6" in out
    assert "pairs       : 47" in out
    assert "readable    : 46 pairs" in out
    assert "1 x image without mask" in out
    assert "1 x unreadable, truncated or size mismatch" in out
    assert "phantom.json" in out  # the manifest is listed as ignored, not silently passed over
    assert "masks       : " in out and "binary 0/255" in out  # the mask encodings seen


@pytest.mark.parametrize("args", [["data", "summary", "/no/such/folder"], ["data", "summary", "."]])
def test_errors_are_one_line_without_traceback(args: list[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    args = [a if a != "." else str(empty) for a in args]
    result = subprocess.run([sys.executable, "-m", "metaseg_tf.cli", *args], capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("metaseg: error:")
    assert "Traceback" not in result.stderr


def test_folder_without_pairs_names_layouts(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "notes.txt").write_text("x")
    assert main(["data", "summary", str(tmp_path)]) == 2
    assert "layouts tried" in capsys.readouterr().err


def test_synth_then_summary_of_it(tmp_path: Path, capsys: pytest.CaptureFixture,
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["data", "synth", "brats", "--patients", "3", "--slices", "4", "--size", "64"]) == 0
    assert main(["-q", "data", "summary", "brats"]) == 0  # the default layout: BraTS-METS volumes
    out = capsys.readouterr().out
    assert "layout      : brats_mets" in out and "cases       : 3 (3 with labels" in out
    assert "t1c in 3 cases, t1n in 3 cases, t2f in 3 cases, t2w in 3 cases" in out
    assert "patients    : 3 (0 with several timepoints" in out and "with t1c, t2f, t1n: every case is used" in out
    assert main(["data", "synth", "ph", "--patients", "5", "--slices", "4", "--size", "64", "--layout", "kaggle_3m"]) == 0
    assert "wrote phantom" in capsys.readouterr().out
    assert main(["-q", "data", "summary", "ph"]) == 0
    out = capsys.readouterr().out
    assert "5" in out and "20" in out  # 5 patients, 20 pairs
    assert main(["data", "synth", "ph", "--patients", "5", "--slices", "4", "--size", "64", "--layout", "kaggle_3m"]) == 0
    assert "reused phantom" in capsys.readouterr().out


def test_volume_summary_reports_lesions_per_region_patients_and_skips(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    import nibabel as nib

    # two timepoints of one patient, 2 mm slices (2 mm^3 voxels); ET: one 8-voxel lesion in each (16 mm^3),
    # SNFH around it in the first (WT 6 x 6 x 4 voxels: 288 mm^3)
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    for case, with_oedema in (("BraTS-MET-00001-000", True), ("BraTS-MET-00001-001", False)):
        labels = np.zeros((10, 10, 6), np.uint8)
        if with_oedema:
            labels[2:8, 2:8, 1:5] = 2
        labels[4:6, 4:6, 2:4] = 3
        for name, data in (("t1c", np.ones((10, 10, 6), np.float32)), ("t2f", np.ones((10, 10, 6), np.float32)),
                           ("seg", labels)):
            (tmp_path / "d" / case).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(data, affine), str(tmp_path / "d" / case / f"{case}-{name}.nii.gz"))
    assert main(["-q", "data", "summary", str(tmp_path / "d"), "--sequences", "t1c", "t2w"]) == 0
    out = capsys.readouterr().out
    assert "patients    : 1 (1 with several timepoints" in out
    assert "et: 2 cases, 4 axial slices with lesion, 2 lesions; volume median 16 mm^3 [16, 16]" in out
    assert "tc: 2 cases, 4 axial slices with lesion, 2 lesions" in out
    assert "wt: 2 cases, 6 axial slices with lesion, 2 lesions; volume median 152 mm^3 [16, 288]" in out
    assert "with t1c, t2w: 2 cases would be skipped" in out and "missing sequence(s) t2w" in out


def test_train_evaluate_compare_from_the_command_line(phantom_dir: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "runs"
    common = ["--data", str(phantom_dir), "--image-size", "32", "--filters", "4", "8", "16", "--epochs", "1",
              "--batch-size", "8", "-p", "cache_dir", str(tmp_path / "cache"), "--runs-root", str(runs)]
    assert main(["-q", "train", "--model", "unet", *common, "-p", "lr_schedule", "cosine"]) == 0
    [run] = runs.iterdir()
    assert '"lr_schedule": "cosine"' in (run / "config.json").read_text()
    assert main(["-q", "evaluate", str(run)]) == 0
    assert "per-patient Dice" in capsys.readouterr().out
    assert main(["-q", "compare", str(run), str(run), "--labels", "a", "b", "--out", str(tmp_path / "cmp")]) == 0
    assert (next((tmp_path / "cmp").iterdir()) / "comparison.md").is_file()
    assert main(["-q", "train", "--model", "vnet", *common]) == 2
    assert "unknown model 'vnet'" in capsys.readouterr().err
    assert main(["-q", "compare", str(run), str(run)]) == 2  # two runs need two distinct labels


def test_predict_takes_the_run_as_positional_and_still_accepts_model(
        served_runs: list[Path], phantom_slice: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    image, _ = phantom_slice
    assert main(["-q", "predict", str(served_runs[1]), "--input", str(image), "--out", str(tmp_path / "a")]) == 0
    assert "predicted 1" in capsys.readouterr().out
    assert (next((tmp_path / "a").iterdir()) / f"{image.stem}_mask.png").is_file()
    assert main(["-q", "predict", "--model", str(served_runs[1]), "--input", str(image),
                 "--out", str(tmp_path / "b")]) == 0
    assert "deprecated" in capsys.readouterr().err
    assert main(["-q", "predict", "--input", str(image)]) == 2
    assert "give the run folder once" in capsys.readouterr().err


def test_pipeline_profiles_offered_by_the_cli_are_the_pipeline_s() -> None:
    parser = build_parser()
    assert [parser.parse_args(["pipeline", "--profile", name]).profile for name in PROFILES] == list(PROFILES)
    with pytest.raises(SystemExit):
        parser.parse_args(["pipeline", "--profile", "laptop"])


def test_p_values_follow_the_type_of_their_setting(tmp_path: Path) -> None:
    from metaseg_tf.cli_flags import config_from_args
    from metaseg_tf.config import ConfigError

    args = build_parser().parse_args(["train", "--model", "unet", "-p", "jit_compile", "off", "-p", "flip_tta", "yes",
                                      "-p", "filters", "[4, 8]", "-p", "mixed_precision", "on", "-p", "clahe", "off"])
    config = config_from_args(args)
    assert (config.jit_compile, config.mixed_precision, config.flip_tta, config.filters) == ("off", "on", True, (4, 8))
    assert config.clahe is False, "off switches a boolean setting off, it is not the (truthy) text 'off'"
    assert main(["train", "-p", "augment", "maybe"]) == 2
    with pytest.raises(ConfigError, match="clahe must be true or false"):
        config.replace(clahe="no")
    from metaseg_tf.cli_flags import parse_value as _parse_value
    from metaseg_tf.pipeline import NOTEBOOK_PARAMETERS

    assert _parse_value("clahe_ablation", "off", NOTEBOOK_PARAMETERS) is False, "pipeline -p follows the notebooks"
    assert _parse_value("config_overrides", "{flip_tta: false}", NOTEBOOK_PARAMETERS) == {"flip_tta": False}
