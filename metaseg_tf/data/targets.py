"""Label conventions and segmentation targets: which labels of a mask make up the region a model learns.

Masks keep the labels they were stored with (0 is background). A dataset's **label convention** says what
its labels mean, and so which labels make up the three nested regions BraTS evaluates:

=============  ==============================================  =========  ==========  ===========
convention     labels                                          WT         TC          ET
=============  ==============================================  =========  ==========  ===========
``brats``      1 necrotic core (NETC), 2 oedema (SNFH),        {1, 2, 3}  {1, 3}      {3}
               3 enhancing tumour (BraTS 2023 METS / GLI)
``msd``        1 oedema, 2 non-enhancing tumour,               {1, 2, 3}  {2, 3}      {3}
               3 enhancing tumour (MSD Task01_BrainTumour)
``binary``     any non-zero label is lesion (2D slice sets)    non-zero   non-zero    non-zero
=============  ==============================================  =========  ==========  ===========

A config's ``target`` picks what the model segments: ``any`` (any non-zero label: the 2D layouts' lesion
masks), one region ``wt`` / ``tc`` / ``et``, an explicit label set ``labels:1,3``, or ``multilabel`` (WT, TC
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
    "msd": {"wt": (1, 2, 3), "tc": (2, 3), "et": (3,)},
    "binary": {"wt": None, "tc": None, "et": None},
}
LABEL_NAMES = {"brats": {1: "NETC", 2: "SNFH", 3: "ET"}, "msd": {1: "oedema", 2: "non-enhancing", 3: "enhancing"},
               "binary": {1: "lesion"}}
# Which label each region's voxels get when region masks are written back as one label map: the innermost
# region wins (ET inside TC inside WT).
REGION_LABELS = {"brats": {"wt": 2, "tc": 1, "et": 3}, "msd": {"wt": 1, "tc": 2, "et": 3},
                 "binary": {"wt": 1, "tc": 1, "et": 1}}


@dataclass(frozen=True)
class Target:
    """What a model segments: ``regions`` maps each output channel's name to its label set (None: any
    non-zero label), in output-channel order."""

    regions: dict[str, tuple[int, ...] | None]
    convention: str = "binary"

    @property
    def names(self) -> list[str]:
        return list(self.regions)

    def masks(self, labels: np.ndarray) -> np.ndarray:
        """``uint8 (..., H, W)`` labels -> ``uint8 (..., H, W, regions)`` target masks in {0, 1}."""
        labels = np.asarray(labels)
        return np.stack([(labels > 0) if members is None else np.isin(labels, members)
                         for members in self.regions.values()], axis=-1).astype(np.uint8)

    def to_labels(self, region_masks: np.ndarray) -> np.ndarray:
        """Binary ``(..., regions)`` predictions -> ``uint8 (...)`` labels of the convention.

        One region: its voxels get the region's label in the convention (BraTS: WT 2, TC 1, ET 3), so an
        evaluator that reads the file by the convention finds that region (and its outer regions) in it; a
        label set or a binary convention gives 1. Several regions (WT, TC, ET): the label map of the
        convention, innermost region last, so ET voxels are labelled ET even where WT was missed."""
        region_masks = np.asarray(region_masks) > 0
        if len(self.regions) == 1:
            value = REGION_LABELS[self.convention].get(self.names[0], 1)
            return region_masks[..., 0].astype(np.uint8) * np.uint8(value)
        labels = np.zeros(region_masks.shape[:-1], np.uint8)
        values = REGION_LABELS[self.convention]
        for channel, name in sorted(enumerate(self.names), key=lambda item: REGION_NAMES.index(item[1])):
            labels[region_masks[..., channel]] = values[name]
        return labels


def resolve_target(target: str, convention: str = "binary") -> Target:
    """The :class:`Target` of a config's ``target`` for a dataset of label ``convention``.

    ``any`` is any non-zero label; ``wt`` / ``tc`` / ``et`` are the convention's regions (a 2D slice set's
    ``binary`` masks have one lesion label, which stands for every region: the target is then ``lesion``);
    ``labels:a,b`` is that label set whatever the convention.
    """
    if convention not in LABEL_CONVENTIONS:
        raise ValueError(f"unknown label convention {convention!r}; known: {', '.join(LABEL_CONVENTIONS)}")
    regions = LABEL_CONVENTIONS[convention]
    if target == "any":
        return Target({"lesion": None}, convention)
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
