"""The intensity window every reader of an MRI volume (or a DICOM frame) applies: the 0.5th-99.5th percentile
of the brain (the non-zero finite voxels) maps to ``[0, 1]``, NaN-safe (non-finite voxels are counted and become
0), so that training, prediction and the web app's viewer see the same intensities."""

from __future__ import annotations

import numpy as np

WINDOW_PERCENTILES = (0.5, 99.5)
WINDOW_SAMPLE = 1 << 18  # brain voxels the percentiles are taken from (every n-th of a larger brain)


def window_volume(data: np.ndarray) -> tuple[np.ndarray, int]:
    """``float32`` volume in ``[0, 1]``: the brain's (non-zero finite voxels) 0.5th-99.5th percentiles map
    to 0 and 1; returns it and how many voxels were NaN or infinite (they become 0). An all-zero volume (a
    filled sequence) stays 0."""
    data = np.asarray(data, np.float32)
    finite = np.isfinite(data)
    brain = finite & (data != 0)
    if not brain.any():
        return np.zeros(data.shape, np.float32), int(data.size - np.count_nonzero(finite))
    values = data[brain]
    if values.size > WINDOW_SAMPLE:  # a regular subsample: the same percentiles to ~0.01 %, several times faster
        values = values[:: values.size // WINDOW_SAMPLE]
    low, high = np.percentile(values, WINDOW_PERCENTILES)
    scaled = np.clip((np.where(finite, data, low) - low) / (high - low if high > low else 1.0), 0.0, 1.0)
    scaled[~brain] = 0.0
    return scaled.astype(np.float32), int(data.size - np.count_nonzero(finite))
