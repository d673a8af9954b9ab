"""The app factory: settings in, a FastAPI app with its model, batcher and routes out.

    create_app(Settings(model_dir=..., api_keys=...))

The routes live per resource (service.routes_inspect, service.routes_models,
service.routes_ops; the schema and /docs in service.routes_docs), their
dependencies in service.deps, the error envelope in service.errors, the
OpenAPI schema's additions in service.openapi. The lifespan loads and warms the model before /readyz
says ready, reloads it on SIGHUP, and drains on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI

from service import logs
from service.batcher import Batcher
from service.drain import CloseWhileDraining, Drain
from service.errors import install_handlers
from service.inspection import Inspector, default_decode_threads
from service.metrics import Metrics
from service.middleware import BodyLimits, Observe
from service.openapi import install as install_openapi
from service.routes_docs import router as docs_routes
from service.routes_inspect import router as inspect_routes
from service.routes_models import admin as admin_routes
from service.routes_models import router as model_routes
from service.routes_ops import router as ops_routes
from service.runtime import ModelRuntime
from service.settings import Settings, get_settings

logger = logging.getLogger("service.app")


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or get_settings()
    metrics = Metrics(settings.near_threshold)
    runtime = ModelRuntime(settings, metrics)
    batcher = Batcher(
        runtime,
        metrics,
        settings.max_queue_delay_ms / 1000,
        settings.max_queue,
        settings.inference_streams,
    )
    inspector = Inspector(
        batcher,
        metrics,
        settings.max_pixels,
        settings.decode_threads or default_decode_threads(),
        settings.decode_memory_bytes,
        settings.decode_wait_s,
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
        inspector.close()

    app = FastAPI(
        title="Inline inspection service",
        version="1",
        summary="Is the part defective, where, and how sure: anomaly models on onnxruntime.",
        lifespan=lifespan,
        # service.routes_docs serves the schema and /docs from the package
        # (no CDN); ReDoc is off.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.runtime = runtime
    app.state.batcher = batcher
    app.state.inspector = inspector
    app.state.drain = Drain()  # begun by service.server on SIGTERM
    for router in (ops_routes, docs_routes, inspect_routes, model_routes, admin_routes):
        app.include_router(router)
    install_openapi(app, settings)
    install_handlers(app, metrics)

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
    app.add_middleware(CloseWhileDraining, drain=app.state.drain)
    app.add_middleware(Observe, metrics=metrics, labels=labels, access_log=settings.access_log)
    logs.log(logger, logging.INFO, "app created", model_dir=str(settings.model_dir))
    return app
