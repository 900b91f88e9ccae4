"""The prediction service (FastAPI): trained runs behind ``/health``, ``/models``, ``/predict`` (one 2D slice)
and ``/predict/volume`` (NIfTI volumes).

Each model is a :class:`~metaseg_tf.predict.Predictor` built from a run folder, so an upload goes through
exactly the preprocessing the model was trained with (window, CLAHE, resize, normalisation, from the run's
``config.json``) and the mask comes back at the uploaded image's own size.

Slice uploads are checked before they reach a model: the file type (tif, png, jpg, bmp, webp; 8 or 16 bit;
grey, RGB or RGBA) by its content, the byte size and the pixel dimensions.

``/predict/volume`` takes one 3D NIfTI (``.nii`` or ``.nii.gz``; it fills every sequence the model needs) or
one NIfTI per sequence of the model, in the model's sequence order (``/models`` lists it), and optionally a
label map ``seg`` on the same voxel grid for per-case scores. The volumes are read like training data
(:mod:`metaseg_tf.data.volumes`: canonical axial orientation from the affine, windowed per sequence) and the
prediction comes back as the bytes of ``<case>-seg.nii.gz`` (base64) in the input's own voxel grid, with its
affine. Each volume is checked before its voxels are read: its byte size, the NIfTI signature, the header's
shape (3D, at most ``max_voxels`` voxels) and that all uploads share one grid; the request body may then be
as large as the volumes it can carry (the slice endpoints keep their own, smaller limit). Uploads are written
to a temporary folder under sanitised names, never the client's path.

A bad upload gets a 4xx answer with a JSON ``detail`` that says what was wrong, never a 500. Inference on
one model is serialised by a lock when its engine cannot be called from several threads (Keras); the ONNX
Runtime and OpenVINO engines run concurrent requests in parallel, outside the GIL
(:mod:`metaseg_tf.engines`). ``metaseg serve --workers N`` starts N server processes instead, each with its
own copy of the models; ``--level K`` serves U-Net++ pruned to level K (:func:`metaseg_tf.export.served_model`).

Start it with ``metaseg serve --api-only`` or
``uvicorn metaseg_tf.serve.api:app_from_environment --factory`` (runs from ``METASEG_SERVE_RUNS``).
"""

from __future__ import annotations

import base64
import contextlib
import copy
import dataclasses
import io
import math
import os
import re
import tempfile
import threading
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from metaseg_tf import paths
from metaseg_tf.data.discover import DataError
from metaseg_tf.data.io import JPEG_MAGIC, TIFF_MAGIC, read_image
from metaseg_tf.data.volumes import check_one_grid, is_nifti, nifti_stem, resolve_sequences
from metaseg_tf.export import served_model
from metaseg_tf.training.runs import list_runs, load_run_config, read_json

SERVED_MODELS = ("nested_unet", "attention_unet")
# first bytes of each accepted format: TIFF (both byte orders, classic and BigTIFF), PNG, JPEG, BMP, WebP
SIGNATURES = {**dict.fromkeys(TIFF_MAGIC, "tiff"), b"\x89PNG": "png", JPEG_MAGIC: "jpeg", b"BM": "bmp"}
GZIP_MAGIC = b"\x1f\x8b"
NIFTI_HEADER_SIZES = (348, 540)  # sizeof_hdr of NIfTI-1 and NIfTI-2, the first 4 bytes (either byte order)
MULTIPART_ROOM = 64 * 1024  # room for the multipart framing and the form fields of one request
# per-case scores returned by /predict/volume, per region (see metaseg_tf.predict.case_scores)
VOLUME_SCORES = ("dice", "hd95", "lesion_dice", "lesion_hd95", "truth_lesions", "detected_lesions",
                 "false_positive_lesions")


