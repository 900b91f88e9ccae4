"""Patient-level splits: no patient in two parts, deterministic, sensible sizes."""

from __future__ import annotations

import numpy as np
import pytest

from metaseg_tf.config import ExperimentConfig
from metaseg_tf.data.split import kfold_patients, split_for_config, split_patients

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
