"""ASGI middleware: request ids and request metrics; body size and read-time limits.

Plain ASGI rather than BaseHTTPMiddleware: no extra task per request, and
the body limits act on the byte stream itself, chunked uploads included.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service import logs
from service.metrics import Metrics

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class BodyTooLarge(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(f"the request body is over the limit of {limit} bytes")


class BodyTimeout(Exception):
    def __init__(self, seconds: float) -> None:
        super().__init__(f"the request body did not arrive within {seconds:g} s")


async def _send_error(scope: Scope, send: Send, status: int, reason: str, message: str) -> None:
    rid = scope.get("state", {}).get("request_id")
    body = json.dumps({"error": {"reason": reason, "message": message}, "request_id": rid}).encode()
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
    """Request id, in-flight gauge, request count and latency by route template."""

    def __init__(self, app: ASGIApp, metrics: Metrics, labels: Any) -> None:
        self.app = app
        self.metrics = metrics
        self.labels = labels  # () -> (model, version) of the model in service

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

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            self.metrics.in_flight.dec()
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
            model, version = self.labels()
            self.metrics.requests.labels(model, version, endpoint, str(status)).inc()
            self.metrics.request_duration.labels(model, version, endpoint).observe(
                time.perf_counter() - started
            )
            logs.request_id.reset(token)
