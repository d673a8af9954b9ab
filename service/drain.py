"""Draining: the server has been told to stop and is letting its clients go.

On SIGTERM the server (service.server.DrainingServer) marks the app's
:class:`Drain` and keeps serving for ``INSPECTION_DRAIN_S``: ``/readyz``
answers 503 ``draining``, so a load balancer that probes stops sending, and
every answer says ``Connection: close``, so keep-alive clients reconnect,
to another replica once the balancer has taken this one out. Then the
listener closes and the requests in flight finish.
"""

from __future__ import annotations

import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send


class Drain:
    def __init__(self) -> None:
        self.since: float | None = None  # time.monotonic() when the drain began

    @property
    def draining(self) -> bool:
        return self.since is not None

    def begin(self) -> None:
        if self.since is None:
            self.since = time.monotonic()


class CloseWhileDraining:
    """Adds ``Connection: close`` to every answer while the app drains."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and self.drain.draining:
                headers = [(k, v) for k, v in message.get("headers", []) if k != b"connection"]
                message["headers"] = [*headers, (b"connection", b"close")]
            await send(message)

        await self.app(scope, receive, send_closing)
