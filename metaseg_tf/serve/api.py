"""The prediction service (FastAPI): trained runs behind ``/health``, ``/models`` and ``/predict``.

Each model is a :class:`~metaseg_tf.predict.Predictor` built from a run folder, so an upload goes through
exactly the preprocessing the model was trained with (window, CLAHE, resize, normalisation, from the run's
``config.json``) and the mask comes back at the uploaded image's own size.

Uploads are checked before they reach a model: the file type (tif, png, jpg, bmp, webp; 8 or 16 bit; grey,
RGB or RGBA) by its content, the byte size and the pixel dimensions. A bad upload gets a 4xx answer with a
JSON ``detail`` that says what was wrong, never a 500. Inference on one model is serialised by a lock, so
concurrent requests are safe whatever the backend.

Start it with ``metaseg serve --api-only`` or
``uvicorn metaseg_tf.serve.api:app_from_environment --factory`` (runs from ``METASEG_SERVE_RUNS``).
"""

from __future__ import annotations

import base64
import io
import os
import threading
import time
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
from metaseg_tf.training.runs import list_runs, read_json

SERVED_MODELS = ("nested_unet", "attention_unet")
# first bytes of each accepted format: TIFF (both byte orders, classic and BigTIFF), PNG, JPEG, BMP, WebP
SIGNATURES = {**dict.fromkeys(TIFF_MAGIC, "tiff"), b"\x89PNG": "png", JPEG_MAGIC: "jpeg", b"BM": "bmp"}


# form fields shared by the prediction endpoints (module level: the annotations are resolved from here)
Threshold = Annotated[float | None, Form(gt=0.0, lt=1.0, description="default: each run's own threshold")]
SliceUpload = Annotated[UploadFile, File(description="one 2D MRI slice: TIFF, PNG, JPEG, BMP or WebP")]


class ServeError(RuntimeError):
    """The service cannot start: no runs to serve, or a run folder that cannot be loaded."""


@dataclass(frozen=True)
class ServeSettings:
    """Limits of the service (defaults: 20 MB uploads, 4096 px per side, 0.5 threshold from each run)."""

    max_upload_bytes: int = 20 * 1024 * 1024
    max_side_pixels: int = 4096


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
    """One loaded run: its predictor, what to say about it, and a lock that serialises its inference."""

    name: str
    run_dir: Path
    predictor: Any
    info: dict[str, Any]
    lock: threading.Lock = field(default_factory=threading.Lock)


def _model_info(name: str, run_dir: Path, config: Any, parameters: int) -> dict[str, Any]:
    from metaseg_tf.evaluation.report import latest_evaluation

    data = read_json(run_dir / "data.json") if (run_dir / "data.json").is_file() else {}
    evaluation = latest_evaluation(run_dir, "test")
    test = {}
    if evaluation is not None:
        summary = read_json(evaluation / "summary.json")
        dice = summary["per_patient"]["dice"]
        test = {"patients": summary["patients"], "per_patient_dice": dice["mean"], "per_patient_dice_ci95": dice["ci95"],
                "global_dice": summary["global"]["dice"], "hd95_px": summary["per_patient"]["hd95"]["mean"]}
    return {"name": name, "architecture": config.model, "run": run_dir.name, "input_size": config.image_size,
            "channels": config.channels, "clahe": config.clahe, "threshold": config.threshold, "parameters": parameters,
            "training_data": {"data_dir": config.data_dir, "layout": data.get("layout"), "pairs_used": data.get("pairs_used"),
                              "patients_per_part": {part: len(cases) for part, cases in data.get("split", {}).items()},
                              "slices_per_part": data.get("slices_per_part", {}),
                              "skipped": len(data.get("skipped_at_reading", {}))
                              + sum(len(v) for v in data.get("skipped_at_discovery", {}).values())},
            "test_metrics": test}


