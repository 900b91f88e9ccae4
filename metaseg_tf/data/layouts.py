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
    BraTS-METS 2023/2024, Pretreat-MetsToBrain-Masks and the other BraTS 2023+ sets:
    ``<case>/<case>-{t1c,t1n,t2f,t2w,seg}.nii.gz`` (labels 1 NETC, 2 SNFH, 3 ET: the ``brats`` convention;
    ``BraTS-GLI-*`` cases: ``brats_post``, BraTS 2024 post-treatment glioma, where 4 is a resection cavity).
    Cases without ``seg`` are prediction only. A case folder given by itself is that one case.
``brats2021``
    BraTS 2018-2021: ``<case>/<case>_{t1,t1ce,t2,flair,seg}.nii.gz`` (labels 1, 2, 4: ``brats2021``).
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
``dicom``
    DICOM MR series (:mod:`metaseg_tf.data.dicom`), in the folder or below it, any file names: a case per
    study (named after the deepest folder that holds all of that study's files; never after a patient
    identifier), each series mapped to a sequence by its description or by ``series`` (``--series
    t1c=UID_or_text``). No labels: prediction only. Every series found is logged with what it was used for.

**Label conventions are decided per dataset, never per case** (:func:`dataset_convention`): a convention
named by the user (``label_convention`` in the config, ``--labels-convention``) wins; else MSD's
``dataset.json`` label names; else the file set (BraTS case-id prefixes); else the layout's. A folder whose
cases need different conventions (BraTS-GLI beside BraTS-MET) is refused.

**Patients.** BraTS ids are ``BraTS-<set>-<patient>-<timepoint>``: the timepoints of one patient are one
patient in every split (:func:`~metaseg_tf.data.split.patient_of`; any other layout: a case is a patient, unless a
``patient_pattern`` says otherwise).
"""

from __future__ import annotations

import itertools
import json
import logging
import re
from pathlib import Path

from metaseg_tf.data.dicom import MIN_VOLUME_FRAMES, DicomScan, choose_series, is_dicom_file, scan_dicom
from metaseg_tf.data.discover import IMAGE_EXTENSIONS, DataError
from metaseg_tf.data.split import BRATS_CASE_ID
from metaseg_tf.data.volumes import CaseFiles, is_nifti, load_nifti, name_tokens, nifti_stem, NIFTI_SUFFIXES, sequence_of, SequenceSource, VolumeReport

logger = logging.getLogger(__name__)

VOLUME_LAYOUTS = ("msd", "brats_mets", "brats2021", "brainmetshare", "generic", "dicom")
BRATS2021_SEQUENCES = {"t1ce": "t1c", "t1": "t1n", "flair": "t2f", "t2": "t2w"}
BRATS_SET_CONVENTIONS = {"GLI": "brats_post"}  # every other BraTS 2023+ set: "brats"
# MSD / nnU-Net dataset.json label names -> what each label is (checked in this order, by the name's start)
_LABEL_NAME_ROLES = (("non-enhancing", ("non-enh", "non enh", "nonenh", "net")),
                     ("necrotic", ("necro", "ncr", "netc")),
                     ("enhancing", ("enh", "et")),
                     ("oedema", ("edema", "oedema", "ed", "snfh", "peritumo")))
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


def _named_case(case_dir: Path, report: VolumeReport, separator: str, kinds: dict[str, str]) -> bool:
    """Add the case of ``case_dir`` whose files are ``<folder><separator><kind>.nii[.gz]`` (``kinds``: file
    kind -> sequence name, ``seg`` the labels) to ``report``; False when no file is named so."""
    pattern = re.compile(rf"(?P<case>.+){re.escape(separator)}(?P<kind>{'|'.join([*kinds, 'seg'])})", re.IGNORECASE)
    sequences, labels, others = {}, None, []
    for path in _visible(case_dir):
        match = pattern.fullmatch(nifti_stem(path)) if is_nifti(path) else None
        if match is None or match["case"] != case_dir.name:
            others.append(path)
        elif match["kind"].lower() == "seg":
            labels = SequenceSource(path)
        else:
            sequences[kinds[match["kind"].lower()]] = SequenceSource(path)
    if not sequences and labels is None:
        return False
    report.ignored_files += others
    if sequences:
        report.cases.append(CaseFiles(case_dir.name, sequences, labels))
    else:
        report.skipped[case_dir.name] = "a segmentation but no sequence file"
    return True


def _discover_named(root: Path, layout: str, separator: str, kinds: dict[str, str]) -> VolumeReport | None:
    """A dataset of case folders named as ``layout`` names them, or ``root`` itself as one such case."""
    report = VolumeReport(root, layout, [])
    if _named_case(root, report, separator, kinds):
        return report
    for case_dir in _case_dirs(root):
        _named_case(case_dir, report, separator, kinds)
    return report if report.cases or report.skipped else None


def _discover_brats(root: Path) -> VolumeReport | None:
    return _discover_named(root, "brats_mets", "-", {name: name for name in ("t1c", "t1n", "t2f", "t2w")})


def _discover_brats2021(root: Path) -> VolumeReport | None:
    return _discover_named(root, "brats2021", "_", BRATS2021_SEQUENCES)


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


def _study_case_id(root: Path, files: list[Path]) -> str:
    """A study's case id: the name of the deepest folder holding all its files (``root``'s own name when that
    is ``root``)."""
    common = [parts[0] for parts in itertools.takewhile(lambda parts: len(set(parts)) == 1,
                                                        zip(*(f.relative_to(root).parent.parts for f in files)))]
    return common[-1] if common else root.name


def _discover_dicom(root: Path, series: dict[str, str] | None = None,
                    needed: tuple[str, ...] | None = None) -> VolumeReport | None:
    """DICOM studies (see the module docstring); None when ``root`` holds no MR series of at least
    :data:`~metaseg_tf.data.dicom.MIN_VOLUME_FRAMES` frames (a folder of 2D DICOM slices is a slice layout)."""
    if not any(is_dicom_file(path) for path in root.rglob("*") if path.is_file()):
        return None
    scan = scan_dicom(root)
    if not any(found.problem() is None and found.frames >= MIN_VOLUME_FRAMES for found in scan.series):
        return None
    report = VolumeReport(root, "dicom", [])
    report.ignored_files += sorted(scan.ignored)
    studies: dict[str, list] = {}
    for found in scan.series:
        studies.setdefault(found.study, []).append(found)
    for number, members in enumerate(studies.values(), start=1):
        case_id = _study_case_id(root, [path for found in members for path in found.files])
        if len(studies) > 1 and case_id == root.name:
            case_id = f"{root.name}-study{number}"
        study_scan = DicomScan(root, members)
        try:
            chosen = choose_series(study_scan, series, needed)
        except DataError as error:
            report.skipped[case_id] = str(error)
            chosen = {}
        for line in study_scan.lines(chosen):
            logger.warning("%s: %s", case_id, line)
        if chosen:
            report.cases.append(CaseFiles(case_id, {name: SequenceSource(found.files[0].parent, series=found)
                                                    for name, found in chosen.items()}))
        elif case_id not in report.skipped:
            report.skipped[case_id] = "no MR series whose description names a known sequence (name them with --series)"
    return report if report.cases or report.skipped else None


_FINDERS = {"msd": _discover_msd, "brats_mets": _discover_brats, "brats2021": _discover_brats2021,
            "brainmetshare": _discover_brainmetshare, "generic": _discover_generic, "dicom": _discover_dicom}


def _msd_label_convention(root: Path) -> str | None:
    """``msd`` / ``brats`` / ``brats2021`` from the label names of ``root/dataset.json`` (MSD's ``{"1":
    "edema"}`` or nnU-Net v2's ``{"edema": 1}``), None when it names no known labels."""
    manifest = root / "dataset.json"
    try:
        labels = json.loads(manifest.read_text()).get("labels", {}) if manifest.is_file() else {}
    except ValueError:
        return None
    if not isinstance(labels, dict):
        return None
    pairs = [(k, v) if str(k).isdigit() else (v, k) for k, v in labels.items()]
    roles = {}
    for value, name in pairs:
        if not isinstance(value, (int, str)) or not str(value).isdigit():
            continue  # nnU-Net region labels ([1, 2, 3]) say nothing about one label's meaning
        text = str(name).strip().lower().replace("_", " ")
        role = next((role for role, starts in _LABEL_NAME_ROLES
                     if any(text == start or text.startswith(start + " ") or (len(start) > 3 and text.startswith(start))
                            for start in starts)), None)
        if role is not None:
            roles[int(value)] = role
    if roles.get(1) == "oedema":
        return "msd"
    if roles.get(1) == "necrotic" and roles.get(2) == "oedema":
        return "brats2021" if roles.get(4) == "enhancing" else "brats"
    return None


