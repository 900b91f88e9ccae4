"""Finding the published brain-metastasis layouts in a folder: each finder lists the cases it recognises
(:class:`~metaseg_tf.data.volumes.CaseFiles`) and every file or case it could not use, with the reason
(:class:`~metaseg_tf.data.volumes.VolumeReport`).

Layouts (auto-detected by :func:`discover_volumes`, tried in this order; the first that yields cases wins):

``msd``
    Medical Segmentation Decathlon Task01 and nnU-Net raw data: ``imagesTr/<case>.nii.gz`` 4D (channels
    FLAIR, T1w, T1gd, T2w, or the names in ``dataset.json``) or nnU-Net's split form
    ``imagesTr/<case>_0000.nii.gz`` ...; labels ``labelsTr/<case>.nii.gz`` (1 oedema, 2 non-enhancing,
    3 enhancing: the ``msd`` convention). ``imagesTs/`` cases have no labels: prediction only.
``brats_mets``
    BraTS-METS 2023/2024 and Pretreat-MetsToBrain-Masks: ``<case>/<case>-{t1c,t1n,t2f,t2w,seg}.nii.gz``
    (labels 1 NETC, 2 SNFH, 3 ET: the ``brats`` convention). Cases without ``seg`` are prediction only.
``brainmetshare``
    Stanford BrainMetShare: ``<case>/{0,1,2,3,seg}/<n>.png``, sequences 0 ``t1c`` (T1 gradient-echo
    post-contrast), 1 ``t1n`` (T1 pre-contrast), 2 ``t1c_se`` (T1 spin-echo post-contrast), 3 ``t2f``
    (FLAIR); slices sorted by their number; spacing unknown (distances in pixels).
``generic``
    A folder per case (or the data folder itself as one case) holding one NIfTI per sequence and one or more
    mask NIfTIs. A file is a mask when its name has a token ``seg``, ``mask`` or ``label``; a mask whose name
    has ``whole`` / ``core`` / ``enh`` is the WT / TC / ET region and they are combined into one label map of
    the ``brats`` convention (TC -> 1, the rest of WT -> 2, ET -> 3); another mask keeps its labels. A
    sequence file is named by a token (split at ``_ - .``): ``t1c t1ce t1gd t1post`` -> ``t1c``, ``t1n t1
    t1pre`` -> ``t1n``, ``t2f flair`` -> ``t2f``, ``t2w t2`` -> ``t2w``. Example: ``*_t1ce_*``,
    ``*_flair_*``, ``*_whole_seg_*``, ``*_core_seg_*``.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from metaseg_tf.data.discover import IMAGE_EXTENSIONS, DataError
from metaseg_tf.data.volumes import CaseFiles, is_nifti, load_nifti, name_tokens, nifti_stem, NIFTI_SUFFIXES, sequence_of, SequenceSource, VolumeReport

logger = logging.getLogger(__name__)

VOLUME_LAYOUTS = ("msd", "brats_mets", "brainmetshare", "generic")
MSD_CHANNELS = ("t2f", "t1n", "t1c", "t2w")  # Task01_BrainTumour: FLAIR, T1w, T1gd, T2w
BRAINMETSHARE_FOLDERS = {"0": "t1c", "1": "t1n", "2": "t1c_se", "3": "t2f"}
_REGION_TOKENS = {"whole": "wt", "wt": "wt", "core": "tc", "tc": "tc", "enh": "et", "enhancing": "et", "et": "et"}
_MASK_TOKENS = ("seg", "mask", "label", "labels")
_NOT_LESION_TOKENS = ("brain", "brainmask", "skull", "skullstrip")  # brain masks are not lesion labels


# --- finders ------------------------------------------------------------------------------------------
def _visible(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if not p.name.startswith("."))


def _case_dirs(root: Path) -> list[Path]:
    return [p for p in _visible(root) if p.is_dir()]


def _msd_channel_names(root: Path, count: int) -> tuple[str, ...]:
    """Sequence names of the 4D channels: from ``dataset.json`` (MSD ``modality`` or nnU-Net v2
    ``channel_names``) where given, else Task01's order."""
    manifest = root / "dataset.json"
    if manifest.is_file():
        try:
            described = json.loads(manifest.read_text())
            names = described.get("channel_names") or described.get("modality") or {}
            mapped = [sequence_of(Path(str(names[str(k)]))) for k in range(count)]
            if all(mapped) and len(set(mapped)) == count:
                return tuple(mapped)
            logger.warning("the channel names in %s (%s) are not all known sequences; using Task01's channel "
                           "order %s", manifest, names, ", ".join(MSD_CHANNELS[:count]))
        except (ValueError, KeyError, AttributeError):
            logger.warning("%s could not be read; using Task01's channel order", manifest)
    return MSD_CHANNELS[:count]


