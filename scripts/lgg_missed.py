"""What sets the LGG patients the models miss apart: lesion contrast, size and extent, numbers only.

    python scripts/lgg_missed.py ../shared/data/lgg_kaggle_3m [--scores results/lgg_recipe/crossval/per_patient.csv]
    python scripts/lgg_missed.py ../shared/data/lgg_kaggle_3m --run RUN     # + the FLAIR-copies test of a run

For every patient of the Kaggle LGG set (``TCGA_*/<case>_<n>.<ext>`` slices with ``<case>_<n>_mask.png``) it
reads the three channels (pre-contrast T1, FLAIR, post-contrast T1) of every slice and the truth, and measures:

* ``contrast_flair`` (``_pre``, ``_post``): the lesion's mean intensity over the mean of the rest of the head
  (FLAIR pixels above 5 % of the patient's maximum), both on the lesion's slices; a hyperintense lesion is > 1;
* ``lesion_z``: the lesion's mean FLAIR in standard deviations of the rest of the head on those slices (how a
  per-slice z-score, our normalisation, sees it);
* ``truth_voxels``, ``lesion_slices``, ``largest_slice_area`` and ``head_pixels`` (of the 256 x 256 frame);
* ``brain_box_side``: the side of the square around the patient's brain over all its slices (the bounding box
  of the voxels where any sequence exceeds a tenth of the patient's maximum, made square: after Buda et al.'s
  PyTorch ``crop_sample`` and ``pad_sample``), and
  ``box_area_gain``: ``(frame side / brain_box_side)^2``, how much larger every lesion would be in pixels if
  the slices were cropped to that box before resizing, as their cropping does;
* ``pre_is_flair``, ``post_is_flair``: whether the pre- or post-contrast channel is the FLAIR again (mean
  absolute difference under one grey level over the head): the dataset fills a missing sequence with FLAIR
  (Buda et al. 2019); ``flair_copies``: both are;

joins the out-of-fold scores of a ``metaseg crossval`` (``per_patient.csv``: the ensemble rows, else the
first model's) and prints the table sorted by Dice with the Spearman correlation of each measure with Dice.

``--run RUN`` then tests whether inputs of FLAIR copies alone explain the misses: a copy of the run (in a
temporary folder) scores its test patients as they are and with every slice's pre- and post-contrast channels
replaced by its FLAIR channel (after preprocessing: CLAHE works per channel), through ``evaluate_run``.
Nothing is written under the run or the repository; no image is made.
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import shutil
import tempfile
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
from scipy.stats import mannwhitneyu, spearmanr

SLICE = re.compile(r"^(?P<case>.+)_(?P<number>\d+)$")


def patient_measures(folder: Path) -> dict[str, float]:
    """The measures of one patient folder (see the module docstring)."""
    channels, truth = [], []
    for mask_path in sorted(folder.glob("*_mask.png")):
        stem = mask_path.name[: -len("_mask.png")]
        image_path = next((p for p in folder.glob(f"{stem}.*") if not p.name.endswith("_mask.png")), None)
        if image_path is None or SLICE.match(stem) is None:
            continue
        image = cv2.imread(str(image_path), cv2.IMREAD_COLOR)
        mask = cv2.imread(str(mask_path), cv2.IMREAD_GRAYSCALE)
        if image is None or mask is None:
            continue
        channels.append(image[..., ::-1].astype(np.float32))  # OpenCV's BGR -> the file's pre, FLAIR, post
        truth.append(mask > 127)
    images, lesion = np.stack(channels), np.stack(truth)
    volume = images[..., 1]
    head = volume > 0.05 * volume.max()
    on_lesion_slices = lesion.any(axis=(1, 2))
    rest = head & ~lesion & on_lesion_slices[:, None, None]
    inside, outside = volume[lesion], volume[rest]
    contrasts = {f"contrast_{name}": float(images[..., k][lesion].mean() / images[..., k][rest].mean())
                 if lesion.any() else float("nan") for k, name in enumerate(("pre", "flair", "post"))}
    pre, post = (bool(np.abs(images[..., k] - volume)[head].mean() < 1) for k in (0, 2))
    brain = (images > 0.1 * images.max()).any(axis=3)
    extent = [np.flatnonzero(brain.any(axis=axes)) for axes in ((0, 2), (0, 1))]  # rows, columns
    box_side = max(int(found[-1] - found[0] + 1) for found in extent)
    return {"flair_copies": pre and post, "pre_is_flair": pre, "post_is_flair": post, **contrasts,
            "truth_voxels": int(lesion.sum()), "lesion_slices": int(on_lesion_slices.sum()),
            "largest_slice_area": int(lesion.sum(axis=(1, 2)).max()) if lesion.any() else 0,
            "head_pixels": float(head[on_lesion_slices].sum(axis=(1, 2)).mean()) if lesion.any() else float("nan"),
            "frame_side": max(volume.shape[1:]), "brain_box_side": box_side,
            "box_area_gain": (max(volume.shape[1:]) / box_side) ** 2,
            "lesion_z": float((inside.mean() - outside.mean()) / outside.std()) if lesion.any() else float("nan")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("data_dir", type=Path, help="the lgg_kaggle_3m folder")
    parser.add_argument("--scores", type=Path, default=Path(__file__).resolve().parents[1]
                        / "results/lgg_recipe/crossval/per_patient.csv")
    parser.add_argument("--run", type=Path, help="a run trained on this data: its FLAIR-copies test")
    args = parser.parse_args()
    scores = pd.read_csv(args.scores)
    model = "ensemble" if "ensemble" in set(scores["model"]) else scores["model"].iloc[0]
    scores = scores[scores["model"] == model].set_index("case_id")
    rows = []
    for folder in sorted(p for p in args.data_dir.iterdir() if p.is_dir()):
        if folder.name not in scores.index:  # the case ids of the Kaggle set are its folder names
            continue
        measures = patient_measures(folder)
        if measures["truth_voxels"]:
            rows.append({"patient": folder.name, "dice": scores.loc[folder.name, "dice"],
                         "recall": scores.loc[folder.name, "recall"], **measures})
    table = pd.DataFrame(rows).sort_values("dice")
    print(f"{len(table)} patients with a lesion, scored by the {model} of {args.scores}")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    print()
    copies, one = table["flair_copies"], table["pre_is_flair"] ^ table["post_is_flair"]
    acquired = ~copies & ~one
    for label, rows in (("FLAIR in all three channels", copies), ("FLAIR in one other channel", one),
                        ("three sequences", acquired)):
        dice = table["dice"][rows]
        print(f"{label}: {rows.sum()} patients ({', '.join(table['patient'][rows]) if rows.sum() < 8 else '...'}), "
              f"mean Dice {dice.mean():.3f}, median {dice.median():.3f}")
    print(f"FLAIR copies against three sequences: Mann-Whitney p "
          f"{mannwhitneyu(table['dice'][copies], table['dice'][acquired]).pvalue:.2g}")
    for column in ("contrast_pre", "contrast_flair", "contrast_post", "lesion_z", "truth_voxels", "lesion_slices",
                   "largest_slice_area", "head_pixels", "box_area_gain"):
        rho, p = spearmanr(table[column], table["dice"], nan_policy="omit")
        rank = table[column].rank(pct=True)
        worst = ", ".join(f"{patient} at {100 * r:.0f} %" for patient, r in zip(table["patient"][:2], rank[:2]))
        print(f"{column}: Spearman with Dice {rho:+.2f} (p {p:.2g}); percentile of the two worst: {worst}")
    gain = table["box_area_gain"]
    print(f"cropping to the brain box would enlarge lesions (in pixels) by a median {gain.median():.2f}x "
          f"(quartiles {gain.quantile(0.25):.2f} and {gain.quantile(0.75):.2f}, range {gain.min():.2f}-"
          f"{gain.max():.2f}, {(gain > 1.3).sum()} patients over 1.3x; box side {table['brain_box_side'].min()}-"
          f"{table['brain_box_side'].max()} px of a {table['frame_side'].max()} px frame)")
    if args.run is not None:
        tested = flair_copies_test(args.run)
        tested["flair_copies_in_data"] = [bool(table.set_index("patient")["flair_copies"].get(c, False))
                                          for c in tested.index]
        print(f"\n{args.run.name}: per-patient Dice of its test patients as they are and with FLAIR in all three "
              f"channels; mean {tested['as_is'].mean():.3f} -> {tested['flair_copies'].mean():.3f}")
        print(tested.sort_values("as_is").to_markdown(floatfmt=".3f"))


def flair_copies_test(run: Path) -> pd.DataFrame:
    """Per test patient of ``run``: Dice as it is and with the three channels all FLAIR (see the docstring)."""
    from metaseg_tf.data.batches import load_recorded_data
    from metaseg_tf.evaluation.report import evaluate_run
    from metaseg_tf.runs.folders import load_run_config, load_run_split

    with tempfile.TemporaryDirectory() as temporary:
        copy = Path(temporary) / run.name
        shutil.copytree(run, copy, ignore=shutil.ignore_patterns("evaluation-*", "export-*", "tensorboard"))
        data, _ = load_recorded_data(load_run_config(copy), load_run_split(copy), ("test",), progress=False)
        images = data.dataset.images.copy()
        images[..., 0] = images[..., 2] = images[..., 1]
        grey = dataclasses.replace(data, dataset=dataclasses.replace(data.dataset, images=images))
        scores = {name: pd.read_csv(evaluate_run(copy, "test", data=inputs, progress=False).out_dir
                                    / "per_patient.csv").set_index("case_id")["dice"]
                  for name, inputs in (("as_is", data), ("flair_copies", grey))}
    return pd.DataFrame(scores)


if __name__ == "__main__":
    main()