def dataset_convention(report: VolumeReport, named: str | None = None) -> tuple[str, str]:
    """``(convention, what decided it)`` for the dataset of ``report`` (see the module docstring); a
    :class:`DataError` for BraTS cases of sets with different conventions."""
    if named:
        return named, "named by the user"
    if report.layout == "msd":
        from_manifest = _msd_label_convention(report.root)
        if from_manifest:
            return from_manifest, "dataset.json label names"
    if report.layout == "brats_mets":
        sets: dict[str, set[str]] = {}
        for case in report.cases:
            match = BRATS_CASE_ID.fullmatch(case.case_id)
            name = match["set"].upper() if match else ""
            sets.setdefault(BRATS_SET_CONVENTIONS.get(name, "brats"), set()).add(name or case.case_id)
        if len(sets) > 1:
            found = "; ".join(f"{convention}: {', '.join(sorted(names)[:3])}" for convention, names in sorted(sets.items()))
            raise DataError(f"{report.root} mixes BraTS sets of different label conventions ({found}); predict or "
                            "train them as separate folders, or name one convention with --labels-convention")
        if sets:
            convention = next(iter(sets))
            return convention, "BraTS case ids" if convention != "brats" else "layout"
    return report.convention, "layout"


def discover_volumes(root: str | Path, convention: str | None = None, series: dict[str, str] | None = None,
                     sequences: tuple[str, ...] | None = None) -> VolumeReport | None:
    """The volume layout of ``root`` and its cases (sorted by id) in the dataset's label convention
    (:func:`dataset_convention`; ``convention`` names it), or None when ``root`` holds none (it may then
    hold a 2D slice layout, :func:`~metaseg_tf.data.discover.discover_pairs`). ``series``: DICOM series chosen
    by the user (sequence -> SeriesInstanceUID or description text, :func:`~metaseg_tf.data.dicom.choose_series`);
    ``sequences``: the ones a model reads (DICOM: only a conflict among those stops a case)."""
    root = Path(root)
    if not root.is_dir():
        return None
    for layout in VOLUME_LAYOUTS:
        report = _discover_dicom(root, series, sequences) if layout == "dicom" else _FINDERS[layout](root)
        if report is not None:
            report.cases.sort(key=lambda case: case.case_id)
            report.with_convention(*dataset_convention(report, convention))
            unlabelled = [case.case_id for case in report.cases if not case.labelled]
            if unlabelled:
                logger.info("%d case(s) without labels (prediction only): %s", len(unlabelled), ", ".join(unlabelled[:5]))
            (logger.warning if report.skipped else logger.info)(report.summary_line())
            return report
    return None
