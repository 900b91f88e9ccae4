"""Figures of runs, evaluations and comparisons (matplotlib, Agg: they work headless and are saved as PNG).

Every function draws one figure, saves it to ``path`` and returns ``path``; notebooks display the file.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import cv2
import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _save(fig: plt.Figure, path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def learning_curves(history: pd.DataFrame, path: Path | str, title: str = "") -> Path:
    """Loss and Dice per epoch, training and validation (columns as Keras' CSV logger writes them)."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    epochs = np.arange(1, len(history) + 1)
    for axis, kind in zip(axes, ("loss", "dice")):
        columns = [c for c in history.columns if c == kind or c.endswith(f"_{kind}")]
        for column in columns:
            axis.plot(epochs, history[column], label=column, linestyle="--" if column.startswith("val_") else "-")
        axis.set_xlabel("epoch")
        axis.set_title(kind)
        axis.legend(fontsize=7)
    fig.suptitle(title)
    return _save(fig, path)


def contour_overlay(axis: plt.Axes, image: np.ndarray, truth: np.ndarray | None, pred: np.ndarray | None,
                    title: str = "") -> None:
    """Draw ``image`` (its middle channel for colour input) with the truth contour in green and the
    prediction contour in red."""
    grey = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
    axis.imshow(grey, cmap="gray")
    for mask, colour in ((truth, "lime"), (pred, "red")):
        if mask is not None and np.any(mask):
            axis.contour(np.asarray(mask, float), levels=[0.5], colors=colour, linewidths=0.8)
    axis.set_title(title, fontsize=8)
    axis.axis("off")


def overlay_grid(images: Sequence[np.ndarray], truths: Sequence[np.ndarray],
                 predictions: Mapping[str, Sequence[np.ndarray]], titles: Sequence[str], path: Path | str) -> Path:
    """One row per image: the image with the truth, then one panel per model's prediction."""
    rows, cols = len(images), 1 + len(predictions)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for row, image in enumerate(images):
        contour_overlay(axes[row, 0], image, truths[row], None, f"{titles[row]}\ntruth")
        for col, (model, masks) in enumerate(predictions.items(), start=1):
            contour_overlay(axes[row, col], image, truths[row], masks[row], model)
    return _save(fig, path)


def contour_grid(images: Sequence[np.ndarray], truths: Sequence[np.ndarray], titles: Sequence[str],
                 path: Path | str, columns: int = 4) -> Path:
    """Images with their truth contour (green) in a grid of ``columns``."""
    rows = -(-len(images) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, image, truth, title in zip(axes.ravel(), images, truths, titles):
        contour_overlay(axis, image, truth, None, title)
    return _save(fig, path)


def distribution(values: Mapping[str, Sequence[float]], path: Path | str, ylabel: str = "per-patient Dice") -> Path:
    """Box plot with the individual points (one per patient) for each model."""
    fig, axis = plt.subplots(figsize=(1.8 + 1.6 * len(values), 3.5))
    names = list(values)
    data = [np.asarray(values[name], float) for name in names]
    axis.boxplot(data, showfliers=False)
    axis.set_xticks(range(1, len(names) + 1), names)
    for k, points in enumerate(data, start=1):
        jitter = np.random.default_rng(k).uniform(-0.12, 0.12, len(points))
        axis.scatter(k + jitter, points, s=10, alpha=0.7)
    axis.set_ylabel(ylabel)
    return _save(fig, path)


def threshold_sweep(sweep: pd.DataFrame, path: Path | str) -> Path:
    """Global and mean per-patient Dice against the binarisation threshold."""
    fig, axis = plt.subplots(figsize=(4.5, 3.2))
    for column in ("global_dice", "patient_dice"):
        axis.plot(sweep["threshold"], sweep[column], marker="o", label=column.replace("_", " "))
    axis.set_xlabel("threshold")
    axis.set_ylabel("Dice")
    axis.legend()
    return _save(fig, path)


def image_grid(panels: Mapping[str, np.ndarray], path: Path | str, columns: int = 4, cmap: str = "gray") -> Path:
    """Grey images (``(H, W)``, or ``(H, W, C)`` showing the middle channel) in a grid, titled by key."""
    rows = -(-len(panels) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 2.6 * rows), squeeze=False)
    for axis in axes.ravel():
        axis.axis("off")
    for axis, (title, image) in zip(axes.ravel(), panels.items()):
        image = np.asarray(image)
        axis.imshow(image[..., image.shape[-1] // 2] if image.ndim == 3 else image, cmap=cmap)
        axis.set_title(title, fontsize=8)
    return _save(fig, path)


def histograms(panels: Mapping[str, Mapping[str, np.ndarray]], path: Path | str, bins: int = 50,
               density: bool = True, log_x: Sequence[str] = ()) -> Path:
    """One panel per key of ``panels``, one step histogram per labelled array in it; panels named in
    ``log_x`` use logarithmic bins."""
    fig, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for axis, (title, groups) in zip(axes[0], panels.items()):
        for label, values in groups.items():
            values = np.asarray(values, float).ravel()
            if values.size == 0:
                continue
            edges = bins
            if title in log_x:
                positive = values[values > 0]
                edges = np.geomspace(max(positive.min(), 1e-3), positive.max() + 1, bins) if positive.size else bins
                axis.set_xscale("log")
            axis.hist(values, bins=edges, histtype="step", density=density, label=f"{label} (n={values.size})")
        axis.set_title(title, fontsize=9)
        axis.legend(fontsize=7)
    return _save(fig, path)


def attention_overlays(images: Sequence[np.ndarray], maps: Mapping[str, np.ndarray], path: Path | str,
                       truths: Sequence[np.ndarray] | None = None) -> Path:
    """One row per image: the image (with its truth contour), then each gate's coefficients resized to the
    image and drawn over it (``maps``: ``{gate: (B, h, w, 1)}``, finest first)."""
    cols = 1 + len(maps)
    fig, axes = plt.subplots(len(images), cols, figsize=(2.6 * cols, 2.6 * len(images)), squeeze=False)
    for row, image in enumerate(images):
        contour_overlay(axes[row, 0], image, truths[row] if truths is not None else None, None, "image")
        grey = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
        for col, (gate, coefficients) in enumerate(maps.items(), start=1):
            heat = cv2.resize(np.asarray(coefficients[row, ..., 0], np.float32), grey.shape[::-1],
                              interpolation=cv2.INTER_LINEAR)
            axes[row, col].imshow(grey, cmap="gray")
            axes[row, col].imshow(heat, cmap="jet", alpha=0.45, vmin=0, vmax=1)
            axes[row, col].set_title(gate.replace("_coefficients", ""), fontsize=8)
            axes[row, col].axis("off")
    return _save(fig, path)


def accuracy_latency(table: pd.DataFrame, path: Path | str, score: str = "dice") -> Path:
    """``score`` against latency for each row of ``table`` (columns ``label``, ``latency_ms``, ``score``)."""
    fig, axis = plt.subplots(figsize=(4.5, 3.4))
    axis.plot(table["latency_ms"], table[score], marker="o")
    for _, row in table.iterrows():
        axis.annotate(str(row["label"]), (row["latency_ms"], row[score]), textcoords="offset points",
                      xytext=(4, 4), fontsize=8)
    axis.set_xlabel("latency per image (ms)")
    axis.set_ylabel(score)
    return _save(fig, path)


LABEL_COLOURS = {1: "red", 2: "yellow", 3: "deepskyblue"}


def sequence_label_grid(examples: Sequence[tuple[str, int, np.ndarray, np.ndarray]], sequences: Sequence[str],
                        path: Path | str, label_names: Mapping[int, str] | None = None) -> Path:
    """One row per example ``(case_id, slice, images (H, W, C), labels (H, W))``: each sequence, then the
    first sequence with every label's contour in its colour (:data:`LABEL_COLOURS`)."""
    columns = len(sequences) + 1
    fig, axes = plt.subplots(len(examples), columns, figsize=(2.4 * columns, 2.5 * len(examples)), squeeze=False)
    for row, (case_id, z, images, labels) in zip(axes, examples):
        for axis, (c, name) in zip(row, enumerate(sequences)):
            axis.imshow(images[..., c], cmap="gray")
            axis.set_title(f"{case_id} z={z}: {name}" if c == 0 else name, fontsize=7)
            axis.axis("off")
        axis = row[-1]
        axis.imshow(images[..., 0], cmap="gray")
        for value in np.unique(labels[labels > 0]):
            axis.contour((labels == value).astype(float), levels=[0.5], colors=LABEL_COLOURS.get(int(value), "white"),
                         linewidths=0.8)
        names = label_names or {}
        axis.set_title("labels: " + ", ".join(f"{int(v)} {names.get(int(v), '')}".strip()
                                              for v in np.unique(labels[labels > 0])), fontsize=7)
        axis.axis("off")
    return _save(fig, path)
