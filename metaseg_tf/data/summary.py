"""What a dataset folder holds: patients, pairs (or cases and sequences of a volume layout), lesion prevalence
and every file that was skipped."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

from metaseg_tf.data.discover import DataError, DiscoveryReport
from metaseg_tf.data.io import check_pair_shapes, read_image, read_mask_labels
from metaseg_tf.data.split import patient_groups
from metaseg_tf.data.targets import LABEL_CONVENTIONS, LABEL_NAMES
from metaseg_tf.data.volumes import DEFAULT_SEQUENCES, VolumeReport


@dataclass
class DatasetSummary:
    """Counts over a discovered dataset; ``unreadable`` maps image paths to the reason they failed."""

    report: DiscoveryReport
    checked: bool
    slices_with_lesion: int = 0
    lesion_pixels: int = 0
    total_pixels: int = 0
    image_shapes: Counter = field(default_factory=Counter)
    mask_encodings: Counter = field(default_factory=Counter)
    mask_labels: set[int] = field(default_factory=set)
    unreadable: dict[str, str] = field(default_factory=dict)

    @property
    def usable_pairs(self) -> int:
        return len(self.report.pairs) - len(self.unreadable)

    def lines(self, show: int = 5) -> list[str]:
        """Human-readable summary, naming up to ``show`` files per skip reason."""
        report = self.report
        lines = [
            f"data folder : {report.root}",
            f"layout      : {report.layout}",
            f"patients    : {len(report.case_ids)}",
            f"pairs       : {len(report.pairs)}",
        ]
        if self.checked:
            shapes = ", ".join(f"{w}x{h} ({n})" for (h, w), n in self.image_shapes.most_common())
            lines += [
                f"readable    : {self.usable_pairs} pairs; image sizes {shapes or 'none'}",
                f"with lesion : {self.slices_with_lesion} slices "
                f"({100.0 * self.slices_with_lesion / max(self.usable_pairs, 1):.1f} %), lesion pixels "
                f"{100.0 * self.lesion_pixels / max(self.total_pixels, 1):.2f} % of all",
                "masks       : " + (", ".join(f"{n} x {encoding}" for encoding, n in self.mask_encodings.most_common())
                                     or "none read")
                + (f"; labels {sorted(self.mask_labels)} (any non-zero label is lesion)" if self.mask_labels else ""),
            ]
        reasons = dict(report.skipped_reasons())
        if self.unreadable:
            reasons["unreadable, truncated or size mismatch"] = list(self.unreadable)
        groups = [("skipped", reason, paths) for reason, paths in reasons.items()]
        if report.ignored_files:
            groups.append(("ignored", "not an image, or outside the layout", report.ignored_files))
        if not reasons:
            lines.append("skipped     : nothing")
        for verb, reason, paths in groups:
            lines.append(f"{verb:<12}: {len(paths)} x {reason}")
            for path in paths[:show]:
                detail = self.unreadable.get(str(path), "")
                lines.append(f"                {path}{'  -- ' + detail if detail else ''}")
            if len(paths) > show:
                lines.append(f"                ... and {len(paths) - show} more")
        return lines


def summarise_dataset(report: DiscoveryReport, check: bool = True, progress: bool = True) -> DatasetSummary:
    """Summarise ``report``; with ``check`` every pair is read, which finds unreadable and mismatched files."""
    summary = DatasetSummary(report, checked=check)
    if not check:
        return summary
    for pair in tqdm(report.pairs, desc="reading pairs", unit="pair", disable=not progress):
        try:
            image, labels = read_image(pair.image_path), read_mask_labels(pair.mask_path)
            check_pair_shapes(pair, image, labels.labels)
        except DataError as error:
            summary.unreadable[str(pair.image_path)] = str(error)
            continue
        summary.mask_encodings[labels.encoding] += 1
        if labels.encoding.startswith(("label map", "float", "colour")):
            summary.mask_labels.update(int(v) for v in np.unique(labels.labels) if v > 0)
        mask = labels.binary
        summary.image_shapes[image.shape[:2]] += 1
        lesion = int(mask.sum())
        summary.slices_with_lesion += lesion > 0
        summary.lesion_pixels += lesion
        summary.total_pixels += mask.size
    return summary


def _patients_line(report: VolumeReport, pattern: str) -> str:
    groups = patient_groups(report.case_ids, pattern) if report.cases else {}
    several = sum(len(cases) > 1 for cases in groups.values())
    rule = f"pattern {pattern!r}" if pattern else "BraTS ids by patient, other ids one patient per case"
    return (f"patients    : {len(groups)} ({several} with several timepoints, kept in one split part; grouped by "
            f"{rule})")


def lesion_statistics(report: VolumeReport, progress: bool = False) -> tuple[list[dict], list[str]]:
    """Per region of the dataset's convention (one ``lesion`` region for binary labels), over the labelled
    cases (:func:`~metaseg_tf.data.explore.volume_statistics`): cases and axial slices with lesion, lesions
    (3D 26-connected components) and their volumes in mm^3 (voxels where the spacing is unknown); and the
    problems met (unreadable labels, labels outside the convention), one line each."""
    from metaseg_tf.data.explore import volume_statistics

    cases, lesions = volume_statistics(report, (), progress)
    problems = [f"{case}: labels not read: {reason}" for case, reason in cases.attrs["skipped"].items()]
    if report.convention != "binary":
        known = set(LABEL_NAMES[report.convention])
        for _, case in cases.iterrows():
            unknown = [column.split("_")[1] for column in cases.columns
                       if column.startswith("label_") and int(column.split("_")[1]) not in known and case[column]]
            if unknown:
                problems.append(f"{case['case_id']}: label(s) {', '.join(unknown)} outside the {report.convention} "
                                "convention (in no region)")
    unit = "mm^3" if cases.attrs["unit"] == "mm" else "voxels"
    regions = ["lesion"] if report.convention == "binary" else list(LABEL_CONVENTIONS[report.convention])
    rows = []
    for name in regions:
        volumes = lesions.loc[lesions["region"] == name, "volume"].to_numpy()
        present = cases[f"{name}_lesions"] > 0 if f"{name}_lesions" in cases else np.zeros(0, bool)
        rows.append({"region": name, "cases": int(present.sum()),
                     "slices": int(cases[f"{name}_slices"].sum()) if f"{name}_slices" in cases else 0,
                     "lesions": len(volumes), "unit": unit,
                     "median_volume": float(np.median(volumes)) if len(volumes) else None,
                     "min_volume": float(volumes.min()) if len(volumes) else None,
                     "max_volume": float(volumes.max()) if len(volumes) else None})
    return rows, problems


def summarise_volumes(report: VolumeReport, show: int = 5, patient_pattern: str = "",
                      sequences: tuple[str, ...] = (), lesions: bool = True, progress: bool = False) -> list[str]:
    """Human-readable summary of a volume layout: cases, patients, sequences, labels (with ``lesions``,
    :func:`lesion_statistics`: every seg is read), the cases ``sequences`` (default: the config's
    default) would skip, and every skipped case and ignored file with the reason (naming up to ``show`` of
    each)."""
    counted = Counter(name for case in report.cases for name in case.sequences)
    lines = [
        f"data folder : {report.root}",
        f"layout      : {report.layout} (labels: {report.convention} convention from the {report.convention_source}, "
        + ", ".join(f"{k} {v}" for k, v in LABEL_NAMES[report.convention].items()) + ")",
        f"cases       : {len(report.cases)} ({len(report.labelled_cases)} with labels, "
        f"{len(report.cases) - len(report.labelled_cases)} prediction only)",
        _patients_line(report, patient_pattern),
        "sequences   : " + (", ".join(f"{name} in {n} cases" for name, n in sorted(counted.items())) or "none"),
    ]
    if lesions and report.labelled_cases:
        rows, problems = lesion_statistics(report, progress)
        lines.append(f"lesions     : per region, over {len(report.labelled_cases)} labelled cases")
        for row in rows:
            sizes = (f"; volume median {row['median_volume']:.0f} {row['unit']} [{row['min_volume']:.0f}, "
                     f"{row['max_volume']:.0f}]") if row["lesions"] else ""
            lines.append(f"                {row['region']}: {row['cases']} cases, {row['slices']} axial slices with "
                         f"lesion, {row['lesions']} lesions{sizes}")
        lines += [f"                {problem}" for problem in problems[:show]]
        if len(problems) > show:
            lines.append(f"                ... and {len(problems) - show} more")
    wanted = tuple(sequences) or DEFAULT_SEQUENCES
    would_skip = {case: reason for case, reason in report.select(wanted).skipped.items() if case not in report.skipped}
    lines.append(f"with {', '.join(wanted)}: " + (f"{len(would_skip)} cases would be skipped" if would_skip
                                                     else "every case is used"))
    for case, reason in list(would_skip.items())[:show]:
        lines.append(f"                {case}  -- {reason}")
    lines.append(f"skipped     : {len(report.skipped)} cases" if report.skipped else "skipped     : nothing")
    for case, reason in list(report.skipped.items())[:show]:
        lines.append(f"                {case}  -- {reason}")
    if report.ignored_files:
        lines.append(f"ignored     : {len(report.ignored_files)} x not a sequence or label file of the layout")
        lines += [f"                {path}" for path in report.ignored_files[:show]]
    return lines
