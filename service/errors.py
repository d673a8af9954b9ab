"""Every error the server answers, in one envelope, counted once.

    {"error": {"reason": "corrupt", "message": "..."}, "request_id": "..."}

Routes raise :class:`ApiError`; :func:`install_handlers` turns it, and every
error the framework raises on its own (unknown path, wrong method, a
malformed form, a failed validation, an unexpected exception), into that
envelope and counts it in ``inspection_rejected_inputs_total{reason}``. The
body-limit middleware answers before the app and uses :func:`envelope` too.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from service import logs
from service.metrics import Metrics
from service.middleware import BodyTimeout, BodyTooLarge
from service.schemas import ErrorDetail, ErrorResponse

logger = logging.getLogger("service.errors")

# What the framework's own HTTP errors are called in the envelope.
_HTTP_REASONS = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


# Refusals that say "try again shortly" (503 with Retry-After), not "never".
BUSY = frozenset({"queue_full", "decode_busy"})


class ApiError(Exception):
    def __init__(
        self, status: int, reason: str, message: str, headers: dict[str, str] | None = None
    ):
        super().__init__(message)
        self.status, self.reason, self.message, self.headers = status, reason, message, headers


def envelope(reason: str, message: str, request_id: str | None) -> dict[str, Any]:
    body = ErrorResponse(error=ErrorDetail(reason=reason, message=message), request_id=request_id)
    return body.model_dump()


def form_error(exc: HTTPException, max_files: int, setting: str) -> ApiError:
    """Starlette's answer to a malformed or oversized multipart form, as an ApiError."""
    if "too many files" in str(exc.detail).lower():
        return ApiError(
            413, "too_many_files", f"at most {max_files} images per request ({setting})"
        )
    return ApiError(400, "invalid_multipart", str(exc.detail))


def install_handlers(app: FastAPI, metrics: Metrics) -> None:
    def answer(
        request: Request,
        status: int,
        reason: str,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> JSONResponse:
        metrics.rejected.labels(reason).inc()
        rid = getattr(request.state, "request_id", None)
        return JSONResponse(envelope(reason, message, rid), status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def on_api_error(request: Request, exc: ApiError) -> JSONResponse:
        return answer(request, exc.status, exc.reason, exc.message, exc.headers)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = _HTTP_REASONS.get(exc.status_code, f"http_{exc.status_code}")
        if exc.status_code == 404:
            message = f"no route {request.url.path}; see /docs"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(exc.detail)
        headers = dict(exc.headers) if exc.headers else None
        return answer(request, exc.status_code, reason, message, headers)

    @app.exception_handler(BodyTooLarge)
    async def on_too_large(request: Request, exc: BodyTooLarge) -> JSONResponse:
        return answer(request, 413, "payload_too_large", str(exc), {"Connection": "close"})

    @app.exception_handler(BodyTimeout)
    async def on_timeout(request: Request, exc: BodyTimeout) -> JSONResponse:
        return answer(request, 408, "read_timeout", str(exc), {"Connection": "close"})

    @app.exception_handler(ClientDisconnect)
    async def on_disconnect(request: Request, exc: ClientDisconnect) -> Response:
        # The client hung up mid-upload: nothing to answer, nothing to alarm.
        metrics.rejected.labels("client_disconnected").inc()
        logs.log(logger, logging.INFO, "client disconnected before the body arrived")
        return Response(status_code=499)  # nginx's "client closed request", for the metrics

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors()
        )
        return answer(request, 422, "invalid_request", problems)

    @app.exception_handler(Exception)
    async def on_unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client gets the
        # envelope and the request id to quote, not a stack trace. This answer
        # is sent outside the middleware that adds X-Request-ID, so it adds it.
        rid = getattr(request.state, "request_id", None)
        return answer(
            request, 500, "internal_error", "unexpected server error; see the logs",
            {"X-Request-ID": rid} if rid else None,
        )  # fmt: skip