def _msd_cases(files: list[Path]) -> dict[str, dict[int, Path]]:
    """Files of ``imagesTr`` grouped by case: nnU-Net's split form ``<case>_0000 .. _000N`` (channels from 0
    without gaps) gives one case of N channels; any other file is one case of one 4D file (channel -1), so a
    4D file named ``pt_0001`` stays case ``pt_0001``."""
    split: dict[str, dict[int, Path]] = {}
    for path in files:
        match = re.fullmatch(r"(?P<case>.+)_(?P<channel>\d{4})", nifti_stem(path))
        if match:
            split.setdefault(match["case"], {})[int(match["channel"])] = path
    by_case: dict[str, dict[int, Path]] = {}
    for case, channels in split.items():
        if sorted(channels) == list(range(len(channels))):
            by_case[case] = channels
    grouped = {path for channels in by_case.values() for path in channels.values()}
    by_case.update({nifti_stem(path): {-1: path} for path in files if path not in grouped})
    return dict(sorted(by_case.items()))


def _discover_msd(root: Path) -> VolumeReport | None:
    report = VolumeReport(root, "msd", [])
    found = False
    for images_dir, labels_dir in (("imagesTr", "labelsTr"), ("imagesTs", None)):
        folder = root / images_dir
        if not folder.is_dir():
            continue
        files = [f for f in _visible(folder) if is_nifti(f)]
        report.ignored_files += [f for f in _visible(folder) if not is_nifti(f)]
        by_case = _msd_cases(files)
        for case_id, channels in sorted(by_case.items()):
            found = True
            if -1 in channels:  # one 4D file
                try:
                    shape = load_nifti(channels[-1]).shape
                except DataError as error:
                    report.skipped[case_id] = str(error)
                    continue
                count = shape[3] if len(shape) == 4 else 1
                names = _msd_channel_names(root, count)
                sequences = {name: SequenceSource(channels[-1], k if count > 1 else None) for k, name in enumerate(names)}
            else:
                names = _msd_channel_names(root, max(channels) + 1)
                sequences = {names[k]: SequenceSource(path) for k, path in channels.items() if k < len(names)}
                report.ignored_files += [path for k, path in channels.items() if k >= len(names)]
            candidates = [root / labels_dir / f"{case_id}{suffix}" for suffix in NIFTI_SUFFIXES] if labels_dir else []
            label = next((path for path in candidates if path.is_file()), None)
            labels = SequenceSource(label) if label is not None else None
            report.cases.append(CaseFiles(case_id, sequences, labels))
    return report if found else None


def _discover_brats(root: Path) -> VolumeReport | None:
    report = VolumeReport(root, "brats_mets", [])
    pattern = re.compile(r"(?P<case>.+)-(?P<kind>t1c|t1n|t2f|t2w|seg)")
    for case_dir in _case_dirs(root):
        sequences, labels = {}, None
        for path in _visible(case_dir):
            match = pattern.fullmatch(nifti_stem(path)) if is_nifti(path) else None
            if match is None or match["case"] != case_dir.name:
                report.ignored_files.append(path)
            elif match["kind"] == "seg":
                labels = SequenceSource(path)
            else:
                sequences[match["kind"]] = SequenceSource(path)
        if sequences:
            report.cases.append(CaseFiles(case_dir.name, sequences, labels))
        elif labels is not None:
            report.skipped[case_dir.name] = "a segmentation but no sequence file"
    return report if report.cases or report.skipped else None


def _numbered_pngs(folder: Path) -> tuple[Path, ...]:
    files = [f for f in _visible(folder) if f.suffix.lower() in IMAGE_EXTENSIONS and re.fullmatch(r"\d+", f.stem)]
    return tuple(sorted(files, key=lambda f: int(f.stem)))


