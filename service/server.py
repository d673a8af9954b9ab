"""The app under uvicorn: protocol guard, drain on SIGTERM.

    build_server(settings).run()

``python -m service`` (service.__main__) runs this. uvicorn's HTTP protocol
gets the header deadline and the connection cap (service.connection_guard);
its Server gets a drain:

1. SIGTERM marks the app draining (service.drain): ``/readyz`` answers 503
   ``draining`` and answers carry ``Connection: close``, while the server
   goes on accepting and serving for ``drain_s`` seconds, the time a load
   balancer (Kubernetes endpoints, a probing balancer) takes to stop sending.
2. Then uvicorn's own graceful shutdown: the listener closes, idle
   connections close, requests in flight finish (up to
   ``graceful_shutdown_s``), and the lifespan's shutdown stops the batcher
   once its queue is done.
3. The process exits 0.

A second SIGTERM ends the drain early; SIGINT (Ctrl+C) skips it, as
``drain_s=0`` does: both behave as plain uvicorn does.
"""

from __future__ import annotations

import logging
import signal
import time
from types import FrameType

import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.auto import AutoHTTPProtocol

from service import logs
from service.connection_guard import guarded
from service.drain import Drain
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("service.server")


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, drain_s: float) -> None:
        super().__init__(config)
        self.drain = drain
        self.drain_s = drain_s
        self._drain_until: float | None = None
        self._drain_logged = False

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the main thread between bytecodes: only sets flags; on_tick acts.
        if sig != signal.SIGTERM or self.drain_s <= 0 or not self.started:
            super().handle_exit(sig, frame)
            return
        if self.should_exit:
            return  # shutting down already
        if self._drain_until is None:
            self.drain.begin()
            self._drain_until = time.monotonic() + self.drain_s
        else:
            self._drain_until = 0.0  # told twice: stop draining now
        # Not recorded in _captured_signals: uvicorn would raise SIGTERM again
        # after its shutdown, and a drained server exits 0 instead.

    async def on_tick(self, counter: int) -> bool:
        if self._drain_until is not None:
            if not self._drain_logged:
                self._drain_logged = True
                logs.log(logger, logging.INFO, "SIGTERM: draining; /readyz answers 503",
                         drain_s=self.drain_s, in_flight=len(self.server_state.tasks),
                         connections=len(self.server_state.connections))  # fmt: skip
            if time.monotonic() >= self._drain_until:
                if not self.should_exit:
                    logs.log(logger, logging.INFO, "drained; closing the listener",
                             in_flight=len(self.server_state.tasks))  # fmt: skip
                self.should_exit = True
        return await super().on_tick(counter)


def build_server(app: FastAPI, settings: Settings) -> DrainingServer:
    metrics: Metrics = app.state.metrics

    def on_answer(reason: str) -> None:
        metrics.rejected.labels(reason).inc()

    protocol = guarded(
        AutoHTTPProtocol, settings.header_timeout_s, settings.max_connections, on_answer
    )
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        http=protocol,
        ws="none",  # no WebSocket routes; upgrades are answered as plain HTTP
        lifespan="on",
        log_config=None,  # keep the JSON logging of service.logs
        timeout_keep_alive=int(settings.keep_alive_s),
        timeout_graceful_shutdown=int(settings.graceful_shutdown_s),
        access_log=False,  # service.middleware.Observe writes the access log
    )
    return DrainingServer(config, app.state.drain, settings.drain_s)
