"""Reading images and masks of every bit depth, channel count and format; bad files fail clearly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import square_pair, write_image

from metaseg_tf.data.discover import DataError, SlicePair
from metaseg_tf.data.io import read_image, read_mask, read_mask_labels, read_pair


@pytest.mark.parametrize("ext", ["png", "tif", "bmp", "webp", "jpg"])
@pytest.mark.parametrize("channels", [1, 3])
def test_8bit_rgb_image_in_unit_range_with_declared_channels(tmp_path: Path, ext: str, channels: int) -> None:
    rgb = np.zeros((16, 20, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 30, 120, 250
    image = read_image(write_image(tmp_path / f"x.{ext}", rgb), channels)
    assert image.dtype == np.float32 and image.shape == (16, 20, channels)
    if channels == 3:  # channel order is the file's RGB order, not OpenCV's BGR
        np.testing.assert_allclose(image[8, 8], [30 / 255, 120 / 255, 250 / 255], atol=0.03)
    else:
        assert image[8, 8, 0] == pytest.approx(400 / 3 / 255, abs=0.03)


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_16bit_grey_image_is_scaled_and_repeated(tmp_path: Path, ext: str) -> None:
    grey = np.full((8, 8), 65535 // 4, np.uint16)
    image = read_image(write_image(tmp_path / f"x.{ext}", grey), channels=3)
    assert image.shape == (8, 8, 3)
    np.testing.assert_allclose(image, 0.25, atol=1e-4)


def test_rgba_drops_alpha(tmp_path: Path) -> None:
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., :3], rgba[..., 3] = 100, 7
    image = read_image(write_image(tmp_path / "x.png", rgba), channels=3)
    np.testing.assert_allclose(image, 100 / 255, atol=1e-6)


def test_float_tiff_read_through_tifffile(tmp_path: Path) -> None:
    data = np.linspace(-5, 5, 64, dtype=np.float32).reshape(8, 8)
    tifffile.imwrite(tmp_path / "x.tif", data)
    image = read_image(tmp_path / "x.tif", channels=1)
    assert image.min() == 0.0 and image.max() == 1.0


@pytest.mark.parametrize(
    ("name", "values", "expected"),
    [
        ("0_255.png", (0, 255), (0, 1)),
        ("0_1.png", (0, 1), (0, 1)),
        ("0_65535.png", (0, 65535), (0, 1)),
    ],
)
def test_masks_become_zero_one(tmp_path: Path, name: str, values: tuple[int, int], expected: tuple) -> None:
    dtype = np.uint16 if max(values) > 255 else np.uint8
    mask = np.array([[values[0], values[1]], [values[1], values[0]]], dtype)
    out = read_mask(write_image(tmp_path / name, mask))
    assert out.dtype == np.uint8 and set(np.unique(out)) == set(expected)
    assert out[0, 1] == 1 and out[0, 0] == 0


def test_float_label_masks_do_not_overflow(tmp_path: Path) -> None:
    labels = np.zeros((6, 6), np.float32)
    labels[1, 1], labels[2, 2] = 70_000.0, np.inf
    tifffile.imwrite(tmp_path / "f.tif", labels)
    assert read_mask(tmp_path / "f.tif").sum() == 2


def test_bool_and_rgb_masks(tmp_path: Path) -> None:
    boolean = np.zeros((6, 6), bool)
    boolean[2:4, 2:4] = True
    tifffile.imwrite(tmp_path / "b.tif", boolean)
    assert read_mask(tmp_path / "b.tif").sum() == 4
    rgb = np.zeros((6, 6, 3), np.uint8)
    rgb[1, 1] = (255, 0, 0)  # a red label still counts as lesion
    rgb[2, 2] = (255, 255, 255)
    assert read_mask(write_image(tmp_path / "c.png", rgb)).sum() == 2


def test_a_multi_page_tiff_is_refused_before_its_pages_are_decoded(tmp_path: Path) -> None:
    tifffile.imwrite(tmp_path / "pages.tif", np.zeros((3, 16, 16), np.uint8), photometric="minisblack")  # 3 pages
    with pytest.raises(DataError, match="holds 3 pages"):
        read_image(tmp_path / "pages.tif")


@pytest.mark.parametrize("ext", ["png", "tif"])
def test_label_maps_and_16bit_0_255_masks_keep_their_lesions(tmp_path: Path, ext: str) -> None:
    labels = np.zeros((8, 8), np.uint8)
    labels[1, 1], labels[2, 2:4], labels[5, 5] = 1, 2, 3  # BraTS-style necrosis / oedema / enhancing
    read = read_mask_labels(write_image(tmp_path / f"labels.{ext}", labels))
    assert read.encoding == "label map" and np.array_equal(read.labels, labels)
    assert read_mask(tmp_path / f"labels.{ext}").sum() == 4  # any non-zero label is lesion
    sixteen = np.zeros((8, 8), np.uint16)
    sixteen[2:5, 2:5] = 255  # a 0/255 mask saved as 16-bit: 255 is far below half of 65535
    read = read_mask_labels(write_image(tmp_path / f"sixteen.{ext}", sixteen))
    assert read.encoding == "binary 0/255" and read.binary.sum() == 9
    assert set(np.unique(read.labels)) == {0, 1}


def test_jpeg_mask_with_grey_edges_binarises_at_half_range(tmp_path: Path) -> None:
    _, mask = square_pair(size=64, top=20, side=20)
    out = read_mask(write_image(tmp_path / "m.jpg", mask))
    assert read_mask_labels(tmp_path / "m.jpg").encoding == "lossy JPEG (>= half its maximum)"
    zero_one = read_mask(write_image(tmp_path / "01.jpg", (mask > 0).astype(np.uint8)))  # a 0/1 JPEG mask
    assert abs(int(zero_one.sum()) - 400) <= 40
    assert set(np.unique(out)) <= {0, 1}
    assert abs(int(out.sum()) - 400) <= 40  # the square survives JPEG's ringing, give or take its rim


@pytest.mark.parametrize("ext", ["png", "jpg", "webp", "tif", "bmp"])
def test_truncated_files_raise_data_error(tmp_path: Path, ext: str) -> None:
    path = write_image(tmp_path / f"x.{ext}", square_pair(64)[0])
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="x\\." + ext):
        read_image(path)


def test_empty_and_garbage_files_raise_data_error(tmp_path: Path) -> None:
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "garbage.png").write_bytes(b"not an image at all" * 10)
    with pytest.raises(DataError, match="empty file"):
        read_image(tmp_path / "empty.png")
    with pytest.raises(DataError, match="unreadable"):
        read_mask(tmp_path / "garbage.png")


def test_pair_with_mismatched_sizes_is_rejected(tmp_path: Path) -> None:
    image_path = write_image(tmp_path / "a_1.png", np.zeros((32, 32, 3), np.uint8))
    mask_path = write_image(tmp_path / "a_1_mask.png", np.zeros((16, 32), np.uint8))
    with pytest.raises(DataError, match="32x32 but mask a_1_mask.png is 32x16"):
        read_pair(SlicePair("a", 1, image_path, mask_path))
