"""The inspection routes: one image, its heatmap, a batch of images.

Thin: the body comes from :mod:`service.deps`, the work from
:class:`service.inspection.Inspector`, the request bodies' OpenAPI from
:mod:`service.openapi`.
"""

from __future__ import annotations

import asyncio
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from service.deps import BatchFiles, ImageBytes, InspectorDep, MetricsDep, require_api_key
from service.errors import BUSY, ApiError, envelope
from service.openapi import (
    BATCH_BODY,
    ERRORS,
    IMAGE_BODY,
    IMAGE_ERRORS,
    QUERY_ERRORS,
    header,
)
from service.schemas import BatchItem, BatchResponse, ErrorDetail, InspectResponse

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.post(
    "/inspect",
    response_model=InspectResponse,
    openapi_extra=IMAGE_BODY,
    responses={**IMAGE_ERRORS, **QUERY_ERRORS},
    summary="Inspect one image",
)
async def inspect(
    request: Request,
    data: ImageBytes,
    inspector: InspectorDep,
    heatmap: Annotated[bool, Query(description="include the overlay PNG, base64")] = False,
) -> InspectResponse:
    """Verdict, whole-image and per-tile errors against their thresholds, timings."""
    item = await inspector.score(data)
    png = await inspector.heatmap_png(item) if heatmap else None
    return inspector.respond(item, request.state.request_id, request.state.started, png)


@router.post(
    "/inspect/heatmap",
    openapi_extra=IMAGE_BODY,
    response_class=Response,
    responses={
        200: {
            "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
            "description": "the overlay PNG",
            "headers": {
                "X-Verdict": header("`defect_free` or `defective`"),
                "X-Defective-Tiles": header("the tiles over threshold, comma-separated"),
            },
        },
        **IMAGE_ERRORS,
    },
    summary="The difference heatmap over the image, as a PNG",
)
async def inspect_heatmap(request: Request, data: ImageBytes, inspector: InspectorDep) -> Response:
    """The anomaly map in colour over the part, tile grid drawn, defective tiles in red."""
    item = await inspector.score(data)
    png = await inspector.heatmap_png(item)
    inspector.respond(item, request.state.request_id, request.state.started)  # counts it
    return Response(
        png,
        media_type="image/png",
        headers={
            "X-Verdict": item.decision.verdict,
            "X-Defective-Tiles": ",".join(map(str, item.decision.defective_tiles)),
        },
    )


@router.post(
    "/inspect/batch",
    response_model=BatchResponse,
    openapi_extra=BATCH_BODY,
    responses={
        200: {
            "description": "one result or error per file, in order",
            "headers": {
                "Retry-After": header("when some images found the queue full", required=False)
            },
        },
        **IMAGE_ERRORS,
    },
    summary="Inspect several images in one request",
)
async def inspect_batch(
    request: Request, files: BatchFiles, inspector: InspectorDep, metrics: MetricsDep
) -> BatchResponse | JSONResponse:
    """One result per file, in order; a bad image fails only its own entry.

    If no image found room (a full queue, or the decode memory busy), the
    answer is 503 with Retry-After, as for one image; if some did not, the 200
    carries Retry-After for them.
    """
    rid, started = request.state.request_id, request.state.started

    async def one(i: int, name: str | None, data: bytes) -> BatchItem:
        try:
            item = await inspector.score(data)
        except ApiError as err:
            metrics.rejected.labels(err.reason).inc()
            return BatchItem(
                index=i, filename=name, error=ErrorDetail(reason=err.reason, message=err.message)
            )
        return BatchItem(index=i, filename=name, result=inspector.respond(item, rid, started))

    results = list(await asyncio.gather(*(one(i, n, d) for i, (n, d) in enumerate(files))))
    busy = [r.error.reason for r in results if r.error is not None and r.error.reason in BUSY]
    if busy and len(busy) == len(results):
        message = f"no room for any of the {len(results)} images ({', '.join(sorted(set(busy)))})"
        return JSONResponse(
            envelope(busy[0], message, rid), status_code=503, headers={"Retry-After": "1"}
        )
    body = BatchResponse(request_id=rid, results=results)
    if busy:
        return JSONResponse(body.model_dump(mode="json"), headers={"Retry-After": "1"})
    return body