# form fields shared by the prediction endpoints (module level: the annotations are resolved from here)
Threshold = Annotated[float | None, Form(gt=0.0, lt=1.0, description="default: each run's own threshold")]
SliceUpload = Annotated[UploadFile, File(description="one 2D MRI slice: TIFF, PNG, JPEG, BMP or WebP")]
VolumeUploads = Annotated[list[UploadFile], File(
    description="one 3D NIfTI (.nii or .nii.gz) for every sequence, or one per sequence of the model in its "
                "sequence order (GET /models lists it)")]
SegUpload = Annotated[UploadFile | None, File(
    description="optional: the case's label map (NIfTI) on the same voxel grid, for per-case scores")]


class ServeError(RuntimeError):
    """The service cannot start: no runs to serve, or a run folder that cannot be loaded."""


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the service (defaults: 20 MB slice uploads, 4096 px per side; 200 MB and 40 million voxels
    per uploaded volume; the threshold is each run's own unless a request sets one)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_side_pixels: int = 4096
    max_volume_bytes: int = 200 * 1024 * 1024
    max_voxels: int = 40_000_000
    engine: str = "keras"  # keras, onnx or openvino (metaseg_tf.engines)
    level: int | None = None  # serve U-Net++ pruned to this level (other architectures whole)


def newest_pipeline_runs(pipeline_root: str | Path = paths.PIPELINE_ROOT) -> list[Path]:
    """The newest finished run of each served model in the newest pipeline folder that has one."""
    root = paths.resolve(pipeline_root)
    for pipeline in sorted(root.glob("*/runs"), reverse=True):
        found = {read_json(run / "state.json").get("name"): run for run in list_runs(pipeline)}
        if any(name in found for name in SERVED_MODELS):
            return [found[name] for name in SERVED_MODELS if name in found]
    raise ServeError(f"no trained models under {root}: run the main job first (`bash scripts/run.sh`, or "
                     f"`metaseg pipeline`), or name run folders with `metaseg serve --runs RUN ...`")


@dataclass
class ServedModel:
    """One loaded run: its predictor, what to say about it, and a lock that serialises what must not run in
    several threads at once (the Keras model)."""

    name: str
    run_dir: Path
    predictor: Any
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)

    def serialised(self) -> contextlib.AbstractContextManager:
        """The lock around inference when the predictor's engine cannot be called from several threads at once,
        else nothing (ONNX Runtime, OpenVINO)."""
        return contextlib.nullcontext() if self.predictor.engine.concurrent else self.lock


def _model_info(name: str, run_dir: Path, config: Any, parameters: int) -> dict[str, Any]:
    from metaseg_tf.evaluation.report import latest_evaluation

    data = read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    evaluation = latest_evaluation(run_dir, "test")
    test = {}
    if evaluation is not None:
        summary = read_json(evaluation / "summary.json")
        dice = summary["per_patient"]["dice"]
        test = {"patients": summary["patients"], "per_patient_dice": dice["mean"], "per_patient_dice_ci95": dice["ci95"],
                "global_dice": summary["global"]["dice"],
                f"hd95_{summary.get('distance_unit', 'px')}": summary["per_patient"]["hd95"]["mean"]}
    return {"name": name, "architecture": config.model, "run": run_dir.name, "input_size": config.image_size,
            "channels": config.channels, "sequences": list(resolve_sequences(config.sequences, config.channels)),
            "clahe": config.clahe, "parameters": parameters,
            "training_data": {"data_dir": config.data_dir, "layout": data.get("layout"), "slices_used": data.get("pairs_used", data.get("slices_used")),
                              "patients_per_part": {part: len(cases) for part, cases in data.get("split", {}).items()},
                              "slices_per_part": data.get("slices_per_part", {}),
                              "skipped": len(data.get("skipped_at_reading", {}))
                              + sum(len(v) for v in data.get("skipped_at_discovery", {}).values())},
            "test_metrics": test}


