"""The lesion report: lesions as 26-connected components, their volume, longest axial diameter and slices."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg_tf.inference.lesions import feret_diameter, lesion_counts, lesion_table


def test_sizes_in_millimetres_and_slices() -> None:
    masks = np.zeros((12, 16, 16, 2), np.uint8)
    masks[5:7, 2:5, 2:6, 0] = 1  # 2 slices of 3 x 4 pixels
    masks[10, 12, 12, 0] = 1  # one voxel
    masks[11, 13, 13, 0] = 1  # touches it diagonally: the same lesion (26 neighbours)
    table = lesion_table(masks, ["wt", "et"], spacing=(2.0, 0.5, 0.5))
    assert list(table["region"]) == ["wt", "wt"] and list(table["lesion"]) == [1, 2]
    big, small = table.iloc[0], table.iloc[1]
    assert big["voxels"] == 24 and big["volume_mm3"] == pytest.approx(24 * 0.5)
    assert big["largest_axial_diameter_mm"] == pytest.approx(np.hypot(1.5, 2.0))  # the 3 x 4 pixels' diagonal
    assert (big["first_slice"], big["centre_slice"], big["last_slice"]) == (5, 6, 6)  # centroid 5.5 rounds up
    assert small["voxels"] == 2 and small["largest_axial_diameter_mm"] == pytest.approx(np.hypot(0.5, 0.5))
    assert (small["first_slice"], small["last_slice"]) == (10, 11)
    counts = lesion_counts(table, ["wt", "et"])
    assert counts == {"wt_lesions": 2, "wt_lesion_volume_mm3": pytest.approx(13.0),
                      "wt_largest_lesion_diameter_mm": pytest.approx(2.5), "et_lesions": 0,
                      "et_lesion_volume_mm3": 0.0, "et_largest_lesion_diameter_mm": 0.0}


def test_without_a_spacing_sizes_stay_in_voxels() -> None:
    masks = np.zeros((3, 8, 8, 1), np.uint8)
    masks[1, 1:3, 1:7, 0] = 1
    table = lesion_table(masks, ["lesion"])
    assert table.iloc[0]["voxels"] == 12 and np.isnan(table.iloc[0]["volume_mm3"])
    assert np.isnan(lesion_counts(table, ["lesion"])["lesion_lesion_volume_mm3"])
    assert lesion_table(np.zeros((2, 4, 4, 1), np.uint8), ["lesion"]).empty


def test_feret_diameter_of_a_line_and_a_disc() -> None:
    line = np.zeros((5, 9), bool)
    line[2, 1:8] = True  # 7 pixels in a row: corners all on two lines
    assert feret_diameter(line) == pytest.approx(np.hypot(7, 1))
    yy, xx = np.mgrid[:41, :41]
    disc = (yy - 20) ** 2 + (xx - 20) ** 2 <= 15**2
    assert 31 <= feret_diameter(disc, (0.5, 0.5)) / 0.5 <= 32.5  # a disc of diameter 31 pixels
    assert feret_diameter(np.zeros((3, 3), bool)) == 0.0