def _discover_brainmetshare(root: Path) -> VolumeReport | None:
    report = VolumeReport(root, "brainmetshare", [])
    for case_dir in _case_dirs(root):
        subfolders = {p.name: p for p in _visible(case_dir) if p.is_dir()}
        if not set(subfolders) & set(BRAINMETSHARE_FOLDERS):
            continue
        stacks = {name: _numbered_pngs(folder) for name, folder in subfolders.items()
                  if name in BRAINMETSHARE_FOLDERS or name == "seg"}
        used = {path for files in stacks.values() for path in files}
        report.ignored_files += [path for name, folder in subfolders.items() for path in _visible(folder)
                                 if path not in used]
        report.ignored_files += [path for path in _visible(case_dir) if path.is_file()]
        numbers = {name: [f.stem for f in files] for name, files in stacks.items()}
        reference = numbers.get("0") or next(iter(numbers.values()))
        uneven = [name for name, found in numbers.items() if found != reference]
        if uneven:
            report.skipped[case_dir.name] = (f"the slice files of folder(s) {', '.join(uneven)} do not match "
                                             "folder 0's numbering")
            continue
        sequences = {BRAINMETSHARE_FOLDERS[name]: SequenceSource(subfolders[name], slice_files=files)
                     for name, files in stacks.items() if name != "seg" and files}
        labels = SequenceSource(subfolders["seg"], slice_files=stacks["seg"]) if stacks.get("seg") else None
        report.cases.append(CaseFiles(case_dir.name, sequences, labels))
    return report if report.cases else None


def _generic_case(case_id: str, files: list[Path], report: VolumeReport) -> CaseFiles | None:
    sequences, region_masks, labels = {}, {}, None
    for path in files:
        tokens = name_tokens(path)
        if any(token in _NOT_LESION_TOKENS for token in tokens):
            report.ignored_files.append(path)
            continue
        if any(token in _MASK_TOKENS for token in tokens):
            regions = [_REGION_TOKENS[t] for t in tokens if t in _REGION_TOKENS]
            if regions:
                region_masks[regions[0]] = path
            elif labels is None:
                labels = SequenceSource(path)
            else:
                report.ignored_files.append(path)
            continue
        name = sequence_of(path)
        if name is None or name in sequences:
            report.ignored_files.append(path)
        else:
            sequences[name] = SequenceSource(path)
    if not sequences:
        return None
    if labels is not None and region_masks:
        report.ignored_files += list(region_masks.values())
        region_masks = {}
    return CaseFiles(case_id, sequences, labels, region_masks)


def _common_case_id(files: list[Path], fallback: str) -> str:
    prefix = nifti_stem(files[0])
    for path in files[1:]:
        stem = nifti_stem(path)
        while not stem.startswith(prefix):
            prefix = prefix[:-1]
    prefix = prefix.rstrip("_-. ")
    return prefix or fallback


def _discover_generic(root: Path) -> VolumeReport | None:
    report = VolumeReport(root, "generic", [])
    own = [f for f in _visible(root) if f.is_file() and is_nifti(f)]
    folders = [(d, [f for f in _visible(d) if f.is_file() and is_nifti(f)]) for d in _case_dirs(root)]
    if own:  # the data folder is one case; its subfolders are not read
        report.ignored_files += [d for d, _ in folders]
        folders = [(root, own)]
    for folder, files in folders:
        if not files:
            continue
        report.ignored_files += [f for f in _visible(folder) if f.is_file() and not is_nifti(f)]
        case_id = _common_case_id(files, folder.name) if folder == root else folder.name
        case = _generic_case(case_id, files, report)
        if case is None:
            report.skipped[case_id] = "no NIfTI file named after a known sequence (t1c, t1n, t2f, t2w)"
        else:
            report.cases.append(case)
    return report if report.cases else None


_FINDERS = {"msd": _discover_msd, "brats_mets": _discover_brats, "brainmetshare": _discover_brainmetshare,
            "generic": _discover_generic}


def discover_volumes(root: str | Path) -> VolumeReport | None:
    """The volume layout of ``root`` and its cases (sorted by id), or None when ``root`` holds none (it may
    then hold a 2D slice layout, :func:`~metaseg_tf.data.discover.discover_pairs`)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for layout in VOLUME_LAYOUTS:
        report = _FINDERS[layout](root)
        if report is not None:
            report.cases.sort(key=lambda case: case.case_id)
            unlabelled = [case.case_id for case in report.cases if not case.labelled]
            if unlabelled:
                logger.info("%d case(s) without labels (prediction only): %s", len(unlabelled), ", ".join(unlabelled[:5]))
            (logger.warning if report.skipped else logger.info)(report.summary_line())
            return report
    return None