def load_models(run_dirs: list[Path], engine: str = "keras", level: int | None = None) -> dict[str, ServedModel]:
    """Load each run's best model; names are the architectures (the run folder's name on a clash). ``level``
    prunes every U-Net++ trained with deep supervision to that level; other models are served whole, and
    ``/models`` says which level each one runs at."""
    from metaseg_tf.predict import Predictor

    models: dict[str, ServedModel] = {}
    for run_dir in run_dirs:
        run_dir = paths.resolve(run_dir)
        try:
            config = load_run_config(run_dir)
            pruned = level if config.model == "nested_unet" and config.deep_supervision else None
            predictor = Predictor.from_run(run_dir, engine=engine, level=pruned)
        except Exception as error:  # a broken run folder must stop the start-up with its reason
            raise ServeError(f"cannot load {run_dir}: {error}") from error
        name = predictor.config.model if predictor.config.model not in models else run_dir.name
        info = {**_model_info(name, run_dir, predictor.config, served_model(predictor.model, pruned).count_params()),
                "engine": predictor.engine.name, "level": pruned,
                "threshold": predictor.threshold, "threshold_source": predictor.threshold_source}
        if pruned is not None and info["test_metrics"]:
            info["test_metrics_note"] = f"of the whole network; served pruned to level {pruned}"
        models[name] = ServedModel(name, run_dir, predictor, info)
    return models


class LesionSummary(BaseModel):
    count: int = Field(description="connected components (8-connected) of the mask")
    areas_px: list[int] = Field(description="area of each lesion in pixels of the uploaded image")
    total_px: int


class ProbabilitySummary(BaseModel):
    max: float
    mean: float
    fraction_above_threshold: float


class ModelPrediction(BaseModel):
    model: str
    threshold: float
    mask_png: str = Field(description="base64 PNG, 0/255, at the uploaded image's size")
    probability: ProbabilitySummary
    lesions: LesionSummary
    latency_ms: float
    attention_png: list[str] | None = Field(default=None, description="base64 PNG heat maps, finest gate first")


class PredictionResponse(BaseModel):
    width: int
    height: int
    predictions: list[ModelPrediction]


class RegionScores(BaseModel):
    """Per-case scores of one region against the uploaded ``seg`` (null where a score is undefined)."""

    dice: float | None
    hd95: float | None = Field(description="95th-percentile Hausdorff distance in mm (voxels if no spacing)")
    lesion_dice: float | None = Field(description="BraTS-MET 2023 lesion-wise Dice")
    lesion_hd95: float | None = Field(description="BraTS-MET 2023 lesion-wise HD95 in mm")
    truth_lesions: int | None
    detected_lesions: int | None
    false_positive_lesions: int | None


class VolumeModelPrediction(BaseModel):
    model: str
    threshold: float
    shape: list[int] = Field(description="the voxel grid of the input and of the returned seg, in file order")
    slices: int = Field(description="axial slices predicted")
    lesion_voxels: int
    seg_filename: str = Field(description="<case>-seg.nii.gz")
    seg_nii_gz: str = Field(description="base64 of <case>-seg.nii.gz: uint8 labels (a one-region model: the "
                                        "region's own label, e.g. BraTS TC 1) on the input's voxel grid, with its "
                                        "affine and header")
    latency_ms: float
    scores: dict[str, RegionScores] | None = Field(default=None, description="per region, when a seg was sent")


class VolumeResponse(BaseModel):
    case_id: str
    shape: list[int] = Field(description="the uploaded voxel grid, in file order")
    axial_slices: int
    canonical_shape: list[int] = Field(description="(slice, row, column) for display: axial slices inferior to "
                                                   "superior, rows anterior to posterior, columns the patient's "
                                                   "right to left (metaseg_tf.data.volumes.to_canonical)")
    spacing_mm: list[float] | None = Field(description="voxel size along the canonical axes")
    predictions: list[VolumeModelPrediction]


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _file_type(head: bytes) -> str | None:
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return next((kind for magic, kind in SIGNATURES.items() if head.startswith(magic)), None)


