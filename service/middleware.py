"""ASGI middleware: request ids and request metrics; body size and read-time limits.

Plain ASGI rather than BaseHTTPMiddleware: no extra task per request, and
the body limits act on the byte stream itself, chunked uploads included.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
import uuid
from typing import Any

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.keys import key_id, presented_key
from service.metrics import Metrics
from service.schemas import ErrorDetail, ErrorResponse

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
access_logger = logging.getLogger("service.access")
# Scrapes and probes: counted in inspection_requests_total (a failing probe
# shows there), kept out of the in-flight gauge (the HPA's metric; a scrape
# would read 1 at idle) and the latency histogram (the dashboard's latency).
UNOBSERVED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


async def _send_error(scope: Scope, send: Send, status: int, reason: str, message: str) -> None:
    rid = scope.get("state", {}).get("request_id")
    body = (
        ErrorResponse(error=ErrorDetail(reason=reason, message=message), request_id=rid)
        .model_dump_json()
        .encode()
    )
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"connection", b"close")],
        }
    )
    await send({"type": "http.response.body", "body": body})


class BodyLimits:
    """Refuse bodies over ``max_bytes`` and bodies that trickle in for over ``read_timeout_s``.

    A declared Content-Length over the limit is answered 413 at once, unread.
    Otherwise reading raises BodyTooLarge / BodyTimeout inside the route,
    which the app answers 413 / 408: a client sending one byte a second no
    longer holds the request forever.
    """

    def __init__(
        self, app: ASGIApp, max_bytes: int, read_timeout_s: float, metrics: Metrics
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                self.metrics.rejected.labels("payload_too_large").inc()
                await _send_error(
                    scope, send, 413, "payload_too_large", str(BodyTooLarge(self.max_bytes))
                )
                return
        deadline = time.monotonic() + self.read_timeout_s
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            remaining = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(remaining, 0.001))
            except TimeoutError:
                raise BodyTimeout(self.read_timeout_s) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class Observe:
    """Request id, in-flight gauge, request count and latency by route template
    (scrapes and probes are only counted: UNOBSERVED_PATHS), and with
    ``access_log`` one JSON line per request (logger ``service.access``):
    method, route, status, duration, model and version, request id, client
    address and ``key_id``, a short hash of the key presented (never the key)."""

    def __init__(
        self, app: ASGIApp, metrics: Metrics, labels: Any, access_log: bool = True
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.labels = labels  # () -> (model, version) of the model in service
        self.access_log = access_log

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), "")
        rid = given if _SAFE_ID.match(given) else uuid.uuid4().hex
        status = 500
        started = time.perf_counter()
        # Read by the routes as request.state.request_id / .started.
        scope.setdefault("state", {}).update(request_id=rid, started=started)
        token = logs.request_id.set(rid)

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        observed = scope["path"] not in UNOBSERVED_PATHS
        if observed:
            self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            if observed:
                self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model, version = self.labels()
            took = time.perf_counter() - started
            self.metrics.requests.labels(model, version, endpoint, str(status)).inc()
            if observed:
                self.metrics.request_duration.labels(model, version, endpoint).observe(took)
            if self.access_log:
                key = presented_key(Headers(scope=scope))
                client = scope.get("client")
                logs.log(
                    access_logger, logging.INFO, "request",
                    method=scope["method"], route=endpoint, status=status,
                    duration_ms=round(took * 1000, 1), model=model or None,
                    version=version or None, request_id=rid,
                    client=client[0] if client else None,
                    key_id=key_id(key) if key is not None else None,
                )  # fmt: skip
            logs.request_id.reset(token)
