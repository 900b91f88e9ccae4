"""The shared real MRI (METASEG_REAL_DATA): the counts the data README promises, read end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data import discover_pairs, split_for_config, summarise_dataset
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import read_pair
from metaseg_tf.data.preprocess import preprocess_dataset

pytestmark = pytest.mark.real_data


def test_lgg_kaggle_3m_counts(real_data: Path) -> None:
    report = discover_pairs(real_data / "lgg_kaggle_3m")
    assert report.layout == "kaggle_3m"
    assert len(report.case_ids) == 88 and len(report.pairs) == 3151
    assert report.n_skipped == 0
    assert [f.name for f in report.ignored_files] == ["data.csv"]


def test_lgg_tif_sample_counts_and_matches_webp(real_data: Path) -> None:
    tif = discover_pairs(real_data / "lgg_kaggle_3m_tif_sample")
    assert len(tif.case_ids) == 3 and len(tif.pairs) == 63 and tif.n_skipped == 0
    pair = tif.pairs[10]
    webp_dir = real_data / "lgg_kaggle_3m" / pair.case_id
    webp = next(p for p in discover_pairs(real_data / "lgg_kaggle_3m").pairs
                if p.case_id == pair.case_id and p.slice_index == pair.slice_index)
    assert webp.image_path.parent == webp_dir
    tif_image, tif_mask = read_pair(pair)
    webp_image, webp_mask = read_pair(webp)
    np.testing.assert_array_equal(tif_image, webp_image)  # lossless WebP: bit-exact
    np.testing.assert_array_equal(tif_mask, webp_mask)


def test_mets_t2w_sample_masks_binarise_cleanly(real_data: Path) -> None:
    report = discover_pairs(real_data / "mets_t2w_sample")
    assert report.layout == "images_masks"
    assert len(report.pairs) == 19 and report.n_skipped == 0
    assert report.case_ids == ["BraTS-MET-00230-000", "BraTS-MET-00233-000", "BraTS-MET-00237-000"]
    summary = summarise_dataset(report, progress=False)
    assert summary.usable_pairs == 19 and summary.slices_with_lesion == 19
    for pair in report.pairs:
        _, mask = read_pair(pair)
        assert set(np.unique(mask)) == {0, 1}


def test_lgg_preprocesses_and_splits_by_patient(real_data: Path, tmp_path: Path) -> None:
    config = ExperimentConfig(image_size=64, cache_dir=str(tmp_path))
    dataset = preprocess_dataset(discover_pairs(real_data / "lgg_kaggle_3m"), config, progress=False)
    assert len(dataset) == 3151 and not dataset.skipped
    split = split_for_config(dataset.case_ids, config)
    assert (len(split.train), len(split.val), len(split.test)) == (56, 14, 18)
    parts = [set(dataset.case_ids[split.indices(dataset.case_ids, p)]) for p in ("train", "val", "test")]
    assert not (parts[0] & parts[1] or parts[0] & parts[2] or parts[1] & parts[2])
    assert 0.3 < dataset.masks.reshape(len(dataset), -1).max(axis=1).mean() < 0.4  # ~35 % with lesion


def test_real_nifti_case_trains_a_few_steps_and_predicts_back_onto_its_grid(real_data: Path, tmp_path: Path) -> None:
    """The real metastasis case (generic layout: t1ce, flair, whole and core masks, axial axis from the affine):
    three copies of it as cases so it can be split by patient; two sequences, the tumour core, one short epoch."""
    import nibabel as nib
    import pandas as pd

    from metaseg_tf.inference.files import predict_path
    from metaseg_tf.inference.predictor import Predictor
    from metaseg_tf.training.train import train

    source = real_data / "mets_nifti_case"
    for case in ("case_a", "case_b", "case_c"):
        (tmp_path / "data" / case).mkdir(parents=True)
        for path in source.glob("*.nii.gz"):
            (tmp_path / "data" / case / path.name).symlink_to(path)
    config = ExperimentConfig(data_dir=str(tmp_path / "data"), cache_dir=str(tmp_path / "cache"), image_size=64,
                              filters=(4, 8, 16), batch_size=16, epochs=1, sequences=("t1c", "t2f"), target="tc",
                              empty_slice_fraction=0.2, model="attention_unet", jit_compile="off",
                              test_fraction=0.34, val_fraction=0.34)
    run = train(config, runs_root=tmp_path / "runs", progress=False)
    data = json.loads((run.run_dir / "data.json").read_text())
    assert data["layout"] == "generic" and data["label_convention"] == "brats"
    assert data["slices_per_part"] == {"train": 224, "val": 224, "test": 224}
    assert data["geometry"]["case_a"]["spacing"] == pytest.approx([1.0, 1.0, 1.0])
    out_dir, summary = predict_path(Predictor.from_run(run.run_dir), [source], tmp_path / "out", progress=False)
    t1ce = nib.load(str(next(source.glob("*t1ce*.nii.gz"))))
    seg = nib.load(str(out_dir / "YG_HAEAKFOSOSWC-seg.nii.gz"))
    assert summary["cases"] == 1 and seg.shape == t1ce.shape and np.allclose(seg.affine, t1ce.affine)
    row = pd.read_csv(out_dir / "predictions.csv").iloc[0]
    assert row["slices"] == 224 and 0 <= row["tc_dice"] <= 1  # scored against its own core mask
    with pytest.raises(DataError, match="takes 2 sequences"):  # a slice image cannot feed a 2-sequence model
        Predictor.from_run(run.run_dir).predict_slices([np.zeros((64, 64), np.float32)])