def _decode_upload(data: bytes, settings: ServeSettings) -> np.ndarray:
    """Validated pixels of an upload as float32 ``(H, W, 3)`` in ``[0, 1]``. The header (Pillow) is read before
    anything is decoded: an image with several pages or frames, more than ``max_side_pixels`` a side, or a
    header that Pillow itself calls a decompression bomb is refused, so one request decodes at most one
    ``max_side_pixels`` square image, whatever its file size."""
    from PIL import Image

    if not data:
        raise HTTPException(422, "the uploaded file is empty")
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"the upload is larger than the limit of {settings.max_upload_bytes} bytes")
    kind = _file_type(data[:16])
    if kind is None:
        raise HTTPException(415, "not a supported image: send a TIFF, PNG, JPEG, BMP or WebP slice")
    try:
        with Image.open(io.BytesIO(data)) as header:
            width, height = header.size
            frames = getattr(header, "n_frames", 1)  # pages of a TIFF, frames of an animated PNG/WebP
    except Image.DecompressionBombError:
        raise HTTPException(413, f"the image is too large: its header declares more pixels than the limit of "
                                 f"{settings.max_side_pixels} px a side") from None
    except Exception:  # Pillow raises several types for headers it cannot parse
        raise HTTPException(422, f"cannot read the {kind.upper()} header: the file is damaged") from None
    if frames > 1:
        raise HTTPException(422, f"the {kind.upper()} holds {frames} pages or frames; send one 2D slice")
    if max(width, height) > settings.max_side_pixels:
        raise HTTPException(413, f"the image is {width}x{height} px; the limit is {settings.max_side_pixels} px a side")
    try:
        return read_image(data, channels=3)
    except DataError as error:
        raise HTTPException(422, f"cannot decode the {kind.upper()} upload ({error}); is it truncated?") from None


def _attention_pngs(served: ServedModel, image: np.ndarray) -> list[str]:
    from metaseg_tf.data.preprocess import normalise
    from metaseg_tf.models.attention_unet import attention_maps

    prepared = served.predictor.prepare_slice(image)[None]
    maps = attention_maps(served.predictor.model, normalise(prepared, served.predictor.config.normalisation))
    height, width = image.shape[:2]
    pngs = []
    for coefficients in maps.values():
        heat = cv2.resize(coefficients[0, ..., 0].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        pngs.append(_b64(_png(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET))))
    return pngs


def _predict_one(served: ServedModel, image: np.ndarray, threshold: float | None, attention: bool) -> ModelPrediction:
    predictor = served.predictor
    used = predictor.threshold if threshold is None else threshold
    started = time.perf_counter()
    with served.serialised():
        try:
            (result,) = predictor.predict_slices([image], threshold=used)
        except DataError as error:  # e.g. a model of 2 or 4 sequences cannot take a slice image
            raise HTTPException(422, f"{served.name}: {error}") from None
    maps = None
    if attention and served.info["architecture"] == "attention_unet":
        with served.lock:  # the gates' maps come from the Keras model whatever the engine
            maps = _attention_pngs(served, image)
    latency = (time.perf_counter() - started) * 1000
    probability = result.probability
    return ModelPrediction(
        model=served.name, threshold=used, mask_png=_b64(_png(result.mask * 255)),
        probability=ProbabilitySummary(max=float(probability.max()), mean=float(probability.mean()),
                                       fraction_above_threshold=float(np.mean(probability >= used))),
        lesions=LesionSummary(count=result.lesion_count, areas_px=result.lesion_areas, total_px=int(result.mask.sum())),
        latency_ms=round(latency, 2), attention_png=maps)


# --- volumes ------------------------------------------------------------------------------------------


def _upload_name(filename: str | None, gzipped: bool, fallback: str) -> str:
    """A safe file name for an upload: the client's base name (never its folders) reduced to letters, digits,
    ``.``, ``_`` and ``-``, with ``.nii.gz`` or ``.nii`` after its content (gzip or not)."""
    base = re.split(r"[\\/]", filename or "")[-1]
    stem = nifti_stem(Path(base)) if is_nifti(Path(base)) else base.split(".")[0]
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).lstrip("._-")[:100] or fallback
    return stem + (".nii.gz" if gzipped else ".nii")


