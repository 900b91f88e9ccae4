"""Find image/mask pairs under a folder, whatever of the supported layouts it uses.

Layouts (tried in this order, the first that yields pairs wins):

``images_masks``
    ``root/images/<stem>.<ext>`` with ``root/masks/<stem>.<ext>`` or ``root/masks/<stem>_mask.<ext>``.
``kaggle_3m``
    one folder per patient, ``root/<case>/<case>_<n>.<ext>`` with ``root/<case>/<case>_<n>_mask.<ext>``
    (the LGG segmentation set of Buda et al. 2019). The case id is the folder name.
``flat``
    ``root/<stem>.<ext>`` with ``root/<stem>_mask.<ext>`` side by side.

Image and mask may use different extensions (``.webp`` image, ``.png`` mask). For ``images_masks`` and
``flat`` the case id is the stem without a trailing ``_<number>`` (``BraTS-MET-00233-000_1016`` ->
case ``BraTS-MET-00233-000``, slice 1016); a stem without such a number is its own case, slice 0.

Nothing is dropped silently: images without masks, masks without images, ambiguous duplicates and
files that are not images are listed in the :class:`DiscoveryReport` and summarised in one log line.
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".dcm")
LAYOUTS = ("images_masks", "kaggle_3m", "flat")
MASK_SUFFIX = "_mask"
_TRAILING_NUMBER = re.compile(r"^(?P<case>.+?)[_-](?P<slice>\d+)$")


class DataError(ValueError):
    """Input data that cannot be used: a missing or empty folder, no pairs, an unreadable file."""


@dataclass(frozen=True)
class SlicePair:
    """One 2D slice: where its image and mask are, and which patient (case) it belongs to."""

    case_id: str
    slice_index: int
    image_path: Path
    mask_path: Path


@dataclass
class DiscoveryReport:
    """The pairs found under ``root`` and everything that was not used, with the reason."""

    root: Path
    layout: str
    pairs: list[SlicePair]
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)
    ignored_files: list[Path] = field(default_factory=list)
    repeated_slices: list[Path] = field(default_factory=list)

    @property
    def case_ids(self) -> list[str]:
        return sorted({pair.case_id for pair in self.pairs})

    @property
    def n_skipped(self) -> int:
        return len(self.unpaired_images) + len(self.unpaired_masks) + len(self.duplicates) + len(self.repeated_slices)

    def skipped_reasons(self) -> dict[str, list[Path]]:
        """Skipped image files grouped by reason (only the non-empty groups); see also ``ignored_files``."""
        groups = {
            "image without mask": self.unpaired_images,
            "mask without image": self.unpaired_masks,
            "duplicate stem with another extension": self.duplicates,
            "slice number already taken by another image of the case": self.repeated_slices,
        }
        return {reason: paths for reason, paths in groups.items() if paths}

    def summary_line(self) -> str:
        return (
            f"{self.root}: layout {self.layout}, {len(self.case_ids)} patients, {len(self.pairs)} pairs; "
            f"skipped {len(self.unpaired_images)} images without mask, {len(self.unpaired_masks)} masks "
            f"without image, {len(self.duplicates)} duplicates, {len(self.repeated_slices)} repeated slice "
            f"numbers; ignored {len(self.ignored_files)} other files"
        )


def split_case_and_slice(stem: str) -> tuple[str, int]:
    """``'TCGA_CS_4941_19960909_12'`` -> ``('TCGA_CS_4941_19960909', 12)``; no number -> ``(stem, 0)``."""
    match = _TRAILING_NUMBER.match(stem)
    if match is None:
        return stem, 0
    return match["case"], int(match["slice"])


def _is_image(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_EXTENSIONS


def _visible_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith("."))


@dataclass
class _Matching:
    """Images and masks of one folder (or folder pair), indexed by stem."""

    pairs: list[tuple[str, Path, Path]] = field(default_factory=list)
    unpaired_images: list[Path] = field(default_factory=list)
    unpaired_masks: list[Path] = field(default_factory=list)
    duplicates: list[Path] = field(default_factory=list)


def _index_by_stem(paths: list[Path], duplicates: list[Path]) -> dict[str, Path]:
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for path in paths:
        by_stem[path.stem].append(path)
    index = {}
    for stem, candidates in by_stem.items():
        index[stem] = candidates[0]
        duplicates.extend(candidates[1:])
    return index


def _match(images: list[Path], masks: list[Path]) -> _Matching:
    """Pair images with masks whose stem is the image stem, optionally followed by ``_mask``."""
    result = _Matching()
    image_by_stem = _index_by_stem(images, result.duplicates)
    mask_by_stem = _index_by_stem(masks, result.duplicates)
    used_masks: set[str] = set()
    for stem, image in sorted(image_by_stem.items()):
        mask_stem = stem + MASK_SUFFIX if stem + MASK_SUFFIX in mask_by_stem else stem
        if mask_stem in mask_by_stem and mask_stem not in used_masks:
            used_masks.add(mask_stem)
            result.pairs.append((stem, image, mask_by_stem[mask_stem]))
        else:
            result.unpaired_images.append(image)
    result.unpaired_masks = [mask for stem, mask in sorted(mask_by_stem.items()) if stem not in used_masks]
    return result


def _split_images_and_masks(files: list[Path]) -> tuple[list[Path], list[Path]]:
    images = [f for f in files if _is_image(f) and not f.stem.endswith(MASK_SUFFIX)]
    masks = [f for f in files if _is_image(f) and f.stem.endswith(MASK_SUFFIX)]
    return images, masks


def _discover_images_masks(root: Path) -> DiscoveryReport | None:
    image_dir, mask_dir = root / "images", root / "masks"
    if not (image_dir.is_dir() and mask_dir.is_dir()):
        return None
    image_files, mask_files = _visible_files(image_dir), _visible_files(mask_dir)
    matching = _match([f for f in image_files if _is_image(f)], [f for f in mask_files if _is_image(f)])
    pairs = []
    for stem, image, mask in matching.pairs:
        case_id, slice_index = split_case_and_slice(stem)
        pairs.append(SlicePair(case_id, slice_index, image, mask))
    ignored = [f for f in image_files + mask_files if not _is_image(f)] + _visible_files(root)
    return DiscoveryReport(
        root, "images_masks", pairs, matching.unpaired_images, matching.unpaired_masks,
        matching.duplicates, ignored,
    )


def _discover_kaggle_3m(root: Path) -> DiscoveryReport | None:
    case_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not case_dirs:
        return None
    report = DiscoveryReport(root, "kaggle_3m", [])
    for case_dir in case_dirs:
        files = _visible_files(case_dir)
        images, masks = _split_images_and_masks(files)
        matching = _match(images, masks)
        for stem, image, mask in matching.pairs:
            _, slice_index = split_case_and_slice(stem)
            report.pairs.append(SlicePair(case_dir.name, slice_index, image, mask))
        report.unpaired_images += matching.unpaired_images
        report.unpaired_masks += matching.unpaired_masks
        report.duplicates += matching.duplicates
        report.ignored_files += [f for f in files if not _is_image(f)]
    if not report.pairs:
        return None
    report.ignored_files += _visible_files(root)
    return report


def _discover_flat(root: Path) -> DiscoveryReport | None:
    files = _visible_files(root)
    images, masks = _split_images_and_masks(files)
    if not masks:
        return None
    matching = _match(images, masks)
    pairs = []
    for stem, image, mask in matching.pairs:
        case_id, slice_index = split_case_and_slice(stem)
        pairs.append(SlicePair(case_id, slice_index, image, mask))
    return DiscoveryReport(
        root, "flat", pairs, matching.unpaired_images, matching.unpaired_masks, matching.duplicates,
        [f for f in files if not _is_image(f)],
    )


def _drop_repeated_slices(report: DiscoveryReport) -> None:
    """A case's slices are placed by their number (3D scores, 2.5D context): two images of one case with one
    number (``t1_5.png`` and ``flair_5.png``; names without a number are slice 0) cannot both be placed. The
    first by name is kept; the others are skipped and reported."""
    kept, seen = [], set()
    for pair in report.pairs:
        key = (pair.case_id, pair.slice_index)
        if key in seen:
            report.repeated_slices.append(pair.image_path)
        else:
            seen.add(key)
            kept.append(pair)
    report.pairs = kept


_LAYOUT_FINDERS = {
    "images_masks": _discover_images_masks,
    "kaggle_3m": _discover_kaggle_3m,
    "flat": _discover_flat,
}


def discover_pairs(root: str | Path) -> DiscoveryReport:
    """Find every image/mask pair under ``root``.

    Returns a report whose ``pairs`` are sorted by case id, then numerically by slice index (slice 10
    follows slice 9). Raises :class:`DataError` when ``root`` is missing, is not a folder, is empty, or
    holds no pairs in any layout (the message lists the layouts tried).
    """
    root = Path(root)
    if not root.exists():
        raise DataError(f"data folder not found: {root}")
    if not root.is_dir():
        raise DataError(f"not a folder: {root}")
    if not any(root.iterdir()):
        raise DataError(f"data folder is empty: {root}")
    for layout in LAYOUTS:
        report = _LAYOUT_FINDERS[layout](root)
        if report is not None and report.pairs:
            report.pairs.sort(key=lambda p: (p.case_id, p.slice_index, p.image_path.name))
            _drop_repeated_slices(report)
            log = logger.warning if report.n_skipped else logger.info
            log(report.summary_line())
            return report
    raise DataError(
        f"no image/mask pairs found in {root}; layouts tried: images/ + masks/ folders, one folder per "
        "patient with <case>_<n>.<ext> + <case>_<n>_mask.<ext> (kaggle_3m), and flat <stem>.<ext> + "
        f"<stem>_mask.<ext>; image extensions: {', '.join(IMAGE_EXTENSIONS)}"
    )
