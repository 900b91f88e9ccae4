"""Patient-level splits: no patient in two parts, deterministic, sensible sizes."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.split import kfold_patients, patient_of, split_for_config, split_patients

CASES = [f"P{i:02d}" for i in range(20) for _ in range(7)]  # 20 patients, 7 slices each


def test_holdout_has_no_leakage_and_covers_everyone() -> None:
    split = split_patients(CASES, test_fraction=0.2, val_fraction=0.25, seed=1)
    train, val, test = set(split.train), set(split.val), set(split.test)
    assert not (train & val or train & test or val & test)
    assert train | val | test == set(CASES)
    assert (len(train), len(val), len(test)) == (12, 4, 4)
    slices = np.asarray(CASES)
    parts = [split.indices(slices, part) for part in ("train", "val", "test")]
    assert sum(map(len, parts)) == len(CASES)
    for part, indices in zip(("train", "val", "test"), parts):
        assert set(slices[indices]) == set(getattr(split, part))


def test_split_is_deterministic_and_order_independent() -> None:
    a = split_patients(CASES, seed=7)
    b = split_patients(list(reversed(CASES)), seed=7)
    assert a == b
    assert split_patients(CASES, seed=8) != a


def test_tiny_datasets_still_get_a_test_patient() -> None:
    split = split_patients(["a", "b", "c"], test_fraction=0.2, val_fraction=0.2)
    assert len(split.test) == 1 and len(split.val) == 1 and len(split.train) == 1
    single = split_patients(["a"], test_fraction=0.2)
    assert single.train == ("a",) and not single.test


def test_kfold_test_parts_partition_patients() -> None:
    folds = kfold_patients(CASES, n_folds=5, val_fraction=0.2, seed=3)
    tested = [case for fold in folds for case in fold.test]
    assert sorted(tested) == sorted(set(CASES))
    for fold in folds:
        assert not set(fold.test) & (set(fold.train) | set(fold.val))
        assert not set(fold.train) & set(fold.val)
    with pytest.raises(ValueError, match="n_folds"):
        kfold_patients(["a", "b"], n_folds=3)


def test_config_picks_holdout_or_fold() -> None:
    holdout = split_for_config(CASES, ExperimentConfig(split_seed=4))
    assert holdout == split_patients(CASES, 0.2, 0.2, 4)
    fold = split_for_config(CASES, ExperimentConfig(split_seed=4, n_folds=4, fold=2))
    assert fold == kfold_patients(CASES, 4, 0.2, 4)[2]


def test_timepoints_of_one_patient_share_a_part_and_single_timepoints_split_as_before() -> None:
    # BraTS-MET-PPPPP-TTT: two timepoints of each of 6 patients, one of 6 others
    cases = [f"BraTS-MET-{p:05d}-{t:03d}" for p in range(12) for t in range(2 if p < 6 else 1)]
    for split in [split_patients(cases, 0.25, 0.25, seed=3), *kfold_patients(cases, 3, seed=3)]:
        for patient in range(6):
            parts = {part for part in ("train", "val", "test") for case in getattr(split, part)
                     if case.startswith(f"BraTS-MET-{patient:05d}-")}
            assert len(parts) == 1, (patient, split)
        assert sorted(split.train + split.val + split.test) == sorted(cases)
    assert patient_of("BraTS-MET-00110-001") == "BraTS-MET-00110" and patient_of("TCGA_CS_4941_19960909") == "TCGA_CS_4941_19960909"
    # a documented pattern groups other ids; ids that are their own patients split exactly as before grouping
    assert patient_of("pt07_scan2", r"^(pt\d+)_") == "pt07"
    single = [f"P{i:02d}" for i in range(20)]
    expected = np.random.default_rng(5).permutation(sorted(single))
    assert split_patients(single, 0.2, 0.0, seed=5).test == tuple(sorted(expected[:4]))
