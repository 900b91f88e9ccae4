"""The volume requests of the prediction service: NIfTI uploads (``/predict/volume``) and DICOM uploads
(``/predict/dicom``), from the checked uploads (:mod:`metaseg_tf.serve.uploads`) to the answer.

A DICOM upload's series are found and mapped to sequences as ``metaseg predict`` does
(:mod:`metaseg_tf.data.dicom`; ``series``: ``t1c=text;t2f=UID``), each series' voxels counted from its headers
before a pixel is decoded; a study with a single MR series fills every sequence of the model with it (as one
NIfTI volume does), said in the answer's warnings. Each model answers with ``<case>-seg.nii.gz`` and
``<case>-seg.dcm`` (:func:`~metaseg_tf.inference.files.write_case_dicom_seg`). No patient identifier is logged
or put in the answer outside the SEG itself; the case is called ``dicom-case``.
"""

from __future__ import annotations

import copy
import dataclasses
import gzip
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import HTTPException, UploadFile

from metaseg_tf.data.dicom import DicomScan, choose_series, scan_dicom
from metaseg_tf.data.dicom_planes import series_geometry
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.volumes import CaseFiles, SequenceSource, canonical_shape, check_one_grid, read_case, resolve_sequences
from metaseg_tf.serve.schemas import (
    VOLUME_SCORES,
    Lesion,
    RegionScores,
    VolumeModelPrediction,
    VolumeResponse,
    b64_text,
)
from metaseg_tf.serve.served import LoadedModel
from metaseg_tf.serve.uploads import ServeSettings, save_dicom_uploads, save_volume_upload, volume_grid

DICOM_CASE_ID = "dicom-case"


def _read_volume(served: LoadedModel, paths: list[Path], seg: Path | None, folder: Path) -> Any:
    """The uploads as one case (:func:`~metaseg_tf.inference.files.nifti_case`) read for ``served``'s sequences."""
    from metaseg_tf.inference.files import nifti_case

    config = served.predictor.config
    try:
        case = nifti_case(served.predictor, paths)
        if seg is not None:
            case = dataclasses.replace(case, labels=SequenceSource(seg))
        return read_case(case, resolve_sequences(config.sequences, config.channels), config.fill_missing)
    except DataError as error:  # its message names the file: shown relative to the temporary folder
        raise HTTPException(422, str(error).replace(f"{folder}{os.sep}", "")) from None
    except Exception:  # nibabel and numpy raise several types for voxel data that is truncated or unusable
        raise HTTPException(422, "cannot read the voxels of the uploaded volumes: is a file truncated or "
                                 "damaged?") from None


def _finite(value: Any) -> float | None:
    value = float(value)
    return value if math.isfinite(value) else None


def _predict_volume_one(served: LoadedModel, volume: Any, threshold: float | None,
                        out_dir: Path, dicom_case: CaseFiles | None = None) -> VolumeModelPrediction:
    """One model's prediction of ``volume``: its seg NIfTI and, for a DICOM case, its DICOM SEG."""
    from metaseg_tf.inference.files import case_scores, write_case_dicom_seg, write_case_prediction
    from metaseg_tf.inference.lesions import lesion_table

    predictor = copy.copy(served.predictor)  # this request's threshold, without touching the shared predictor
    predictor.threshold = predictor.threshold if threshold is None else threshold
    started = time.perf_counter()
    with served.serialised():
        prediction = predictor.predict_volume(volume)
    latency = (time.perf_counter() - started) * 1000
    out_dir.mkdir(parents=True)
    seg_path = write_case_prediction(volume, prediction, out_dir, outputs=("seg",))["seg"]  # all it returns
    dicom_seg = None
    if dicom_case is not None:
        try:
            dicom_seg = write_case_dicom_seg(predictor, dicom_case, volume, prediction.labels, predictor.target, out_dir)
        except DataError as error:
            raise HTTPException(422, f"{served.name}: {error}") from None
    scores = None
    if volume.labels is not None:
        scores = {region: RegionScores(**{name: _finite(values[name]) for name in VOLUME_SCORES})
                  for region, values in case_scores(volume, prediction.labels, predictor.target).items()}
    return VolumeModelPrediction(
        model=served.name, threshold=predictor.threshold, shape=list(volume.reference.shape[:3]),
        slices=len(prediction.labels), lesion_voxels=int(np.count_nonzero(prediction.labels)),
        seg_filename=seg_path.name, seg_nii_gz=b64_text(seg_path.read_bytes()), latency_ms=round(latency, 2),
        seg_dcm_filename=dicom_seg.name if dicom_seg else None, seg_dcm=b64_text(dicom_seg.read_bytes()) if dicom_seg else None,
        scores=scores, lesions=_lesions(lesion_table(predictor.target.masks(prediction.labels), predictor.target.names,
                                                     volume.spacing)))


