"""Operations: liveness, readiness, Prometheus metrics. No key needed."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.deps import DrainDep, MetricsDep, RuntimeDep
from service.errors import ApiError
from service.openapi import header
from service.schemas import ErrorResponse, Health

router = APIRouter()


@router.get("/healthz", response_model=Health, summary="Alive")
async def healthz() -> Health:
    return Health(status="ok")


@router.get(
    "/readyz",
    response_model=Health,
    summary="Ready: model loaded and warmed up at every batch size",
    responses={
        503: {
            "model": ErrorResponse,
            "description": "not ready (see Retry-After), or `draining`: shutting down",
            "headers": {"Retry-After": header("when not ready (not when draining)", False)},
        }
    },
)
async def readyz(runtime: RuntimeDep, drain: DrainDep) -> Health:
    if drain.draining:
        # Told to stop (SIGTERM): still serving, but send new work elsewhere.
        raise ApiError(503, "draining", "the server is shutting down; send requests elsewhere")
    if not runtime.ready:
        raise ApiError(503, "not_ready", "the model is not loaded yet", {"Retry-After": "1"})
    return Health(status="ready")


@router.get(
    "/metrics",
    response_class=Response,
    summary="Prometheus metrics",
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics_endpoint(metrics: MetricsDep) -> Response:
    return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)
