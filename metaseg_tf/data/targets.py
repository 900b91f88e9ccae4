"""Label conventions and segmentation targets: which labels of a mask make up the region a model learns.

Masks keep the labels they were stored with (0 is background). A dataset's **label convention** says what
its labels mean, and so which labels make up the three nested regions BraTS evaluates:

================  ==============================================  =========  ==========  ===========
convention        labels                                          WT         TC          ET
================  ==============================================  =========  ==========  ===========
``brats``         1 necrotic core (NETC), 2 oedema (SNFH),        {1, 2, 3}  {1, 3}      {3}
                  3 enhancing tumour (BraTS 2023 METS / GLI /
                  SSA / MEN, BraTS-METS 2024)
``brats_post``    ``brats`` and 4 resection cavity (RC, in no     {1, 2, 3}  {1, 3}      {3}
                  region; BraTS 2024 GLI post-treatment)
``brats2021``     1 necrotic core, 2 oedema, 4 enhancing tumour   {1, 2, 4}  {1, 4}      {4}
                  (BraTS 2018-2021)
``msd``           1 oedema, 2 non-enhancing tumour,               {1, 2, 3}  {2, 3}      {3}
                  3 enhancing tumour (MSD Task01_BrainTumour)
``binary``        any non-zero label is lesion (2D slice sets)    non-zero   non-zero    non-zero
================  ==============================================  =========  ==========  ===========

A label outside its convention (e.g. 5 in ``brats``) belongs to no region; the readers warn about it.
Labels keep their dataset's meaning from reading to the file written: a prediction is written in the
convention of the data being predicted (:meth:`Target.to_labels` with ``convention``), whatever the training
data's was, by region: a model of WT writes WT's label of that convention, and so on.

A config's ``target`` picks what the model segments: ``any`` (any lesion: the 2D layouts' non-zero masks;
in a region convention the whole tumour, WT), one region ``wt`` / ``tc`` / ``et``, an explicit label set ``labels:1,3``, or ``multilabel`` (WT, TC
and ET as three sigmoid outputs, as BraTS scores them). :meth:`Target.masks` turns labels into target
masks; :meth:`Target.to_labels` turns predicted region masks back into labels of the dataset's convention
(for ``-seg.nii.gz`` files a challenge evaluator reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

REGION_NAMES = ("wt", "tc", "et")
LABEL_CONVENTIONS: dict[str, dict[str, tuple[int, ...] | None]] = {
    "brats": {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)},
    "brats_post": {"wt": (1, 2, 3), "tc": (1, 3), "et": (3,)},
    "brats2021": {"wt": (1, 2, 4), "tc": (1, 4), "et": (4,)},
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
    "binary": {"wt": None, "tc": None, "et": None},
}
LABEL_NAMES = {"brats": {1: "NETC", 2: "SNFH", 3: "ET"}, "brats_post": {1: "NETC", 2: "SNFH", 3: "ET", 4: "RC"},
               "brats2021": {1: "NCR", 2: "ED", 4: "ET"},
               "msd": {1: "oedema", 2: "non-enhancing", 3: "enhancing"}, "binary": {1: "lesion"}}
# Which label each region's voxels get when region masks are written back as one label map: the innermost
# region wins (ET inside TC inside WT).
REGION_LABELS = {"brats": {"wt": 2, "tc": 1, "et": 3}, "brats_post": {"wt": 2, "tc": 1, "et": 3},
                 "brats2021": {"wt": 2, "tc": 1, "et": 4}, "msd": {"wt": 1, "tc": 2, "et": 3},
                 "binary": {"wt": 1, "tc": 1, "et": 1}}


def unknown_labels(labels: np.ndarray, convention: str) -> dict[int, int]:
    """``{label: voxels}`` of the non-zero labels of ``labels`` that the convention does not define (they
    belong to no region); empty for ``binary``, where every non-zero label is lesion."""
    if convention == "binary":
        return {}
    values, counts = np.unique(np.asarray(labels), return_counts=True)
    known = set(LABEL_NAMES[convention])
    return {int(v): int(c) for v, c in zip(values, counts) if v and int(v) not in known}


@dataclass(frozen=True)
class Target:
    """What a model segments: ``regions`` maps each output channel's name to its label set (None: any
    non-zero label), in output-channel order."""

    regions: dict[str, tuple[int, ...] | None]
    convention: str = "binary"

    @property
    def names(self) -> list[str]:
        return list(self.regions)

    def region_of(self, name: str) -> str | None:
        """The BraTS region (``wt`` / ``tc`` / ``et``) output ``name`` segments, or None: a region by name, a
        label set equal to one of the convention's regions, ``lesion`` (target ``any``, or a region of
        binary masks) as WT."""
        if name in REGION_NAMES:
            return name
        members = self.regions[name]
        if members is None or name == "lesion":
            return "wt"
        matching = [region for region, labels in LABEL_CONVENTIONS[self.convention].items()
                    if labels is not None and set(labels) == set(members)]
        return matching[0] if matching else None

    def in_convention(self, convention: str) -> Target:
        """The same outputs read in another label ``convention`` (to score or write a prediction in the
        convention of the data being predicted): each region keeps its region (its labels in ``convention``);
        a label set that is no region keeps its labels."""
        if convention not in LABEL_CONVENTIONS:
            raise ValueError(f"unknown label convention {convention!r}; known: {', '.join(LABEL_CONVENTIONS)}")
        regions = {}
        for name, members in self.regions.items():
            region = self.region_of(name)
            regions[name] = LABEL_CONVENTIONS[convention][region] if region is not None else members
        return Target(regions, convention)

    def masks(self, labels: np.ndarray) -> np.ndarray:
        """``uint8 (..., H, W)`` labels -> ``uint8 (..., H, W, regions)`` target masks in {0, 1}."""
        labels = np.asarray(labels)
        return np.stack([(labels > 0) if members is None else np.isin(labels, members)
                         for members in self.regions.values()], axis=-1).astype(np.uint8)

    def to_labels(self, region_masks: np.ndarray, convention: str | None = None) -> np.ndarray:
        """Binary ``(..., regions)`` predictions -> ``uint8 (...)`` labels of ``convention`` (default: the
        target's own), the label map a challenge evaluator reads.

        Each output is written as its region (:meth:`region_of`) with that region's label in the convention
        (BraTS: WT 2, TC 1, ET 3; BraTS 2021: ET 4; MSD: WT 1, TC 2, ET 3; binary: 1), so an evaluator that
        reads the file by the convention finds that region (and its outer regions) in it: ``any`` is written
        as WT, ``labels:3`` as ET. A label set that is no region is written as its first label. Several
        outputs: the innermost region last, so ET voxels are labelled ET even where WT was missed."""
        convention = convention or self.convention
        region_masks = np.asarray(region_masks) > 0
        labels = np.zeros(region_masks.shape[:-1], np.uint8)
        values = REGION_LABELS[convention]
        written = []
        for channel, name in enumerate(self.names):
            region = self.region_of(name)
            value = values[region] if region is not None else self.regions[name][0]
            written.append((REGION_NAMES.index(region) if region is not None else -1, channel, value))
        for _, channel, value in sorted(written):  # outer regions first, the innermost wins
            labels[region_masks[..., channel]] = value
        return labels


def resolve_target(target: str, convention: str = "binary") -> Target:
    """The :class:`Target` of a config's ``target`` for a dataset of label ``convention``.

    ``any`` is any non-zero label (binary masks) or the whole tumour (a region convention, so a BraTS
    ``brats_post`` resection cavity is not lesion); ``wt`` / ``tc`` / ``et`` are the convention's regions (a 2D slice set's
    ``binary`` masks have one lesion label, which stands for every region: the target is then ``lesion``);
    ``labels:a,b`` is that label set whatever the convention.
    """
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; known: {', '.join(LABEL_CONVENTIONS)}")
    regions = LABEL_CONVENTIONS[convention]
    if target == "any":
        return Target({"lesion": regions["wt"]}, convention)
    if target in REGION_NAMES:  # binary masks have one lesion label, which stands for any region
        return Target({"lesion" if convention == "binary" else target: regions[target]}, convention)
    if target == "multilabel":
        if convention == "binary":
            raise ValueError("target multilabel needs masks with region labels (BraTS-METS, MSD or a generic "
                             "layout with region masks); these masks are binary")
        return Target({name: regions[name] for name in REGION_NAMES}, convention)
    if target.startswith("labels:"):
        members = tuple(int(v) for v in target.split(":", 1)[1].split(","))
        return Target({"labels_" + "_".join(map(str, members)): members}, convention)
    raise ValueError(f"unknown target {target!r}")
