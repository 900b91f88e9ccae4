"""Dataset summary: what a folder holds, the mask encodings seen, and what was skipped."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from conftest import square_pair, write_image

from metaseg_tf.data import discover_pairs, summarise_dataset


def test_summary_names_the_mask_encodings_and_labels_seen(tmp_path: Path) -> None:
    image, mask = square_pair(size=32)
    write_image(tmp_path / "case_a" / "case_a_1.png", image)
    write_image(tmp_path / "case_a" / "case_a_1_mask.png", mask)  # 0/255
    labels = (mask > 0).astype(np.uint8)
    labels[8:12, 8:12] = 3  # a BraTS-style label map
    labels[14:18, 14:18] = 2
    write_image(tmp_path / "case_b" / "case_b_1.png", image)
    write_image(tmp_path / "case_b" / "case_b_1_mask.png", labels)
    summary = summarise_dataset(discover_pairs(tmp_path), progress=False)
    assert summary.mask_encodings == {"binary 0/255": 1, "label map": 1}
    assert summary.mask_labels == {1, 2, 3}
    assert summary.lesion_pixels == 2 * 100  # both squares count in full: any non-zero label is lesion
    line = next(line for line in summary.lines() if line.startswith("masks"))
    assert "1 x binary 0/255" in line and "1 x label map" in line and "labels [1, 2, 3]" in line