def _nifti_signature(head: bytes) -> bool:
    """Whether ``head`` (a file's first bytes) starts a NIfTI-1 or NIfTI-2 file, plain or gzip-compressed."""
    if head[:2] == GZIP_MAGIC:
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4)
        except zlib.error:
            return False
    return len(head) >= 4 and any(int.from_bytes(head[:4], order) in NIFTI_HEADER_SIZES for order in ("little", "big"))


def _save_volume(upload: UploadFile, folder: Path, role: str, settings: ServeSettings) -> Path:
    """Write one NIfTI upload into ``folder`` under a safe name, after checking that it is not empty, starts
    like a NIfTI file and stays within ``max_volume_bytes``."""
    head = upload.file.read(64 * 1024)
    if not head:
        raise HTTPException(422, f"the {role} upload is empty")
    if not _nifti_signature(head):
        raise HTTPException(415, f"the {role} upload is not a NIfTI volume: send a .nii or .nii.gz file")
    folder.mkdir(parents=True)
    path = folder / _upload_name(upload.filename, head[:2] == GZIP_MAGIC, folder.name)
    total = 0
    with path.open("wb") as out:
        while head:
            total += len(head)
            if total > settings.max_volume_bytes:
                raise HTTPException(413, f"the {role} upload is larger than the limit of {settings.max_volume_bytes} "
                                         "bytes per volume")
            out.write(head)
            head = upload.file.read(1024 * 1024)
    return path


def _volume_grid(path: Path, role: str, settings: ServeSettings) -> tuple[tuple[int, ...], np.ndarray]:
    """The voxel grid (3D shape, affine) of a saved upload, from its header alone (nibabel reads the voxels
    lazily): a volume that is not 3D or has more than ``max_voxels`` voxels is refused before it is read."""
    import nibabel as nib

    try:
        image = nib.load(str(path))
        shape, affine = tuple(int(n) for n in image.shape), np.asarray(image.affine, np.float64)
    except Exception:  # nibabel raises several types for headers it cannot parse
        raise HTTPException(422, f"cannot read the NIfTI header of the {role}: the file is damaged") from None
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) != 3:
        several = " (several volumes in one file: send one 3D file per sequence)" if len(shape) == 4 else ""
        raise HTTPException(422, f"the {role} has shape {shape}: a 3D volume is expected{several}")
    voxels = math.prod(shape)
    if voxels == 0 or not np.isfinite(affine).all():
        raise HTTPException(422, f"the {role} has an empty grid or an invalid affine (shape {shape})")
    if voxels > settings.max_voxels:
        raise HTTPException(413, f"the {role} has {voxels} voxels ({'x'.join(map(str, shape))}); the limit is "
                                 f"{settings.max_voxels} voxels per volume")
    return shape, affine


def _read_volume(served: ServedModel, paths: list[Path], seg: Path | None, folder: Path) -> Any:
    """The uploads as one case (:func:`~metaseg_tf.predict.nifti_case`) read for ``served``'s sequences."""
    from metaseg_tf.data.volumes import SequenceSource, read_case
    from metaseg_tf.predict import nifti_case

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


def _predict_volume_one(served: ServedModel, volume: Any, threshold: float | None,
                        out_dir: Path) -> VolumeModelPrediction:
    from metaseg_tf.predict import case_scores, write_case_prediction

    predictor = copy.copy(served.predictor)  # this request's threshold, without touching the shared predictor
    predictor.threshold = predictor.threshold if threshold is None else threshold
    started = time.perf_counter()
    with served.serialised():
        prediction = predictor.predict_volume(volume)
    latency = (time.perf_counter() - started) * 1000
    out_dir.mkdir(parents=True)
    seg_path = write_case_prediction(volume, prediction, out_dir)["seg"]
    scores = None
    if volume.labels is not None:
        scores = {region: RegionScores(**{name: _finite(values[name]) for name in VOLUME_SCORES})
                  for region, values in case_scores(volume, prediction, predictor.target).items()}
    return VolumeModelPrediction(
        model=served.name, threshold=predictor.threshold, shape=list(volume.reference.shape[:3]),
        slices=len(prediction.labels), lesion_voxels=int(np.count_nonzero(prediction.labels)),
        seg_filename=seg_path.name, seg_nii_gz=_b64(seg_path.read_bytes()), latency_ms=round(latency, 2),
        scores=scores)


