"""The prediction service (FastAPI): trained runs behind ``/health``, ``/models``, ``/limits``, ``/predict``
(one 2D slice), ``/predict/volume`` (NIfTI volumes) and ``/predict/dicom`` (a DICOM MR study: its series' files
or a zip; answered with a DICOM SEG too). The volume requests are :mod:`metaseg_tf.serve.volume_requests`.

Each model is a :class:`~metaseg_tf.inference.predictor.Predictor` built from a run folder (or, for a
cross-validation folder, from its fold runs: one ensemble per architecture), so an upload goes through exactly
the preprocessing the model was trained with (window, CLAHE, resize, normalisation, from the run's
``config.json``) and the mask comes back at the uploaded image's own size. This module holds the routes and
the predictions they make; the loaded models are :mod:`metaseg_tf.serve.served`, the access token, the bounded
work (every prediction runs through a job gate: a few at once, a short queue, 503 with ``Retry-After`` beyond
it, a time limit) and the audit log :mod:`metaseg_tf.serve.guard`, the answers' JSON
:mod:`metaseg_tf.serve.schemas`, every upload check and the settings :mod:`metaseg_tf.serve.uploads`.

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
(:mod:`metaseg_tf.inference.engines`). ``metaseg serve --workers N`` starts N server processes instead, each with its
own copy of the models; ``--level K`` serves U-Net++ pruned to level K (:func:`metaseg_tf.inference.loading.inference_network`).

Start it with ``metaseg serve --api-only`` or
``uvicorn metaseg_tf.serve.api:app_from_environment --factory`` (runs from ``METASEG_SERVE_RUNS``).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Annotated, Any

import cv2
import numpy as np
from fastapi import FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import Response

from metaseg_tf.data.discover import DataError
from metaseg_tf.serve.schemas import (
    LesionSummary,
    ModelPrediction,
    PredictionResponse,
    ProbabilitySummary,
    VolumeResponse,
    b64_text,
)
from metaseg_tf.serve.guard import AuditLog, JobGate, TokenGate, audit_logger, default_volume_jobs, read_token
from metaseg_tf.serve.served import SERVE_ARCHITECTURES, LoadedModel, load_models, newest_pipeline_runs
from metaseg_tf.serve.uploads import BodyLimit, ServeSettings, decode_slice_upload
from metaseg_tf.serve.volume_requests import predict_dicom_request, predict_volume_request

MULTIPART_ROOM = 64 * 1024  # room for the multipart framing and the form fields of one request


# form fields shared by the prediction endpoints (module level: the annotations are resolved from here)
Threshold = Annotated[float | None, Form(gt=0.0, lt=1.0, description="default: each run's own threshold")]
SliceUpload = Annotated[UploadFile, File(description="one 2D MRI slice: TIFF, PNG, JPEG, BMP or WebP")]
VolumeUploads = Annotated[list[UploadFile], File(
    description="one 3D NIfTI (.nii or .nii.gz) for every sequence, or one per sequence of the model in its "
                "sequence order (GET /models lists it)")]
DicomUploads = Annotated[list[UploadFile], File(
    description="the DICOM files of a study's MR series (any number up to /limits' max_dicom_files), or one zip of them")]
SERIES_HELP = ("optional: which series is which sequence, e.g. 't1c=AX T1 POST;t2f=1.2.840...' (description text "
               "or SeriesInstanceUID); default: recognised from the series descriptions")
SegUpload = Annotated[UploadFile | None, File(
    description="optional: the case's label map (NIfTI) on the same voxel grid, for per-case scores")]


def _png(array: np.ndarray) -> bytes:
    ok, encoded = cv2.imencode(".png", array)
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return encoded.tobytes()


def _attention_pngs(served: LoadedModel, image: np.ndarray) -> list[str]:
    from metaseg_tf.data.preprocess import normalise
    from metaseg_tf.models.attention_unet import attention_maps

    prepared = served.predictor.prepare_slice(image)[None]
    maps = attention_maps(served.predictor.model, normalise(prepared, served.predictor.config.normalisation))
    height, width = image.shape[:2]
    pngs = []
    for coefficients in maps.values():
        heat = cv2.resize(coefficients[0, ..., 0].astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
        pngs.append(b64_text(_png(cv2.applyColorMap(np.round(heat * 255).astype(np.uint8), cv2.COLORMAP_JET))))
    return pngs


def _predict_one(served: LoadedModel, image: np.ndarray, threshold: float | None, attention: bool) -> ModelPrediction:
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
        model=served.name, threshold=used, mask_png=b64_text(_png(result.mask * 255)),
        probability=ProbabilitySummary(max=float(probability.max()), mean=float(probability.mean()),
                                       fraction_above_threshold=float(np.mean(probability >= used))),
        lesions=LesionSummary(count=result.lesion_count, areas_px=result.lesion_areas, total_px=int(result.mask.sum())),
        latency_ms=round(latency, 2), attention_png=maps)


def create_app(run_dirs: list[Path] | None = None, settings: ServeSettings | None = None) -> FastAPI:
    """The FastAPI application serving ``run_dirs`` (default: the newest pipeline run's two models), with
    the access token, the job gates and the audit log of :mod:`metaseg_tf.serve.guard`."""
    settings = settings or ServeSettings()
    models = load_models(run_dirs if run_dirs else newest_pipeline_runs(), settings.engine, settings.level)
    gates = {"volume": JobGate("volume", settings.volume_jobs or default_volume_jobs(settings.max_voxels),
                               settings.queue, settings.volume_timeout_s),
             "slice": JobGate("slice", settings.slice_jobs or os.cpu_count() or 1, settings.queue,
                              settings.slice_timeout_s)}

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        for gate in gates.values():
            gate.open()
        yield
        for gate in gates.values():  # at shutdown: drop what waits, let what runs finish
            gate.close()

    app = FastAPI(title="metaseg-tf", version="0.1.0",
                  description="Brain-lesion segmentation of 2D MRI slices and NIfTI volumes with U-Net++ "
                              "and Attention U-Net. Every route but /health needs the service's access token "
                              "(Authorization: Bearer) when it has one.", lifespan=lifespan)
    # a volume request carries up to one file per sequence and a seg; the slice endpoints keep their limit
    files_per_volume_request = max(len(served.info["sequences"]) for served in models.values()) + 1
    app.add_middleware(BodyLimit, limit=settings.max_upload_bytes + MULTIPART_ROOM,
                       path_limits={"/predict/volume": settings.max_volume_bytes * files_per_volume_request
                                    + MULTIPART_ROOM, "/predict/dicom": settings.max_dicom_bytes
                                    + MULTIPART_ROOM * max(settings.max_dicom_files // 64, 1)})
    app.add_middleware(TokenGate, token=settings.token)
    app.add_middleware(AuditLog)  # outermost: refusals by the token and the body limit are logged too
    app.state.models, app.state.settings, app.state.gates = models, settings, gates

    def chosen(model: str, request: Request) -> list[LoadedModel]:
        request.state.audit_model = model if model == "all" or model in models else "unknown"  # no free text logged
        if model == "all":
            return list(models.values())
        if model not in models:
            raise HTTPException(404, f"unknown model {model!r}; served: {', '.join(models)} or 'all'")
        return [models[model]]

    @app.get("/health")
    def health() -> dict[str, Any]:
        """Liveness, and which models are loaded (open without the token, for probes)."""
        return {"status": "ok", "models": list(models)}

    @app.get("/models")
    def list_models() -> list[dict[str, Any]]:
        """Each served model: architecture, input size, what it was trained on (a phantom-trained model says
        that its masks on real scans are not meaningful) and its test-split metrics."""
        return [served.info for served in models.values()]

    @app.get("/limits")
    def limits() -> dict[str, Any]:
        """The upload limits and, per kind of job, how many run at once, how many may wait, the time limit
        and how many are admitted now."""
        return {"max_upload_bytes": settings.max_upload_bytes, "max_side_pixels": settings.max_side_pixels,
                "max_volume_bytes": settings.max_volume_bytes, "max_voxels": settings.max_voxels,
                "max_dicom_files": settings.max_dicom_files, "max_dicom_bytes": settings.max_dicom_bytes,
                "jobs": {kind: {"at_once": gate.jobs, "queue": gate.queue, "timeout_s": gate.timeout_s,
                                "admitted": gate.admitted, "refused": gate.refused} for kind, gate in gates.items()}}

    def slice_prediction(file: UploadFile, targets: list[LoadedModel], threshold: float | None,
                         attention: bool) -> PredictionResponse:
        image = decode_slice_upload(file.file.read(settings.max_upload_bytes + 1), settings)
        predictions = [_predict_one(served, image, threshold, attention) for served in targets]
        return PredictionResponse(width=image.shape[1], height=image.shape[0], predictions=predictions)

    @app.post("/predict", response_model=PredictionResponse)
    async def predict(request: Request, file: SliceUpload,
                      model: Annotated[str, Form(description="a served model's name, or 'all'")] = "all",
                      threshold: Threshold = None,
                      attention: Annotated[bool, Form(description="add Attention U-Net's gate maps")] = False,
                      ) -> PredictionResponse:
        """Segment one slice with one or all models; masks come back as base64 PNG at the upload's size."""
        targets = chosen(model, request)
        return await gates["slice"].run(lambda: slice_prediction(file, targets, threshold, attention))

    @app.post("/predict/mask", response_class=Response,
              responses={200: {"content": {"image/png": {}}, "description": "the mask, 0/255 PNG"}})
    async def predict_mask(request: Request, file: SliceUpload,
                           model: Annotated[str, Form(description="a served model's name")] = SERVE_ARCHITECTURES[0],
                           threshold: Threshold = None) -> Response:
        """The mask of one model as a PNG image (0/255) at the upload's size."""
        if model == "all":
            raise HTTPException(422, "/predict/mask returns one mask: name one model")
        targets = chosen(model, request)
        (prediction,) = (await gates["slice"].run(lambda: slice_prediction(file, targets, threshold, False))).predictions
        return Response(base64.b64decode(prediction.mask_png), media_type="image/png",
                        headers={"X-Lesion-Count": str(prediction.lesions.count),
                                 "X-Latency-Ms": str(prediction.latency_ms)})

    @app.post("/predict/volume", response_model=VolumeResponse)
    async def predict_volume(request: Request, files: VolumeUploads, seg: SegUpload = None,
                             model: Annotated[str, Form(description="a served model's name, or 'all'")] = "all",
                             threshold: Threshold = None) -> VolumeResponse:
        """Segment a NIfTI case with one or all models; each returns ``<case>-seg.nii.gz`` (base64) on the
        input's voxel grid and, with a ``seg``, the per-case scores of each region. At most the ``/limits``
        number of volumes are predicted at once; the rest wait in a short queue, or get 503 with
        ``Retry-After`` when it is full."""
        targets = chosen(model, request)
        return await gates["volume"].run(lambda: predict_volume_request(targets, files, seg, threshold, settings))

    @app.post("/predict/dicom", response_model=VolumeResponse)
    async def predict_dicom(request: Request, files: DicomUploads,
                            series: Annotated[str | None, Form(description=SERIES_HELP)] = None,
                            model: Annotated[str, Form(description="a served model's name, or 'all'")] = "all",
                            threshold: Threshold = None) -> VolumeResponse:
        """Segment a DICOM MR study (files of its series, or one zip) with one or all models; each returns
        ``<case>-seg.nii.gz`` and ``<case>-seg.dcm`` (a DICOM SEG referencing the series of the model's first
        sequence), the lesions, the series found and the sequences read (for display). Admitted like
        ``/predict/volume``."""
        targets = chosen(model, request)
        return await gates["volume"].run(lambda: predict_dicom_request(targets, files, series, threshold, settings))

    return app


def app_from_environment() -> FastAPI:
    """App factory for uvicorn: runs from ``METASEG_SERVE_RUNS`` (``os.pathsep``-separated), limits from
    ``METASEG_MAX_UPLOAD_MB``, ``METASEG_MAX_SIDE_PX``, ``METASEG_MAX_VOLUME_MB``, ``METASEG_MAX_VOXELS``,
    ``METASEG_MAX_DICOM_FILES`` and ``METASEG_MAX_DICOM_MB``,
    the inference engine from ``METASEG_ENGINE`` (keras, onnx or openvino), U-Net++'s pruning level from
    ``METASEG_LEVEL`` (empty: the whole network), the access token from ``METASEG_API_TOKEN`` or the file
    ``METASEG_API_TOKEN_FILE`` (:func:`~metaseg_tf.serve.guard.read_token`) and the admission of work from
    ``METASEG_VOLUME_JOBS``, ``METASEG_SLICE_JOBS``, ``METASEG_QUEUE``, ``METASEG_VOLUME_TIMEOUT_S`` and
    ``METASEG_SLICE_TIMEOUT_S`` (:class:`~metaseg_tf.serve.uploads.ServeSettings`)."""
    runs = [Path(p) for p in os.environ.get("METASEG_SERVE_RUNS", "").split(os.pathsep) if p]
    if not audit_logger.handlers:  # uvicorn configures its own loggers only: the audit lines go to stderr
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        audit_logger.addHandler(handler)
        audit_logger.setLevel(logging.INFO)
    optional = {name: kind(os.environ[variable]) for name, variable, kind in (
        ("volume_jobs", "METASEG_VOLUME_JOBS", int), ("slice_jobs", "METASEG_SLICE_JOBS", int),
        ("queue", "METASEG_QUEUE", int), ("volume_timeout_s", "METASEG_VOLUME_TIMEOUT_S", float),
        ("slice_timeout_s", "METASEG_SLICE_TIMEOUT_S", float)) if os.environ.get(variable)}
    settings = ServeSettings(
        max_upload_bytes=int(float(os.environ.get("METASEG_MAX_UPLOAD_MB", 20)) * 1024 * 1024),
        max_side_pixels=int(os.environ.get("METASEG_MAX_SIDE_PX", 4096)),
        max_volume_bytes=int(float(os.environ.get("METASEG_MAX_VOLUME_MB", 200)) * 1024 * 1024),
        max_voxels=int(float(os.environ.get("METASEG_MAX_VOXELS", 40_000_000))),
        max_dicom_files=int(os.environ.get("METASEG_MAX_DICOM_FILES", 1000)),
        max_dicom_bytes=int(float(os.environ.get("METASEG_MAX_DICOM_MB", 800)) * 1024 * 1024),
        engine=os.environ.get("METASEG_ENGINE", "keras"),
        level=int(os.environ["METASEG_LEVEL"]) if os.environ.get("METASEG_LEVEL") else None,
        token=read_token(), **optional)
    return create_app(runs or None, settings)
