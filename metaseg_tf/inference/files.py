"""Prediction into files: a slice image, a folder of images, NIfTI volumes or cases of a volume layout
(BraTS-METS, MSD, BrainMetShare, generic NIfTI), every mask made by a
:class:`~metaseg_tf.inference.predictor.Predictor`.

Written outputs per slice: ``<stem>_mask.png`` (0/255), ``<stem>_probability.png`` (0-255) and
``<stem>_overlay.png``; ``lesions.csv`` lists the lesions of each case's slices (:func:`write_slice_lesions`).

Volumes are read like training data (:mod:`metaseg_tf.data.volumes`): reoriented to the canonical axial
orientation from the affine, windowed per volume and sequence, each axial slice predicted with its 2.5D
context, and the result put back into the input's own voxel grid. Written per case, BraTS-style:
``<case>-seg.nii.gz`` (``uint8``, in the label convention **of the data being predicted**, or the one the
user names, whatever the training data's: a WT model writes WT's label, ``multilabel`` the convention's label
map; :meth:`~metaseg_tf.data.targets.Target.to_labels`) and ``<case>-probability.nii.gz`` (``float32``, one
volume per region), both with the input's affine and header so they overlay in any NIfTI viewer, and
``<case>-overlay.png`` (the slices with most predicted lesion); ``predictions.csv`` names the convention
written. Where the case has a segmentation, the per-case scores are those of the written label map (read
back by region, as the BraTS scripts read a submitted file) against the truth. Given NIfTI files by
themselves: one volume fills every input channel, a 4D file (MSD) gives its channels in MSD Task01's
order (or the run's, when it has as many), or one co-registered volume per sequence of the run, in its order.

**DICOM** (:mod:`metaseg_tf.data.dicom`): a folder of DICOM MR series (or a ``.zip`` of one, unpacked safely
into a temporary folder) is a volume case per study; ``dicom_seg`` writes ``<case>-seg.dcm`` beside the NIfTI
seg, a DICOM SEG referencing the series of the run's first sequence (:mod:`metaseg_tf.inference.dicom_seg`).
A DICOM file given by itself is predicted in 2D: its one frame, or each frame of a multi-frame image
(``<name>-frame_<k>``).

Unreadable files in a folder are skipped, counted and listed with the reason in ``predictions.csv``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import tempfile
from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from metaseg_tf.data.archives import extract_zip
from metaseg_tf.data.dicom import DICOM_EXTENSIONS, dicom_frame_count
from metaseg_tf.data.dicom_planes import read_dicom_slice
from metaseg_tf.data.discover import IMAGE_EXTENSIONS, MASK_SUFFIX, DataError, split_case_and_slice
from metaseg_tf.data.io import read_image, to_channels
from metaseg_tf.data.layouts import discover_volumes, MSD_CHANNELS
from metaseg_tf.data.targets import Target
from metaseg_tf.data.volumes import CaseFiles, CaseVolume, case_name, from_canonical, is_nifti, load_nifti, read_case, resolve_sequences, SequenceSource
from metaseg_tf.evaluation.scores import evaluate_masks
from metaseg_tf.inference.lesions import LESION_COLUMNS, lesion_counts, lesion_table
from metaseg_tf.inference.parts import Part, finish_part, open_shared, part_done
from metaseg_tf.inference.predictor import Predictor, SlicePrediction, VolumePrediction
from metaseg_tf.paths import resolve
from metaseg_tf.runs.folders import new_dir

# canonical (slice, row, column) = (S, P, L) axes as an affine: for volumes that came as slice images
CANONICAL_AFFINE = np.array([[0.0, 0.0, -1.0, 0.0], [0.0, -1.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0, 0, 0, 1.0]])


def _overlay(image: np.ndarray, mask: np.ndarray) -> np.ndarray:
    grey = image[..., image.shape[-1] // 2] if image.ndim == 3 else image
    grey = cv2.normalize(grey.astype(np.float32), None, 0, 255, cv2.NORM_MINMAX).astype(np.uint8)
    colour = cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)
    contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_NONE)
    return cv2.drawContours(colour, contours, -1, (0, 0, 255), 1)


def _write_slice(out_dir: Path, stem: str, image: np.ndarray, prediction: SlicePrediction) -> None:
    (out_dir / stem).parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out_dir / f"{stem}_mask.png"), prediction.mask * 255)
    cv2.imwrite(str(out_dir / f"{stem}_probability.png"), np.round(prediction.probability * 255).astype(np.uint8))
    cv2.imwrite(str(out_dir / f"{stem}_overlay.png"), _overlay(image, prediction.mask))


def _volume_overlay(volume: CaseVolume, labels: np.ndarray, count: int = 4) -> np.ndarray:
    """The ``count`` slices with most predicted lesion side by side (first channel, contours in red)."""
    per_slice = labels.reshape(len(labels), -1).astype(bool).sum(axis=1)
    chosen = sorted(np.argsort(per_slice)[::-1][:count]) if per_slice.any() else [len(labels) // 2]
    return np.concatenate([_overlay(volume.images[k][..., :1], labels[k] > 0) for k in chosen], axis=1)


def case_scores(volume: CaseVolume, written: np.ndarray, target: Target) -> dict[str, dict]:
    """Per-case scores of each region of ``target`` (Dice, IoU, precision, recall, HD95 in mm when the
    volume's spacing is known, BraTS-MET 2023 lesion-wise scores; :func:`~metaseg_tf.evaluation.scores.
    evaluate_masks`) of the ``written`` label map ``uint8 (Z, H, W)`` against the case's own labels, both read
    by region in ``target``'s convention (pass the target in the convention of the case's dataset, which
    may differ from the training data's): the scores of the file a challenge evaluator reads."""
    truth, pred = target.masks(volume.labels), target.masks(written)
    slices = np.arange(len(truth))
    case_ids = np.full(len(truth), volume.case_id)
    return {name: evaluate_masks(truth[..., r], pred[..., r], case_ids, slices,
                                 volume.spacing).per_patient.iloc[0].drop("case_id").to_dict()
            for r, name in enumerate(target.names)}


CASE_OUTPUTS = ("seg", "probability", "overlay")


def write_case_prediction(volume: CaseVolume, prediction: VolumePrediction, out_dir: Path,
                          outputs: Sequence[str] = CASE_OUTPUTS) -> dict[str, Path]:
    """Of :data:`CASE_OUTPUTS`, those in ``outputs``: ``<case>-seg.nii.gz`` (``prediction.labels``),
    ``<case>-probability.nii.gz`` (in the input's voxel grid, with its affine and header) and
    ``<case>-overlay.png``; returns their paths."""
    import nibabel as nib

    reference = volume.reference
    affine = reference.affine if reference is not None else CANONICAL_AFFINE
    header = reference.header.copy() if reference is not None else None
    probabilities = prediction.probabilities[..., 0] if prediction.probabilities.shape[-1] == 1 \
        else prediction.probabilities
    written = {}
    for name, array, dtype in (("seg", prediction.labels, np.uint8), ("probability", probabilities, np.float32)):
        if name not in outputs:
            continue
        image = nib.Nifti1Image(from_canonical(array, affine).astype(dtype), affine, header)
        image.set_data_dtype(dtype)
        written[name] = out_dir / f"{volume.case_id}-{name}.nii.gz"
        nib.save(image, str(written[name]))
    if "overlay" in outputs:
        written["overlay"] = out_dir / f"{volume.case_id}-overlay.png"
        cv2.imwrite(str(written["overlay"]), _volume_overlay(volume, prediction.labels))
    return written


def write_case_dicom_seg(predictor: Predictor, case: CaseFiles, volume: CaseVolume, labels: np.ndarray,
                         target: Target, out_dir: Path) -> Path:
    """``<case>-seg.dcm``: ``labels`` ``uint8 (Z, H, W)`` (read by region in ``target``) as a DICOM SEG that
    references the DICOM series of the run's first sequence (:func:`~metaseg_tf.inference.dicom_seg.write_dicom_seg`);
    :class:`DataError` when the case did not come as DICOM."""
    from metaseg_tf import __version__
    from metaseg_tf.inference.dicom_seg import write_dicom_seg

    sequences = resolve_sequences(predictor.config.sequences, predictor.config.channels)
    source = next((case.sequences[name] for name in sequences if name in case.sequences), None)
    if source is None or source.series is None or volume.reference is None:
        raise DataError(f"case {case.case_id} did not come as a DICOM series: a DICOM SEG needs one to reference")
    architecture = predictor.config.model + (f" ensemble of {len(predictor.members)}" if len(predictor.members) > 1 else "")
    return write_dicom_seg(target.masks(labels), target, source.series, volume.reference.affine,
                           out_dir / f"{case.case_id}-seg.dcm", architecture, __version__)


def predict_cases(predictor: Predictor, cases: Sequence[CaseFiles], out_dir: Path, progress: bool = True,
                  convention: str | None = None, part: Part | None = None, dicom_seg: bool = False) -> dict:
    """Predict every case (see the module docstring); cases whose images cannot be read are skipped and listed
    with the reason in ``predictions.csv`` (one row per case, with its scores where it has labels that can be
    read; a broken segmentation only costs the scores, and the row says why). ``convention``: the label
    convention of the cases' dataset, which their labels are read in and the ``-seg`` files written in
    (default: the run's training data's). ``part``: predict only that part's cases
    (:mod:`metaseg_tf.inference.parts`), into a shared folder. ``dicom_seg``: also ``<case>-seg.dcm`` for DICOM
    cases (:func:`write_case_dicom_seg`)."""
    config = predictor.config
    sequences = resolve_sequences(config.sequences, config.channels)
    convention = convention or predictor.target.convention
    written_target = predictor.target.in_convention(convention)
    named, taken = [], set()
    for case in cases:  # over all cases, as one process does, before a part takes its own
        name, number = case.case_id, 2
        while name in taken:  # two input folders with one case id: never overwrite the first one's outputs
            name, number = f"{case.case_id}-{number}", number + 1
        taken.add(name)
        named.append(dataclasses.replace(case, case_id=name))
    if part is not None and part_done(out_dir, part):  # predicted before: only finish
        return _finished(finish_part(out_dir, part, None), "case")
    chosen = part.takes(range(len(named))) if part is not None else [True] * len(named)
    rows: list[tuple[tuple, dict]] = []
    for index, case in enumerate(named):
        if not chosen[index]:
            continue
        labels_note = ""
        try:
            volume = read_case(case, sequences, config.fill_missing)
        except DataError as error:
            try:  # the images may be fine where the segmentation is not
                volume = read_case(case, sequences, config.fill_missing, with_labels=False)
                labels_note = f"not scored: {error}"
            except DataError:
                rows.append(((index,), {"case_id": case.case_id, "status": f"skipped: {error}"}))
                continue
        prediction = predictor.predict_volume(volume, progress, convention)
        write_case_prediction(volume, prediction, out_dir)
        seg_note = ""
        if dicom_seg:
            try:
                write_case_dicom_seg(predictor, case, volume, prediction.labels, written_target, out_dir)
            except DataError as error:  # the NIfTI seg is written; the row says why the SEG is not
                seg_note = f"no DICOM SEG: {error}"
        lesions = lesion_table(written_target.masks(prediction.labels), written_target.names, volume.spacing)
        lesions.insert(0, "case_id", case.case_id)
        lesions.to_csv(out_dir / f"{case.case_id}-lesions.csv", index=False)
        row = {"case_id": case.case_id, "status": "ok", "label_convention": convention, "scores": labels_note,
               **({"dicom_seg": seg_note or f"{case.case_id}-seg.dcm"} if dicom_seg else {}),
               "slices": len(prediction.labels),
               "lesion_voxels": int((prediction.labels > 0).sum()), "non_finite_voxels": volume.non_finite_voxels,
               "filled_sequences": " ".join(volume.filled), **lesion_counts(lesions, written_target.names)}
        if volume.labels is not None:
            for region, scores in case_scores(volume, prediction.labels, written_target).items():
                row.update({f"{region}_{name}": value for name, value in scores.items()
                            if name in ("dice", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions",
                                        "detected_lesions", "false_positive_lesions")})
        rows.append(((index,), row))
    if part is not None:
        merged = finish_part(out_dir, part, rows)
        if merged is not None:
            write_lesions(out_dir, merged)
        _finished(merged, "case")
    else:
        pd.DataFrame([row for _, row in rows]).to_csv(out_dir / "predictions.csv", index=False)
        write_lesions(out_dir, [row for _, row in rows])
        _finished([row for _, row in rows], "case")
    done = [row for _, row in rows if row["status"] == "ok"]
    return {"cases": len(done), "skipped": len(rows) - len(done),
            "lesion_voxels": int(sum(row["lesion_voxels"] for row in done))}


def write_lesions(out_dir: Path, rows: list[dict]) -> Path:
    """``lesions.csv``: the ``<case>-lesions.csv`` of the predicted cases of ``rows`` (predictions.csv's, in
    its order) one after another, a row per lesion (:mod:`metaseg_tf.inference.lesions`)."""
    tables = [pd.read_csv(out_dir / f"{row['case_id']}-lesions.csv") for row in rows if row.get("status") == "ok"]
    tables = [table for table in tables if len(table)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["case_id", *LESION_COLUMNS])
    table.to_csv(out_dir / "lesions.csv", index=False)
    return out_dir / "lesions.csv"


def write_slice_lesions(out_dir: Path, rows: list[dict]) -> Path:
    """``lesions.csv`` of predicted slices (``rows``: predictions.csv's): the written masks (``<output>_mask.png``)
    of one case (a folder's ``<case>_<n>`` slices, by slice number; any other slice by itself) stacked into a
    volume when they share a size, and its lesions listed as for volume cases (26-connected, largest first; the
    spacing of slice images is unknown, so volumes and diameters are NaN and sizes are in voxels)."""
    by_case: dict[str, list[tuple[int, str]]] = {}
    for row in rows:
        if row.get("status") == "ok":
            stem = Path(row["output"])
            case, number = split_case_and_slice(stem.name)
            by_case.setdefault((stem.parent / case).as_posix(), []).append((number, row["output"]))
    tables = []
    for case, slices in by_case.items():
        masks = [cv2.imread(str(out_dir / f"{output}_mask.png"), cv2.IMREAD_GRAYSCALE) > 0 for _, output in sorted(slices)]
        stacks = [np.stack(masks)] if len({m.shape for m in masks}) == 1 else [m[None] for m in masks]
        for stack in stacks:
            table = lesion_table(stack[..., None], ["lesion"], None)
            table.insert(0, "case_id", case)
            tables.append(table)
    tables = [table for table in tables if len(table)]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame(columns=["case_id", *LESION_COLUMNS])
    table.to_csv(out_dir / "lesions.csv", index=False)
    return out_dir / "lesions.csv"


def _finished(rows: list[dict] | None, unit: str) -> dict:
    """Raises :class:`DataError` when ``rows`` (every row of predictions.csv; None: not all parts are in yet)
    holds none that was predicted; else the part's summary is empty (its own counts are the caller's)."""
    if rows is not None and not any(row["status"] == "ok" for row in rows):
        first = rows[0]["status"] if rows else "none given"
        raise DataError(f"no {unit} could be predicted: {first}")
    return {"cases": 0, "skipped": 0, "lesion_voxels": 0}


def nifti_case(predictor: Predictor, paths: Sequence[Path], convention: str | None = None) -> CaseFiles:
    """NIfTI files given by themselves as one case named after the first (without its sequence token:
    :func:`~metaseg_tf.data.volumes.case_name`): one 3D volume fills every sequence
    of the run; one 4D file gives its channels (named as MSD Task01 orders them, or in the run's order when it
    has exactly as many); else one volume per sequence in the run's order."""
    sequences = resolve_sequences(predictor.config.sequences, predictor.config.channels)
    convention = convention or predictor.target.convention
    if len(paths) == 1:
        shape = load_nifti(paths[0]).shape
        if len(shape) == 4 and shape[3] > 1:
            names = sequences if shape[3] == len(sequences) else MSD_CHANNELS[:shape[3]]
            lacking = [name for name in sequences if name not in names]
            if lacking:
                raise DataError(f"{paths[0]} holds {shape[3]} channels ({', '.join(names)} in MSD Task01's order) "
                                f"but the model needs {', '.join(lacking)}")
            return CaseFiles(case_name(paths[0]), {name: SequenceSource(paths[0], k) for k, name in enumerate(names)},
                             convention=convention)
    if len(paths) not in (1, len(sequences)):
        raise DataError(f"the model takes {len(sequences)} sequence(s) ({', '.join(sequences)}): give 1 volume or "
                        f"{len(sequences)}, not {len(paths)}")
    sources = [SequenceSource(p) for p in paths] * (len(sequences) if len(paths) == 1 else 1)
    return CaseFiles(case_name(paths[0]), dict(zip(sequences, sources)), convention=convention)


def _output_stems(relative: Sequence[Path]) -> list[str]:
    """Where each input's outputs go, relative to the predictions folder: its path relative to the input
    folder (a file given by itself: its name) without the extension. Inputs that would share one (``x.png``
    beside ``x.tif``, or ``x.png`` in two input folders) keep their extension in it (``x-tif``), then a
    counter, so no output ever overwrites another."""
    stems = [path.with_suffix("").as_posix() for path in relative]
    shared = {stem for stem in stems if stems.count(stem) > 1}
    taken: set[str] = set()
    result = []
    for path, stem in zip(relative, stems):
        stem = f"{stem}-{path.suffix.lstrip('.').lower()}" if stem in shared else stem
        candidate, number = stem, 2
        while candidate in taken:
            candidate, number = f"{stem}-{number}", number + 1
        taken.add(candidate)
        result.append(candidate)
    return result


def _unpacked(inputs: list[Path], stack: contextlib.ExitStack) -> list[Path]:
    """``inputs`` with each ``.zip`` replaced by a temporary folder (named as the zip) holding its files
    (:func:`~metaseg_tf.data.archives.extract_zip`: safe names, at most 20 000 files and 20 GB)."""
    unpacked = []
    for path in inputs:
        if path.is_file() and path.suffix.lower() == ".zip":
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="metaseg-zip-")))
            path = extract_zip(path, folder / path.stem, max_files=20_000, max_bytes=20 << 30)
        unpacked.append(path)
    return unpacked


def _slice_inputs(files: list[Path], relative: list[Path]) -> tuple[list[tuple[Path, int | None]], list[Path]]:
    """Each image file as ``(file, None)``, except a multi-frame DICOM image: ``(file, k)`` for each frame,
    its output named ``<name>-frame_<k>`` (the frames of one file are one case, numbered as slices)."""
    entries, names = [], []
    for path, name in zip(files, relative):
        frames = dicom_frame_count(path) if path.suffix.lower() in DICOM_EXTENSIONS else 1
        if frames > 1:
            entries += [(path, k) for k in range(frames)]
            names += [name.with_name(f"{name.stem}-frame_{k:03d}{name.suffix}") for k in range(frames)]
        else:
            entries.append((path, None))
            names.append(name)
    return entries, names


def _read_slice_input(path: Path, frame: int | None, channels: int) -> np.ndarray:
    if frame is None:
        return read_image(path, channels)
    from metaseg_tf.data.intensity import window_volume

    pixels, _ = read_dicom_slice(path, frame)
    return to_channels(window_volume(pixels)[0], channels)


def predict_path(predictor: Predictor, inputs: Sequence[Path | str], out_root: Path | str,
                 progress: bool = True, convention: str | None = None, part: Part | None = None,
                 request: dict | None = None, series: dict[str, str] | None = None,
                 dicom_seg: bool = False) -> tuple[Path, dict]:
    """:func:`_predict_path` with every ``.zip`` input unpacked into a temporary folder for the time of it."""
    with contextlib.ExitStack() as stack:
        inputs = [Path(p) for p in inputs]
        missing = [str(p) for p in inputs if not p.exists()]
        if missing:
            raise DataError(f"input not found: {', '.join(missing)}")
        return _predict_path(predictor, _unpacked(inputs, stack), out_root, progress, convention, part, request,
                             series, dicom_seg, original=inputs)


def _predict_path(predictor: Predictor, inputs: Sequence[Path], out_root: Path | str,
                  progress: bool, convention: str | None, part: Part | None, request: dict | None,
                  series: dict[str, str] | None, dicom_seg: bool, original: Sequence[Path]) -> tuple[Path, dict]:
    """Predict an image file, a folder of images (masks named ``*_mask.*`` are left out), NIfTI volume(s) of
    one case, or folders of a volume layout (a case folder, or a dataset of cases) into a new folder
    ``<out_root>/predictions``; returns the folder and a summary. Image outputs mirror the inputs' paths
    inside their folders (:func:`_output_stems`), so none overwrites another; volume outputs are named after
    their case. A model with 2.5D context reads each image with its neighbours as in training: the images of
    its folder with the same case id, in slice-number order (``<case>_<n>``, as kaggle_3m names them).
    ``convention``: the label convention of the volumes' data (read and written in it; default: their
    dataset's, :func:`~metaseg_tf.data.layouts.dataset_convention`; NIfTI files alone: the run's); input
    folders of different conventions are refused. ``part``: only that part of the cases
    (:mod:`metaseg_tf.inference.parts`), into ``out_root`` itself, the folder shared by the parts of one
    ``request`` (what the caller asks, recorded with the inputs). ``series`` and ``dicom_seg``: DICOM inputs
    (see the module docstring; ``series`` as :func:`~metaseg_tf.data.dicom.choose_series` takes it)."""
    if part is None:
        out_dir = new_dir(resolve(out_root), "predictions")
    else:
        out_dir = open_shared(resolve(out_root), part, {**(request or {}), "inputs": [str(p) for p in original],
                                                         "labels_convention": convention})
    if all(is_nifti(p) for p in inputs):
        if dicom_seg:
            raise DataError("--dicom-seg needs DICOM input: a DICOM SEG references the DICOM series it segments")
        case = nifti_case(predictor, inputs, convention)
        return out_dir, predict_cases(predictor, [case], out_dir, progress, case.convention, part)
    needed = resolve_sequences(predictor.config.sequences, predictor.config.channels)
    volume_reports = [discover_volumes(p, convention, series, needed) for p in inputs if p.is_dir()]
    if volume_reports and all(volume_reports) and len(volume_reports) == len(inputs):
        for report in volume_reports:  # DICOM has no labels: its segs are written in the run's convention
            if report.layout == "dicom" and convention is None:
                report.with_convention(predictor.target.convention, "the run's (DICOM input has no labels)")
        if dicom_seg and any(report.layout != "dicom" for report in volume_reports):
            raise DataError("--dicom-seg needs DICOM input: a DICOM SEG references the DICOM series it segments")
        cases = [case for report in volume_reports for case in report.cases]
        conventions = {report.convention for report in volume_reports}
        if len(conventions) > 1:
            raise DataError(f"the input folders hold data of different label conventions ({', '.join(sorted(conventions))}): "
                            "predict them one convention at a time, or name one with --labels-convention")
        if not cases:
            reasons = "; ".join(f"{case}: {why}" for report in volume_reports for case, why in report.skipped.items())
            raise DataError(f"no case could be predicted: {reasons or 'none found'}")
        return out_dir, predict_cases(predictor, cases, out_dir, progress, conventions.pop(), part, dicom_seg)
    if dicom_seg:
        raise DataError("--dicom-seg needs a folder (or zip) of DICOM series; a slice file is predicted in 2D")
    files: list[Path] = []
    relative: list[Path] = []
    for path in inputs:
        if path.is_dir():
            found = sorted(f for f in path.rglob("*") if f.suffix.lower() in IMAGE_EXTENSIONS
                           and not f.stem.endswith(MASK_SUFFIX))
            files += found
            relative += [f.relative_to(path) for f in found]
        else:
            files.append(path)
            relative.append(Path(path.name))
    entries, relative = _slice_inputs(files, relative)
    files = [path for path, _ in entries]
    # a slice's case: its 2.5D neighbours, which one part predicts together
    units = [(str(path.parent), split_case_and_slice(path.stem)[0]) for path in files]
    if part is not None and part_done(out_dir, part):  # predicted before: only finish
        merged = finish_part(out_dir, part, None)
        if merged is not None:
            write_slice_lesions(out_dir, merged)
        _finished(merged, "image")
        return out_dir, {"predicted": 0, "skipped": 0}
    chosen = part.takes(units) if part is not None else [True] * len(files)
    rows: list[tuple[tuple, dict]] = []
    images, stems = [], []
    for index, ((path, frame), stem) in enumerate(zip(entries, _output_stems(relative))):
        if not chosen[index]:
            continue
        try:
            images.append(_read_slice_input(path, frame, predictor.config.channels))
            stems.append((index, path, stem))
        except DataError as error:
            rows.append(((0, index), {"file": str(path), "status": f"skipped: {error}"}))
    if not images and part is None:
        raise DataError(f"no readable image among {len(files)} file(s): {rows[0][1]['status'] if rows else 'none found'}")
    # a multi-frame file is one case whose slices are its frames
    cases = [(str(path.parent), *(split_case_and_slice(path.stem) if entries[index][1] is None
                                  else (f"{path.stem}-frame", entries[index][1]))) for index, path, _ in stems]
    predictions = predictor.predict_slices(images, progress, case_ids=[f"{folder}/{case}" for folder, case, _ in cases],
                                           slice_indices=[number for _, _, number in cases]) if images else []
    for (index, path, stem), image, prediction in zip(stems, images, predictions):
        _write_slice(out_dir, stem, image, prediction)
        rows.append(((1, index), {"file": str(path), "output": stem, "lesions": prediction.lesion_count,
                                  "lesion_pixels": int(sum(prediction.lesion_areas)),
                                  "max_probability": float(prediction.probability.max()), "status": "ok"}))
    if part is not None:
        merged = finish_part(out_dir, part, rows)
        if merged is not None:
            write_slice_lesions(out_dir, merged)
        _finished(merged, "image")
    else:
        pd.DataFrame([row for _, row in rows]).to_csv(out_dir / "predictions.csv", index=False)
        write_slice_lesions(out_dir, [row for _, row in rows])
    return out_dir, {"predicted": len(images), "skipped": len(rows) - len(images)}