def _lesions(table: Any) -> list[Lesion]:
    """The rows of a :func:`~metaseg_tf.inference.lesions.lesion_table` (NaN sizes: None)."""
    def plain(value: Any) -> Any:
        value = value.item() if hasattr(value, "item") else value
        return _finite(value) if isinstance(value, float) else value

    return [Lesion(**{name: plain(value) for name, value in row.items()}) for row in table.to_dict("records")]


def _check_readable(served: LoadedModel, shape: tuple[int, ...], affine: np.ndarray) -> None:
    """422 unless ``served`` can meaningfully read a volume on this grid: axial slices at least as large as
    its input in-plane (it would otherwise predict on an image blown up from a few voxels), and at least as
    many slices as its 2.5D context spans."""
    config = served.predictor.config
    slices, rows, columns = canonical_shape(shape, affine)
    if min(rows, columns) < config.image_size:
        raise HTTPException(422, f"{served.name} reads axial slices of {config.image_size}x{config.image_size} px; "
                                 f"this volume's are {rows}x{columns} voxels, smaller than that")
    needed = 2 * config.context_slices + 1
    if slices < needed:
        raise HTTPException(422, f"{served.name} reads each slice with {config.context_slices} neighbour(s) on "
                                 f"each side: it needs at least {needed} axial slices, this volume has {slices}")


def _non_finite_warning(non_finite: int, voxels: int) -> list[str]:
    if non_finite and non_finite >= voxels:
        return [f"nothing finite in the volume: all {voxels} voxels read are NaN or infinite (set to 0); the "
                "masks were predicted from an empty image and mean nothing"]
    return [f"{non_finite} NaN or infinite voxel(s) of {voxels} read were set to 0"] if non_finite else []


def predict_volume_request(models: list[LoadedModel], files: list[UploadFile], seg: UploadFile | None,
                            threshold: float | None, settings: ServeSettings) -> VolumeResponse:
    """One ``/predict/volume`` request, from its uploads to its answer (run in a volume job's thread)."""
    for served in models:
        sequences = served.info["sequences"]
        if len(files) not in (1, len(sequences)):
            raise HTTPException(422, f"{served.name} takes {len(sequences)} sequence(s) ({', '.join(sequences)}): "
                                     f"send 1 volume for all of them, or {len(sequences)} in this order, "
                                     f"not {len(files)}")
    roles = ["volume"] if len(files) == 1 else [f"volume {k + 1} of {len(files)}" for k in range(len(files))]
    with tempfile.TemporaryDirectory(prefix="metaseg-volume-") as temporary:
        folder = Path(temporary)
        paths = [save_volume_upload(upload, folder / f"volume-{k + 1}", role, settings)
                 for k, (upload, role) in enumerate(zip(files, roles))]
        seg_path = save_volume_upload(seg, folder / "seg", "seg", settings) if seg is not None else None
        grids = {role: volume_grid(path, role, settings) for role, path in zip(roles, paths)}
        if seg_path is not None:
            grids["seg"] = volume_grid(seg_path, "seg", settings)
        try:
            check_one_grid(grids)  # the library's own check: co-registered uploads on one voxel grid
        except DataError as error:
            raise HTTPException(422, str(error)) from None
        shape, affine = grids[roles[0]]
        for served in models:
            _check_readable(served, shape, affine)
        volumes: dict[tuple, Any] = {}  # models that read the same sequences share one read
        predictions = []
        for k, served in enumerate(models):
            config = served.predictor.config
            key = (tuple(served.info["sequences"]), config.fill_missing)
            if key not in volumes:
                volumes[key] = _read_volume(served, paths, seg_path, folder)
            predictions.append(_predict_volume_one(served, volumes[key], threshold, folder / f"model-{k + 1}"))
        volume = next(iter(volumes.values()))
    return VolumeResponse(case_id=volume.case_id, shape=list(shape),
                          axial_slices=int(volume.images.shape[0]), canonical_shape=list(volume.images.shape[:3]),
                          spacing_mm=list(volume.spacing) if volume.spacing is not None else None,
                          non_finite_voxels=volume.non_finite_voxels,
                          warnings=_non_finite_warning(volume.non_finite_voxels, math.prod(shape) * len(paths)),
                          predictions=predictions)


def parse_series(text: str | None) -> dict[str, str]:
    """``"t1c=AX T1 POST;t2f=1.2.3"`` -> ``{"t1c": "AX T1 POST", "t2f": "1.2.3"}`` (422 for anything else)."""
    chosen = {}
    for part in (text or "").split(";"):
        if not part.strip():
            continue
        name, _, wanted = part.strip().partition("=")
        if not wanted.strip() or name.strip() not in ("t1c", "t1n", "t2f", "t2w"):
            raise HTTPException(422, f"series: write SEQUENCE=text_or_UID[;...] with SEQUENCE one of t1c, t1n, t2f, "
                                     f"t2w; got {part.strip()[:80]!r}")
        chosen[name.strip()] = wanted.strip()
    return chosen


