"""Pair discovery in every supported layout, and every kind of unusable input."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from conftest import square_pair, write_image

from metaseg_tf.data.discover import DataError, discover_pairs, split_case_and_slice


def _write_pair(image_path: Path, mask_path: Path) -> None:
    image, mask = square_pair()
    write_image(image_path, image)
    write_image(mask_path, mask)


def test_kaggle_layout_sorts_slices_numerically_and_uses_folder_as_case(tmp_path: Path) -> None:
    for case in ("TCGA_B_2", "TCGA_A_1"):
        for n in (10, 9, 1, 2):
            _write_pair(tmp_path / case / f"{case}_{n}.webp", tmp_path / case / f"{case}_{n}_mask.png")
    (tmp_path / "data.csv").write_text("Patient;x\n")
    report = discover_pairs(tmp_path)
    assert report.layout == "kaggle_3m"
    assert report.case_ids == ["TCGA_A_1", "TCGA_B_2"]
    assert [(p.case_id, p.slice_index) for p in report.pairs[:4]] == [("TCGA_A_1", n) for n in (1, 2, 9, 10)]
    assert report.pairs[0].image_path.suffix == ".webp" and report.pairs[0].mask_path.suffix == ".png"
    assert [f.name for f in report.ignored_files] == ["data.csv"]
    assert report.n_skipped == 0


@pytest.mark.parametrize("mask_suffix", ["", "_mask"])
def test_images_masks_layout_with_and_without_mask_suffix(tmp_path: Path, mask_suffix: str) -> None:
    for stem in ("BraTS-MET-00233-000_1016", "BraTS-MET-00233-000_1038", "BraTS-MET-00230-000_1057"):
        _write_pair(tmp_path / "images" / f"{stem}.jpg", tmp_path / "masks" / f"{stem}{mask_suffix}.jpg")
    report = discover_pairs(tmp_path)
    assert report.layout == "images_masks"
    assert report.case_ids == ["BraTS-MET-00230-000", "BraTS-MET-00233-000"]
    assert [p.slice_index for p in report.pairs] == [1057, 1016, 1038]


def test_flat_layout_every_extension(tmp_path: Path) -> None:
    extensions = ("tif", "tiff", "png", "jpg", "jpeg", "bmp", "webp", "PNG")
    for n, ext in enumerate(extensions):
        _write_pair(tmp_path / f"case_{n}.{ext}", tmp_path / f"case_{n}_mask.{ext}")
    report = discover_pairs(tmp_path)
    assert report.layout == "flat"
    assert len(report.pairs) == len(extensions)
    assert report.case_ids == ["case"]


def test_unpaired_files_are_reported_and_logged(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    case = tmp_path / "P1"
    _write_pair(case / "P1_1.png", case / "P1_1_mask.png")
    write_image(case / "P1_2.png", square_pair()[0])  # image without mask
    write_image(case / "P1_3_mask.png", square_pair()[1])  # mask without image
    write_image(case / "P1_1.jpg", square_pair()[0])  # same stem, second extension
    (case / "notes.txt").write_text("x")
    with caplog.at_level(logging.INFO):
        report = discover_pairs(tmp_path)
    assert len(report.pairs) == 1
    assert [p.name for p in report.unpaired_images] == ["P1_2.png"]
    assert [p.name for p in report.unpaired_masks] == ["P1_3_mask.png"]
    assert [p.name for p in report.duplicates] == ["P1_1.png"] or [p.name for p in report.duplicates] == ["P1_1.jpg"]
    assert [p.name for p in report.ignored_files] == ["notes.txt"]
    assert report.n_skipped == 3
    assert "1 images without mask, 1 masks without image, 1 duplicates" in caplog.text


def test_missing_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        discover_pairs(tmp_path / "nowhere")


def test_file_instead_of_folder(tmp_path: Path) -> None:
    path = tmp_path / "file.png"
    path.write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        discover_pairs(path)


def test_empty_root_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="empty"):
        discover_pairs(tmp_path)


def test_no_pairs_names_the_layouts_tried(tmp_path: Path) -> None:
    write_image(tmp_path / "a.png", square_pair()[0])
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "readme.txt").write_text("x")
    with pytest.raises(DataError, match="layouts tried: images/ \\+ masks/.*kaggle_3m.*flat"):
        discover_pairs(tmp_path)


@pytest.mark.parametrize(
    ("stem", "expected"),
    [
        ("TCGA_CS_4941_19960909_12", ("TCGA_CS_4941_19960909", 12)),
        ("BraTS-MET-00233-000_1016", ("BraTS-MET-00233-000", 1016)),
        ("scan", ("scan", 0)),
        ("patient-7", ("patient", 7)),
    ],
)
def test_case_and_slice_from_stem(stem: str, expected: tuple[str, int]) -> None:
    assert split_case_and_slice(stem) == expected


def test_two_images_of_one_case_with_one_slice_number_are_reported_not_both_used(tmp_path: Path) -> None:
    image, mask = square_pair()
    for stem in ("case1_4", "t1_5", "flair_5"):  # t1_5 and flair_5 both claim slice 5 of case1
        write_image(tmp_path / "case1" / f"{stem}.png", image)
        write_image(tmp_path / "case1" / f"{stem}_mask.png", mask)
    report = discover_pairs(tmp_path)
    assert [(p.case_id, p.slice_index, p.image_path.name) for p in report.pairs] == [
        ("case1", 4, "case1_4.png"), ("case1", 5, "flair_5.png")]
    assert report.repeated_slices == [tmp_path / "case1" / "t1_5.png"]
    assert "slice number already taken by another image of the case" in report.skipped_reasons()
