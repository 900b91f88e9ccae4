"""2.5D context: neighbours by slice order within each case, clamped at the ends, offset-major channels."""

from __future__ import annotations

import numpy as np

from metaseg_tf.data.context import context_rows, stack_context, volume_context


def test_neighbours_are_taken_in_slice_order_within_the_case_and_clamped() -> None:
    # rows of two cases interleaved; case "a" numbered with a gap (1, 2, 5): neighbours by number order
    case_ids = np.array(["a", "b", "a", "b", "a"])
    slice_indices = np.array([5, 0, 1, 1, 2])
    rows = context_rows(case_ids, slice_indices, 1)
    assert rows.tolist() == [[4, 0, 0], [1, 1, 3], [2, 2, 4], [1, 3, 3], [2, 4, 0]]
    assert context_rows(case_ids, slice_indices, 0).tolist() == [[0], [1], [2], [3], [4]]


def test_stacked_channels_are_offset_major_with_the_centre_in_the_middle() -> None:
    images = np.arange(4 * 2 * 2 * 3).reshape(4, 2, 2, 3)  # 4 slices of one case, 3 sequences
    stacked = volume_context(images, 1)
    assert stacked.shape == (4, 2, 2, 9)
    np.testing.assert_array_equal(stacked[2, ..., 0:3], images[1])  # offset -1
    np.testing.assert_array_equal(stacked[2, ..., 3:6], images[2])  # the slice itself
    np.testing.assert_array_equal(stacked[2, ..., 6:9], images[3])  # offset +1
    np.testing.assert_array_equal(stacked[0, ..., 0:3], images[0])  # clamped at the first slice
    np.testing.assert_array_equal(volume_context(images, 0), images)
    rows = np.array([[0, 1, 2]])
    np.testing.assert_array_equal(stack_context(images, rows), stacked[1:2])