def load_models(run_dirs: list[Path]) -> dict[str, ServedModel]:
    """Load each run's best model; names are the architectures (the run folder's name on a clash)."""
    from metaseg_tf.predict import Predictor

    models: dict[str, ServedModel] = {}
    for run_dir in run_dirs:
        run_dir = paths.resolve(run_dir)
        try:
            predictor = Predictor.from_run(run_dir)
        except Exception as error:  # a broken run folder must stop the start-up with its reason
            raise ServeError(f"cannot load {run_dir}: {error}") from error
        name = predictor.config.model if predictor.config.model not in models else run_dir.name
        info = _model_info(name, run_dir, predictor.config, predictor.model.count_params())
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
    from metaseg_tf.data.preprocess import normalise, preprocess_slice
    from metaseg_tf.models.attention_unet import attention_maps

    prepared = preprocess_slice(image, served.predictor.config)[None]
    maps = attention_maps(served.predictor.model, normalise(prepared, served.predictor.config.normalisation))
    height, width = image.shape[:2]
    pngs = []
    for coefficients in maps.values():
        heat = cv2.resize(coefficients[0, ..., 0].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        pngs.append(_b64(_png(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET))))
    return pngs


def _predict_one(served: ServedModel, image: np.ndarray, threshold: float | None, attention: bool) -> ModelPrediction:
    predictor = served.predictor
    used = predictor.config.threshold if threshold is None else threshold
    started = time.perf_counter()
    with served.lock:
        (result,) = predictor.predict_slices([image], threshold=used)
        maps = _attention_pngs(served, image) if attention and served.info["architecture"] == "attention_unet" else None
    latency = (time.perf_counter() - started) * 1000
    probability = result.probability
    return ModelPrediction(
        model=served.name, threshold=used, mask_png=_b64(_png(result.mask * 255)),
        probability=ProbabilitySummary(max=float(probability.max()), mean=float(probability.mean()),
                                       fraction_above_threshold=float(np.mean(probability >= used))),
        lesions=LesionSummary(count=result.lesion_count, areas_px=result.lesion_areas, total_px=int(result.mask.sum())),
        latency_ms=round(latency, 2), attention_png=maps)


class BodyLimit:
    """ASGI middleware: 413 with a JSON ``detail`` for a request body over ``limit`` bytes, from the declared
    Content-Length before anything is read, or, for a body sent without one (chunked), as soon as the bytes
    received pass the limit, so no upload is spooled beyond it."""

    def __init__(self, app: Any, limit: int) -> None:
        self.app, self.limit = app, limit

    def _too_large(self) -> HTTPException:
        return HTTPException(413, f"the upload is larger than the limit of {self.limit} bytes")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers", [])).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            response = JSONResponse({"detail": self._too_large().detail}, status_code=413)
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> dict:
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > self.limit:  # raised inside the body parser: FastAPI answers it as this 413
                raise self._too_large()
            return message

        await self.app(scope, counted, send)


def create_app(run_dirs: list[Path] | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``run_dirs`` (default: the newest pipeline run's two models)."""
    settings = settings or ServeSettings()
    models = load_models(run_dirs if run_dirs else newest_pipeline_runs())
    app = FastAPI(title="metaseg-tf", version="0.1.0",
                  description="Brain-lesion segmentation of 2D MRI slices with U-Net++ and Attention U-Net.")
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + 64 * 1024)  # room for the multipart framing
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

    return app


def app_from_environment() -> FastAPI:
    """App factory for uvicorn: runs from ``METASEG_SERVE_RUNS`` (``os.pathsep``-separated), limits from
    ``METASEG_MAX_UPLOAD_MB`` and ``METASEG_MAX_SIDE_PX``."""
    runs = [Path(p) for p in os.environ.get("METASEG_SERVE_RUNS", "").split(os.pathsep) if p]
    settings = ServeSettings(
        max_upload_bytes=int(float(os.environ.get("METASEG_MAX_UPLOAD_MB", 20)) * 1024 * 1024),
        max_side_pixels=int(os.environ.get("METASEG_MAX_SIDE_PX", 4096)))
    return create_app(runs or None, settings)
