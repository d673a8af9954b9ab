"""A deadline for request headers and a cap on open connections, in uvicorn's protocol.

uvicorn arms no timer while a request's headers arrive: its keep-alive timeout
runs only between requests and the first byte of the next one cancels it, so
a client sending its headers a byte a second holds a connection (a file
descriptor, a slot) for as long as it likes. :func:`guarded` subclasses
uvicorn's HTTP protocol (httptools, or h11 where httptools is missing) with
two rules:

* A connection waits for a request's headers from when it opens and again
  from the end of each answer. If they are not all in within
  ``header_timeout_s``, it is closed: answered 408 ``header_timeout`` first
  when part of a request came, closed silently when nothing did (as uvicorn
  closes an idle keep-alive connection).
* At most ``max_connections`` are open. One more closes the connection that
  has waited longest for its headers (idle, or a slow client), so slow
  clients cannot lock others out for long; when every open connection is busy
  with a request, the new one is answered 503 ``too_many_connections`` and
  closed.

Once the headers are in, the body is the app's business (``read_timeout_s``
in service.middleware.BodyLimits).
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from collections.abc import Callable, Collection
from typing import Any

from service import logs
from service.errors import envelope

logger = logging.getLogger("service.connections")


def answer(status: int, reason: str, message: str) -> bytes:
    """A whole HTTP/1.1 response in the error envelope, with Connection: close."""
    body = json.dumps(envelope(reason, message, None)).encode()
    head = [
        f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}",
        "content-type: application/json",
        f"content-length: {len(body)}",
        "connection: close",
    ]
    if status == 503:
        head.append("retry-after: 1")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


def guarded(
    base: type[asyncio.Protocol],
    header_timeout_s: float,
    max_connections: int,
    on_answer: Callable[[str], None] | None = None,
) -> type[asyncio.Protocol]:
    """``base`` (a uvicorn HTTP protocol class) with the header deadline
    (0: none) and the connection cap (0: none); ``on_answer(reason)`` is
    called for each 408/503 written."""
    # Connections waiting for a request's headers, the longest-waiting first.
    waiting: dict[Any, None] = {}
    late = f"the request headers did not arrive within {header_timeout_s:g} s"
    full = f"the server holds its maximum of {max_connections} connections"

    def make_room(connections: Collection[Any]) -> bool:
        """Below the cap, or made so by closing the longest-waiting connection."""
        if sum(1 for c in connections if not c.transport.is_closing()) < max_connections:
            return True  # the rest are closing already
        victim = next(iter(waiting), None)
        if victim is None:
            return False
        victim.cut(503, "too_many_connections", full)
        return True

    class Guarded(base):  # type: ignore[valid-type, misc]
        _timer: asyncio.TimerHandle | None = None
        _partial = False  # part of the awaited request has come
        _refused = False

        def connection_made(self, transport: asyncio.Transport) -> None:
            if (
                max_connections
                and len(self.connections) >= max_connections
                and not make_room(self.connections)
            ):
                self._refused = True
                transport.write(answer(503, "too_many_connections", full))
                transport.close()
                if on_answer is not None:
                    on_answer("too_many_connections")
                logs.log(logger, logging.WARNING, "connection refused",
                         reason="too_many_connections",
                         client=_host(transport.get_extra_info("peername")))  # fmt: skip
                return
            super().connection_made(transport)
            self._sync()

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            if self in waiting:
                self._partial = True
            super().data_received(data)
            self._sync()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._sync()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._refused:
                return
            self._unwait()
            super().connection_lost(exc)

        def _sync(self) -> None:
            """Start the clock when the connection waits for headers, stop it when not."""
            awaits = (
                self in self.connections  # not handed to another protocol
                and not self.transport.is_closing()
                and (self.cycle is None or self.cycle.response_complete)
                and not getattr(self, "pipeline", None)  # httptools: a request queued
            )
            if awaits and self not in waiting:
                waiting[self] = None
                self._partial = False
                if header_timeout_s > 0:
                    self._timer = self.loop.call_later(header_timeout_s, self._expired)
            elif not awaits and self in waiting:
                self._unwait()

        def _unwait(self) -> None:
            waiting.pop(self, None)
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None

        def _expired(self) -> None:
            self._timer = None
            if self in waiting:
                self.cut(408, "header_timeout", late)

        def cut(self, status: int, reason: str, message: str) -> None:
            """Close a connection waiting for headers; answer ``status`` if a
            request had begun."""
            partial = self._partial
            self._unwait()
            if self.transport.is_closing():
                return
            if partial:
                self.transport.write(answer(status, reason, message))
                if on_answer is not None:
                    on_answer(reason)
            logs.log(logger, logging.INFO, "connection closed", reason=reason,
                     client=_host(self.client), partial_request=partial)  # fmt: skip
            self.transport.close()

    Guarded.__name__ = Guarded.__qualname__ = f"Guarded{base.__name__}"
    return Guarded


def _host(addr: Any) -> str | None:
    return str(addr[0]) if isinstance(addr, tuple) and addr else None