class BodyLimit:
    """ASGI middleware: 413 with a JSON ``detail`` for a request body over ``limit`` bytes (``path_limits``:
    another limit for the paths named there), from the declared Content-Length before anything is read, or,
    for a body sent without one (chunked), as soon as the bytes received pass the limit, so no upload is
    spooled beyond it."""

    def __init__(self, app: Any, limit: int, path_limits: dict[str, int] | None = None) -> None:
        self.app, self.limit, self.path_limits = app, limit, dict(path_limits or {})

    @staticmethod
    def _too_large(limit: int) -> HTTPException:
        return HTTPException(413, f"the upload is larger than the limit of {limit} bytes")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.path_limits.get(scope.get("path", ""), self.limit)
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            response = JSONResponse({"detail": self._too_large(limit).detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # raised inside the body parser: FastAPI answers it as this 413
                raise self._too_large(limit)
            return message

        await self.app(scope, counted, send)


def create_app(run_dirs: list[Path] | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``run_dirs`` (default: the newest pipeline run's two models)."""
    settings = settings or ServeSettings()
    models = load_models(run_dirs if run_dirs else newest_pipeline_runs(), settings.engine, settings.level)
    app = FastAPI(title="metaseg-tf", version="0.1.0",
                  description="Brain-lesion segmentation of 2D MRI slices and NIfTI volumes with U-Net++ "
                              "and Attention U-Net.")
    # a volume request carries up to one file per sequence and a seg; the slice endpoints keep their limit
    files_per_volume_request = max(len(served.info["sequences"]) for served in models.values()) + 1
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_ROOM,
                       path_limits={"/predict/volume": settings.max_volume_bytes * files_per_volume_request
                                    + MULTIPART_ROOM})
    app.state.models, app.state.settings = models, settings

    def chosen(model: str) -> list[ServedModel]:
        if model == "all":
            return list(models.values())
        if model not in models:
            raise HTTPException(404, f"unknown model {model!r}; served: {', '.join(models)} or 'all'")
        return [models[model]]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, and which models are loaded."""
        return {"status": "ok", "models": list(models)}

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        """Each served model: architecture, input size, training data and its test-split metrics."""
        return [served.info for served in models.values()]

    @app.post("/predict", response_model=PredictionResponse)
    def predict(file: SliceUpload,
                model: Annotated[str, Form(description="a served model's name, or 'all'")] = "all",
                threshold: Threshold = None,
                attention: Annotated[bool, Form(description="add Attention U-Net's gate maps")] = False,
                ) -> PredictionResponse:
        """Segment one slice with one or all models; masks come back as base64 PNG at the upload's size."""
        targets = chosen(model)
        image = _decode_upload(file.file.read(settings.max_upload_bytes + 1), settings)
        predictions = [_predict_one(served, image, threshold, attention) for served in targets]
        return PredictionResponse(width=image.shape[1], height=image.shape[0], predictions=predictions)

    @app.post("/predict/mask", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the mask, 0/255 PNG"}})
    def predict_mask(file: SliceUpload,
                     model: Annotated[str, Form(description="a served model's name")] = SERVED_MODELS[0],
                     threshold: Threshold = None) -> Response:
        """The mask of one model as a PNG image (0/255) at the upload's size."""
        if model == "all":
            raise HTTPException(422, "/predict/mask returns one mask: name one model")
        (served,) = chosen(model)
        image = _decode_upload(file.file.read(settings.max_upload_bytes + 1), settings)
        prediction = _predict_one(served, image, threshold, attention=False)
        return Response(base64.b64decode(prediction.mask_png), media_type="image/png",
                        headers={"X-Lesion-Count": str(prediction.lesions.count),
                                 "X-Latency-Ms": str(prediction.latency_ms)})

    @app.post("/predict/volume", response_model=VolumeResponse)
    def predict_volume(files: VolumeUploads, seg: SegUpload = None,
                       model: Annotated[str, Form(description="a served model's name, or 'all'")] = "all",
                       threshold: Threshold = None) -> VolumeResponse:
        """Segment a NIfTI case with one or all models; each returns ``<case>-seg.nii.gz`` (base64) on the
        input's voxel grid and, with a ``seg``, the per-case scores of each region."""
        targets = chosen(model)
        for served in targets:
            sequences = served.info["sequences"]
            if len(files) not in (1, len(sequences)):
                raise HTTPException(422, f"{served.name} takes {len(sequences)} sequence(s) ({', '.join(sequences)}): "
                                         f"send 1 volume for all of them, or {len(sequences)} in this order, "
                                         f"not {len(files)}")
        roles = ["volume"] if len(files) == 1 else [f"volume {k + 1} of {len(files)}" for k in range(len(files))]
        with tempfile.TemporaryDirectory(prefix="metaseg-volume-") as temporary:
            folder = Path(temporary)
            paths = [_save_volume(upload, folder / f"volume-{k + 1}", role, settings)
                     for k, (upload, role) in enumerate(zip(files, roles))]
            seg_path = _save_volume(seg, folder / "seg", "seg", settings) if seg is not None else None
            grids = {role: _volume_grid(path, role, settings) for role, path in zip(roles, paths)}
            if seg_path is not None:
                grids["seg"] = _volume_grid(seg_path, "seg", settings)
            try:
                check_one_grid(grids)  # the library's own check: co-registered uploads on one voxel grid
            except DataError as error:
                raise HTTPException(422, str(error)) from None
            volumes: dict[tuple, Any] = {}  # models that read the same sequences share one read
            predictions = []
            for k, served in enumerate(targets):
                config = served.predictor.config
                key = (tuple(served.info["sequences"]), config.fill_missing)
                if key not in volumes:
                    volumes[key] = _read_volume(served, paths, seg_path, folder)
                predictions.append(_predict_volume_one(served, volumes[key], threshold, folder / f"model-{k + 1}"))
            volume = next(iter(volumes.values()))
        return VolumeResponse(case_id=volume.case_id, shape=list(grids[roles[0]][0]),
                              axial_slices=int(volume.images.shape[0]), canonical_shape=list(volume.images.shape[:3]),
                              spacing_mm=list(volume.spacing) if volume.spacing is not None else None,
                              predictions=predictions)

    return app


def app_from_environment() -> FastAPI:
    """App factory for uvicorn: runs from ``METASEG_SERVE_RUNS`` (``os.pathsep``-separated), limits from
    ``METASEG_MAX_UPLOAD_MB``, ``METASEG_MAX_SIDE_PX``, ``METASEG_MAX_VOLUME_MB`` and ``METASEG_MAX_VOXELS``,
    the inference engine from ``METASEG_ENGINE`` (keras, onnx or openvino) and U-Net++'s pruning level from
    ``METASEG_LEVEL`` (empty: the whole network)."""
    runs = [Path(p) for p in os.environ.get("METASEG_SERVE_RUNS", "").split(os.pathsep) if p]
    settings = ServeSettings(
        max_upload_bytes=int(float(os.environ.get("METASEG_MAX_UPLOAD_MB", 20)) * 1024 * 1024),
        max_side_pixels=int(os.environ.get("METASEG_MAX_SIDE_PX", 4096)),
        max_volume_bytes=int(float(os.environ.get("METASEG_MAX_VOLUME_MB", 200)) * 1024 * 1024),
        max_voxels=int(float(os.environ.get("METASEG_MAX_VOXELS", 40_000_000))),
        engine=os.environ.get("METASEG_ENGINE", "keras"),
        level=int(os.environ["METASEG_LEVEL"]) if os.environ.get("METASEG_LEVEL") else None)
    return create_app(runs or None, settings)
