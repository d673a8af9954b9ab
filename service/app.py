"""The HTTP API: the app factory and its routes.

    create_app(Settings(model_dir=..., api_keys=...))

Routes stay thin: decoding is service.preprocessing, batching and inference
service.batcher, the verdict service.decision, the overlay service.heatmap.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hmac
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect

from service import logs
from service.batcher import Batcher, InferenceFailed, QueueFull, Scored
from service.decision import DEFECT_FREE, Decision, decide
from service.heatmap import overlay, to_png
from service.metrics import Metrics
from service.middleware import BodyLimits, BodyTimeout, BodyTooLarge, Observe
from service.preprocessing import InputRejected, PreparedImage, prepare
from service.runtime import ModelRuntime
from service.schemas import (
    BatchItem,
    BatchResponse,
    ErrorDetail,
    ErrorResponse,
    Health,
    ImageResult,
    InputInfo,
    InspectResponse,
    ModelInfo,
    ModelRef,
    TileResult,
    Timings,
)
from service.settings import Settings, get_settings

logger = logging.getLogger("service.app")

RAW_TYPES = (
    "image/png",
    "image/jpeg",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "application/octet-stream",
)
IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image: the raw bytes, or multipart/form-data with the field `file`.",
        "content": {
            **{t: {"schema": {"type": "string", "format": "binary"}} for t in RAW_TYPES[:5]},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": {"type": "string", "format": "binary"}},
                    "required": ["file"],
                }
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Several images as multipart/form-data, each in a field `files`.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                    "required": ["files"],
                }
            }
        },
    }
}
ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in {
        400: "the image was refused (reason says why)",
        401: "API key missing",
        403: "API key wrong",
        408: "the body arrived too slowly",
        413: "body or image too large",
        415: "unsupported content type",
        503: "queue full or not ready (see Retry-After)",
    }.items()
}


class ApiError(Exception):
    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers


# --- dependencies ------------------------------------------------------------------


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def _batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


SettingsDep = Annotated[Settings, Depends(_settings)]
RuntimeDep = Annotated[ModelRuntime, Depends(_runtime)]
BatcherDep = Annotated[Batcher, Depends(_batcher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    auth = request.headers.get("authorization", "")
    if key is None and auth.lower().startswith("bearer "):
        key = auth[7:].strip()
    return key


def _matches(key: str, secrets: list[str]) -> bool:
    # Every key is compared, in constant time each: neither the position of a
    # match nor a common prefix shows in the answer time.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(key.encode(), secret.encode())
    return found


def require_api_key(request: Request, settings: SettingsDep) -> None:
    keys = [k.get_secret_value() for k in settings.api_keys]
    if not keys:
        return
    key = _presented_key(request)
    if key is None:
        raise ApiError(
            401, "missing_api_key", "send an API key in X-API-Key or Authorization: Bearer"
        )
    if not _matches(key, keys):
        raise ApiError(403, "invalid_api_key", "the API key is not valid")


def require_admin_key(request: Request, settings: SettingsDep) -> None:
    if settings.admin_key is None:
        raise ApiError(403, "reload_disabled", "no admin key is configured; send SIGHUP instead")
    key = _presented_key(request)
    if key is None:
        raise ApiError(401, "missing_api_key", "send the admin key in X-API-Key")
    if not _matches(key, [settings.admin_key.get_secret_value()]):
        raise ApiError(403, "invalid_api_key", "the admin key is not valid")


# --- the work ----------------------------------------------------------------------


async def _image_bytes(request: Request) -> bytes:
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype == "multipart/form-data":
        form = await request.form(
            max_files=1, max_part_size=request.app.state.settings.max_body_bytes
        )
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "missing_file", "multipart body needs the image in the field `file`"
            )
        return await upload.read()
    if ctype in RAW_TYPES:
        return await request.body()
    request.app.state.metrics.rejected.labels("unsupported_media_type").inc()
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {ctype or '(none)'} is not an image; send {', '.join(RAW_TYPES)} "
        "or multipart/form-data",
    )


async def _score(
    data: bytes, runtime: ModelRuntime, batcher: Batcher, metrics: Metrics
) -> tuple[PreparedImage, Scored, float]:
    """Decode (in a thread), then queue for the next batch. Returns (image, scores, decode s).

    Refusals and inference failures come out as ApiError, counted.
    """
    meta = runtime.current.metadata
    max_pixels = batcher.runtime.settings.max_pixels
    try:
        with batcher.expecting():
            t0 = time.perf_counter()
            prepared = await asyncio.to_thread(prepare, data, meta.input, meta.grid, max_pixels)
            decode_s = time.perf_counter() - t0
            future = batcher.enqueue(prepared.tensor)
        return prepared, await future, decode_s
    except (InputRejected, QueueFull, InferenceFailed) as exc:
        raise _to_api_error(exc, metrics) from exc


def _respond(
    request: Request,
    prepared: PreparedImage,
    scored: Scored,
    decode_s: float,
    with_heatmap: bool,
    metrics: Metrics,
) -> tuple[InspectResponse, Decision]:
    meta = scored.artifact.metadata
    d = decide(scored.image_error, scored.tile_errors, meta.thresholds)
    labels = (meta.name, str(meta.version))
    metrics.decode_duration.labels(*labels).observe(decode_s)
    metrics.verdicts.labels(*labels, d.verdict).inc()
    seen = InputInfo.judge(prepared.codec, meta.calibration.codec)
    if not seen.matches_calibration:
        metrics.codec_mismatch.labels(*labels, seen.format).inc()
    metrics.image_score.labels(*labels).observe(d.image_score)
    for k, s in enumerate(d.tile_scores, start=1):
        metrics.tile_score.labels(*labels, str(k)).observe(s)
    if d.verdict == DEFECT_FREE:
        metrics.observe_good(*labels, d.score)
    heat = None
    if with_heatmap:
        png = to_png(_overlay(prepared, scored, d))
        heat = base64.b64encode(png).decode()
    total_ms = (time.perf_counter() - request.state.started) * 1000
    body = InspectResponse(
        request_id=request.state.request_id,
        model=ModelRef(name=meta.name, version=meta.version, family=meta.family),
        verdict=d.verdict,
        image=ImageResult(error=d.image_error, threshold=meta.thresholds.eps0, score=d.image_score),
        tiles=[
            TileResult(tile=k, error=e, threshold=t, score=s, defective=k in d.defective_tiles)
            for k, (e, t, s) in enumerate(
                zip(d.tile_errors, meta.thresholds.tiles, d.tile_scores, strict=True), start=1
            )
        ],
        defective_tiles=list(d.defective_tiles),
        batch_size=scored.batch_size,
        timings_ms=Timings(
            decode=round(decode_s * 1000, 3),
            queue=round(scored.queue_s * 1000, 3),
            inference=round(scored.inference_s * 1000, 3),
            total=round(total_ms, 3),
        ),
        input=seen,
        heatmap_png_base64=heat,
    )
    return body, d


async def _inspect_one(
    request: Request, runtime: ModelRuntime, batcher: Batcher, metrics: Metrics, heatmap: bool
) -> tuple[PreparedImage, Scored, InspectResponse, Decision]:
    """The single-image routes: read the body, score it, build the response."""
    data = await _image_bytes(request)
    prepared, scored, decode_s = await _score(data, runtime, batcher, metrics)
    body, d = _respond(request, prepared, scored, decode_s, heatmap, metrics)
    return prepared, scored, body, d


def _overlay(prepared: PreparedImage, scored: Scored, d: Decision) -> Any:
    meta = scored.artifact.metadata
    return overlay(
        prepared.rgb, scored.anomaly_map, meta.thresholds.eps0, d.defective_tiles,
        meta.grid.rows, meta.grid.cols,
    )  # fmt: skip


def _to_api_error(exc: Exception, metrics: Metrics) -> ApiError:
    if isinstance(exc, InputRejected):
        metrics.rejected.labels(exc.reason.value).inc()
        return ApiError(400, exc.reason.value, exc.message)
    if isinstance(exc, QueueFull):
        metrics.rejected.labels("queue_full").inc()
        return ApiError(503, "queue_full", str(exc), {"Retry-After": "1"})
    if isinstance(exc, InferenceFailed):
        return ApiError(500, "inference_failed", f"the model failed on this batch: {exc}")
    raise exc


# --- routes ------------------------------------------------------------------------

v1 = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@v1.post(
    "/inspect",
    response_model=InspectResponse,
    openapi_extra=IMAGE_BODY,
    summary="Inspect one image",
)
async def inspect(
    request: Request,
    runtime: RuntimeDep,
    batcher: BatcherDep,
    metrics: MetricsDep,
    heatmap: Annotated[bool, Query(description="include the overlay PNG, base64")] = False,
) -> InspectResponse:
    """Verdict, whole-image and per-tile errors against their thresholds, timings."""
    _, _, body, _ = await _inspect_one(request, runtime, batcher, metrics, heatmap)
    return body


@v1.post(
    "/inspect/heatmap",
    openapi_extra=IMAGE_BODY,
    response_class=Response,
    responses={200: {"content": {"image/png": {}}, "description": "the overlay PNG"}},
    summary="The difference heatmap over the image, as a PNG",
)
async def inspect_heatmap(
    request: Request, runtime: RuntimeDep, batcher: BatcherDep, metrics: MetricsDep
) -> Response:
    """The anomaly map in colour over the part, tile grid drawn, defective tiles in red."""
    prepared, scored, _, d = await _inspect_one(request, runtime, batcher, metrics, False)
    return Response(
        to_png(_overlay(prepared, scored, d)),
        media_type="image/png",
        headers={
            "X-Verdict": d.verdict,
            "X-Defective-Tiles": ",".join(map(str, d.defective_tiles)),
        },
    )


@v1.post(
    "/inspect/batch",
    response_model=BatchResponse,
    openapi_extra=BATCH_BODY,
    summary="Inspect several images in one request",
)
async def inspect_batch(
    request: Request,
    runtime: RuntimeDep,
    batcher: BatcherDep,
    metrics: MetricsDep,
    settings: SettingsDep,
) -> BatchResponse:
    """One result per file, in order; a bad image fails only its own entry."""
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "multipart/form-data":
        metrics.rejected.labels("unsupported_media_type").inc()
        raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data")
    form = await request.form(
        max_files=settings.max_batch_files, max_part_size=settings.max_body_bytes
    )
    uploads = [
        (f.filename, await f.read()) for f in form.getlist("files") if isinstance(f, UploadFile)
    ]
    if not uploads:
        raise ApiError(400, "missing_file", "multipart body needs the images in fields `files`")

    async def one(i: int, name: str | None, data: bytes) -> BatchItem:
        try:
            prepared, scored, decode_s = await _score(data, runtime, batcher, metrics)
        except ApiError as err:
            return BatchItem(
                index=i, filename=name, error=ErrorDetail(reason=err.reason, message=err.message)
            )
        body, _ = _respond(request, prepared, scored, decode_s, False, metrics)
        return BatchItem(index=i, filename=name, result=body)

    results = await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(uploads)))
    return BatchResponse(request_id=request.state.request_id, results=list(results))


@v1.get("/models", response_model=ModelInfo, summary="The model in service")
async def models(runtime: RuntimeDep) -> ModelInfo:
    """Its metadata (thresholds, calibration, evaluation, sha256) and the provider in use."""
    art = runtime.current
    meta = art.metadata
    return ModelInfo(
        name=meta.name, version=meta.version, family=meta.family, provider=art.provider,
        path=str(art.path), metadata=meta.model_dump(mode="json"),
    )  # fmt: skip


ops = APIRouter()


@ops.get("/healthz", response_model=Health, summary="Alive")
async def healthz() -> Health:
    return Health(status="ok")


@ops.get(
    "/readyz",
    response_model=Health,
    summary="Ready: model loaded and warmed up",
    responses={503: {"model": ErrorResponse}},
)
async def readyz(runtime: RuntimeDep) -> Health:
    if not runtime.ready:
        raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
    return Health(status="ready")


@ops.get("/metrics", response_class=Response, summary="Prometheus metrics")
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- the factory -------------------------------------------------------------------


def _error(
    status: int, reason: str, message: str, request: Request, headers: dict[str, str] | None = None
) -> JSONResponse:
    rid = getattr(request.state, "request_id", None)
    body = ErrorResponse(error=ErrorDetail(reason=reason, message=message), request_id=rid)
    return JSONResponse(body.model_dump(), status_code=status, headers=headers)


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics(settings.near_threshold)
    runtime = ModelRuntime(settings, metrics)
    batcher = Batcher(
        runtime,
        metrics,
        settings.max_batch_size,
        settings.max_queue_delay_ms / 1000,
        settings.max_queue,
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(runtime.load)  # a broken model stops the start, loudly
        batcher.start()
        loop = asyncio.get_running_loop()
        reloads: set[asyncio.Task[Any]] = set()

        def on_sighup() -> None:
            task = loop.create_task(runtime.reload())
            reloads.add(task)
            task.add_done_callback(reloads.discard)
            task.add_done_callback(lambda t: t.cancelled() or t.exception())  # logged in reload

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, on_sighup)
        watcher = None
        if settings.model_poll_s > 0:
            watcher = loop.create_task(runtime.watch(settings.model_poll_s))
        yield
        if watcher is not None:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.remove_signal_handler(signal.SIGHUP)
        await batcher.stop()

    app = FastAPI(
        title="Inline inspection service",
        version="1",
        summary="Is the part defective, where, and how sure: anomaly models on onnxruntime.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.state.batcher = batcher
    app.include_router(ops)
    app.include_router(v1)
    # Imported here: the admin routes build on this module's dependencies.
    from service.routes_admin import admin

    app.include_router(admin)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.reason, exc.message, request, exc.headers)

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        metrics.rejected.labels("payload_too_large").inc()
        return _error(413, "payload_too_large", str(exc), request, {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def on_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        metrics.rejected.labels("read_timeout").inc()
        return _error(408, "read_timeout", str(exc), request, {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-upload: nothing to answer, nothing to alarm.
        metrics.rejected.labels("client_disconnected").inc()
        logs.log(logger, logging.INFO, "client disconnected before the body arrived")
        return Response(status_code=499)  # nginx's "client closed request", for the metrics

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid_request", str(exc.errors()), request)

    def labels() -> tuple[str, str]:
        if not runtime.ready:
            return "", ""
        meta = runtime.current.metadata
        return meta.name, str(meta.version)

    app.add_middleware(
        BodyLimits,
        max_bytes=settings.max_body_bytes,
        read_timeout_s=settings.read_timeout_s,
        metrics=metrics,
    )
    app.add_middleware(Observe, metrics=metrics, labels=labels)
    logs.log(logger, logging.INFO, "app created", model_dir=str(settings.model_dir))
    return app
