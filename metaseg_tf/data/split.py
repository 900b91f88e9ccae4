"""Patient-level splits: every slice of a patient lands in exactly one of train, validation and test.

Splitting slices at random would put neighbouring, almost identical slices of one patient on both sides
and inflate every test figure (patient leakage). Here the unit is the patient: a case id, except where
several cases are timepoints of one patient (BraTS ``BraTS-MET-00110-000`` and ``-001``, or a
``patient_pattern`` of the config; :func:`patient_of`), which always land in the same part. Splits list case
ids, so a split of single-timepoint cases is the same as before patients were grouped.

* :func:`split_patients`: hold out ``test_fraction`` of the patients for testing (default 20 %, the 80/20
  of the brief), then carve ``val_fraction`` of the remaining patients out for validation.
* :func:`kfold_patients`: ``k`` folds over patients; fold ``i`` tests on the ``i``-th group and validates
  on a ``val_fraction`` part of the others.

Both are deterministic for a given seed and set of case ids (the ids are sorted before shuffling, so the
order in which files were found does not matter). Every non-empty fraction gets at least one patient.

A split is computed once, when a run starts, and recorded in the run's ``data.json``; evaluating or
resuming the run reads it back (:meth:`PatientSplit.from_dict`) instead of splitting the folder again, since
one added or unreadable patient would shift the whole permutation. :func:`missing_patients` says which
recorded patients the data no longer holds.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from metaseg_tf.config import ExperimentConfig

# BraTS 2023+ case ids: BraTS-<set>-<patient>-<timepoint>
BRATS_CASE_ID = re.compile(r"(?P<patient>BraTS-(?P<set>[A-Za-z]+)-\d+)-\d+")


def patient_of(case_id: str, pattern: str = "") -> str:
    """The patient a case belongs to: the first group (or the whole match) of the regular expression
    ``pattern`` where given and matching, ``BraTS-<set>-<patient>`` for a BraTS 2023+ id
    (``BraTS-MET-00110-000`` -> ``BraTS-MET-00110``), else the case id itself."""
    if pattern:
        match = re.search(pattern, case_id)
        if match:
            return match.group(1) if match.groups() else match.group(0)
        return case_id
    match = BRATS_CASE_ID.fullmatch(case_id)
    return match["patient"] if match else case_id


def patient_groups(case_ids: list[str] | np.ndarray, pattern: str = "") -> dict[str, list[str]]:
    """``{patient: [case ids]}`` (sorted) of the unique ``case_ids``."""
    groups: dict[str, list[str]] = {}
    for case in sorted(set(np.asarray(case_ids).tolist())):
        groups.setdefault(patient_of(case, pattern), []).append(case)
    return groups


@dataclass(frozen=True)
class PatientSplit:
    """Case ids of each part; disjoint, and together all the patients."""

    train: tuple[str, ...]
    val: tuple[str, ...]
    test: tuple[str, ...]

    def indices(self, case_ids: np.ndarray, part: str) -> np.ndarray:
        """Positions in ``case_ids`` (one per slice) that belong to ``part`` (train, val or test)."""
        members = getattr(self, part)
        return np.flatnonzero(np.isin(case_ids, np.asarray(members)))

    def to_dict(self) -> dict[str, list[str]]:
        return {"train": list(self.train), "val": list(self.val), "test": list(self.test)}

    @classmethod
    def from_dict(cls, parts: dict[str, list[str]]) -> PatientSplit:
        """The split recorded by :meth:`to_dict` (a run's ``data.json``)."""
        return cls(*(tuple(parts.get(part, ())) for part in ("train", "val", "test")))

    @classmethod
    def only_test(cls, case_ids: list[str] | np.ndarray) -> PatientSplit:
        """Every patient in the test part: an external test set, which is scored whole and never split."""
        return cls((), (), tuple(sorted(set(np.asarray(case_ids).tolist()))))

    def without(self, missing: set[str]) -> PatientSplit:
        """The same split less the patients in ``missing``."""
        return PatientSplit(*(tuple(c for c in getattr(self, part) if c not in missing)
                              for part in ("train", "val", "test")))


def missing_patients(split: PatientSplit, case_ids: list[str] | np.ndarray,
                     parts: tuple[str, ...] = ("train", "val", "test")) -> list[str]:
    """The patients of ``parts`` of ``split`` that are not among ``case_ids`` (sorted)."""
    present = set(np.asarray(case_ids).tolist())
    return sorted(case for part in parts for case in getattr(split, part) if case not in present)


def _count(n: int, fraction: float) -> int:
    if fraction <= 0 or n < 2:
        return 0
    return min(n - 1, max(1, math.floor(n * fraction + 0.5)))


def _unique_shuffled(case_ids: list[str] | np.ndarray, seed: int, pattern: str) -> list[list[str]]:
    """The patients of ``case_ids`` (each the list of its cases) in a seeded random order."""
    groups = patient_groups(case_ids, pattern)
    if not groups:
        raise ValueError("cannot split an empty list of patients")
    patients = sorted(groups)
    order = np.random.default_rng(seed).permutation(len(patients))
    return [groups[patients[i]] for i in order]


def _with_validation(test: list[list[str]], rest: list[list[str]], val_fraction: float) -> PatientSplit:
    n_val = _count(len(rest), val_fraction)

    def cases(patients: list[list[str]]) -> tuple[str, ...]:
        return tuple(sorted(case for patient in patients for case in patient))

    return PatientSplit(cases(rest[n_val:]), cases(rest[:n_val]), cases(test))


def split_patients(
    case_ids: list[str] | np.ndarray, test_fraction: float = 0.2, val_fraction: float = 0.2, seed: int = 42,
    patient_pattern: str = "",
) -> PatientSplit:
    """Train/val/test split of the patients of ``case_ids`` (see the module docstring); fractions count
    patients."""
    shuffled = _unique_shuffled(case_ids, seed, patient_pattern)
    n_test = _count(len(shuffled), test_fraction)
    return _with_validation(shuffled[:n_test], shuffled[n_test:], val_fraction)


def kfold_patients(
    case_ids: list[str] | np.ndarray, n_folds: int = 5, val_fraction: float = 0.2, seed: int = 42,
    patient_pattern: str = "",
) -> list[PatientSplit]:
    """``n_folds`` splits whose test parts partition the patients (sizes differ by at most one patient)."""
    shuffled = _unique_shuffled(case_ids, seed, patient_pattern)
    if not 2 <= n_folds <= len(shuffled):
        raise ValueError(f"n_folds must lie in [2, {len(shuffled)}] for {len(shuffled)} patients")
    groups = [shuffled[i::n_folds] for i in range(n_folds)]
    splits = []
    for fold, test in enumerate(groups):
        rest = [patient for other, group in enumerate(groups) if other != fold for patient in group]
        splits.append(_with_validation(test, rest, val_fraction))
    return splits


def split_for_config(case_ids: list[str] | np.ndarray, config: ExperimentConfig) -> PatientSplit:
    """The split a config asks for: fold ``config.fold`` of k-fold when ``n_folds`` is set, else hold-out;
    cases grouped into patients by ``config.patient_pattern`` (or the BraTS rule)."""
    if config.n_folds:
        return kfold_patients(case_ids, config.n_folds, config.val_fraction, config.split_seed,
                              config.patient_pattern)[config.fold]
    return split_patients(case_ids, config.test_fraction, config.val_fraction, config.split_seed,
                          config.patient_pattern)