def _dicom_case(scan: DicomScan, named: dict[str, str], needed: tuple[str, ...],
                fill_missing: str) -> tuple[CaseFiles, list[str]]:
    """The case a model of sequences ``needed`` reads from ``scan`` and what the answer should say about it:
    the series mapped to those sequences (others are not read); a study with one usable MR series fills every
    sequence with it."""
    try:
        chosen = choose_series(scan, named, needed)
    except DataError as error:
        raise HTTPException(422, str(error)) from None
    usable = [series for series in scan.series if series.problem() is None]
    warnings = []
    lacking = [name for name in needed if name not in chosen]
    if lacking and len(usable) == 1 and not named:
        only = usable[0]
        chosen = {name: only for name in needed}
        warnings.append(f"one MR series ({only.label}) was sent: it fills every sequence the model reads "
                        f"({', '.join(needed)})")
    elif lacking and (fill_missing == "skip" or len(lacking) == len(needed)):
        raise HTTPException(422, f"the model reads {', '.join(needed)}; no series was recognised as "
                                 f"{', '.join(lacking)} ({'; '.join(scan.lines(chosen)) or 'no DICOM series found'}); "
                                 "name them with series=")
    sources = {name: SequenceSource(series.files[0].parent, series=series) for name, series in chosen.items()}
    return CaseFiles(DICOM_CASE_ID, sources), warnings


def _display_images(volume: Any) -> list[str]:
    """Each channel of a read volume (canonical, windowed) as base64 ``.nii.gz`` on the canonical grid."""
    import nibabel as nib

    from metaseg_tf.inference.files import CANONICAL_AFFINE

    return [b64_text(gzip.compress(nib.Nifti1Image(np.ascontiguousarray(volume.images[..., c]), CANONICAL_AFFINE)
                               .to_bytes(), compresslevel=1)) for c in range(volume.images.shape[-1])]


def predict_dicom_request(models: list[LoadedModel], files: list[UploadFile], series_text: str | None,
                          threshold: float | None, settings: ServeSettings) -> VolumeResponse:
    """One ``/predict/dicom`` request (run in a volume job's thread): the uploads saved and checked, the study
    scanned (headers only), each chosen series' voxels counted and its geometry checked before it is decoded."""
    named = parse_series(series_text)
    with tempfile.TemporaryDirectory(prefix="metaseg-dicom-") as temporary:
        folder = Path(temporary)
        root = save_dicom_uploads(files, folder, settings)
        try:
            scan = scan_dicom(root, settings.max_dicom_files)
        except DataError as error:
            raise HTTPException(422, str(error).replace(str(root), "upload")) from None
        volumes: dict[tuple, Any] = {}
        predictions, warnings, used = [], [], {}
        for k, served in enumerate(models):
            config = served.predictor.config
            needed = resolve_sequences(config.sequences, config.channels)
            case, notes = _dicom_case(scan, named, needed, config.fill_missing)
            warnings += [note for note in notes if note not in warnings]
            used.update({name: source.series for name, source in case.sequences.items() if name not in used})
            grids = {}
            for name, source in case.sequences.items():
                voxels = source.series.rows * source.series.columns * source.series.frames
                if voxels > settings.max_voxels:
                    raise HTTPException(413, f"series {source.series.label} has {voxels} voxels; the limit is "
                                             f"{settings.max_voxels} per series")
                try:
                    geometry = series_geometry(source.series, settings.max_voxels)
                except DataError as error:
                    raise HTTPException(422, str(error).replace(str(root), "upload")) from None
                grids[name] = (geometry.shape, geometry.affine, source.series.frame_of_reference)
            first = next(iter(grids.values()))
            others = {name: grid for name, grid in grids.items() if not grid[2] or grid[2] != first[2]}
            try:  # series of the first one's frame of reference are resampled onto its grid (read_case)
                check_one_grid({name: grid[:2] for name, grid in [next(iter(grids.items())), *others.items()]})
            except DataError as error:
                raise HTTPException(422, f"{error} (series of one FrameOfReferenceUID are resampled onto the first "
                                         "one's grid; these are not)") from None
            shape, affine = first[:2]
            _check_readable(served, shape, affine)
            key = (tuple(needed), tuple(source.series.uid for source in case.sequences.values()), config.fill_missing)
            if key not in volumes:
                try:
                    volumes[key] = read_case(case, needed, config.fill_missing)
                except DataError as error:
                    raise HTTPException(422, str(error).replace(str(root), "upload")) from None
            predictions.append(_predict_volume_one(served, volumes[key], threshold, folder / f"model-{k + 1}", case))
        volume = next(iter(volumes.values()))
    voxels = math.prod(volume.images.shape[:3]) * volume.images.shape[-1]
    return VolumeResponse(case_id=volume.case_id, shape=list(shape), axial_slices=int(volume.images.shape[0]),
                          canonical_shape=list(volume.images.shape[:3]),
                          spacing_mm=list(volume.spacing) if volume.spacing is not None else None,
                          non_finite_voxels=volume.non_finite_voxels,
                          warnings=warnings + _non_finite_warning(volume.non_finite_voxels, voxels),
                          series=scan.lines(used), images_nii_gz=_display_images(volume), predictions=predictions)
