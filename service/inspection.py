"""One image through the server: decode in the pool, batch, decide, answer.

The event loop only moves bytes. Decoding and resizing (OpenCV, which releases
the GIL) run on a pool of ``INSPECTION_DECODE_THREADS`` threads, by default one
per core, and so does the heatmap's PNG encoding; inference runs on the
batcher's thread. The routes in :mod:`service.routes_inspect` call
:meth:`Inspector.score` and :meth:`Inspector.respond` and nothing else.

Every decode holds memory from one budget (``INSPECTION_DECODE_MEMORY_BYTES``,
:mod:`service.decode_budget`): the header is read and the decode planned in
the pool, the bytes the plan says are reserved on the event loop (waiting
there, not in a pool thread, when the budget is full), then the pool decodes
and the bytes are given back when the decoder is done.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from service.batcher import Batcher, InferenceFailed, QueueFull, Scored
from service.contract import ModelMetadata
from service.decision import DEFECT_FREE, Decision, decide
from service.decode_budget import (
    DecodeBudget,
    DecodeBusy,
    DecodeTooLarge,
    Reservation,
    default_decode_memory,
)
from service.errors import ApiError
from service.heatmap import overlay, to_png
from service.metrics import Metrics
from service.preprocessing import DecodePlan, PreparedImage, plan_prepare, prepare
from service.rejection import InputRejected
from service.schemas import (
    ImageResult,
    InputInfo,
    InspectResponse,
    ModelRef,
    TileResult,
    Timings,
)


def default_decode_threads() -> int:
    """One decoding thread per core this process may use."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Inspected:
    prepared: PreparedImage
    scored: Scored
    decision: Decision
    decode_s: float


class Inspector:
    def __init__(
        self,
        batcher: Batcher,
        metrics: Metrics,
        max_pixels: int,
        threads: int,
        decode_memory_bytes: int | None = None,
        decode_wait_s: float = 2.0,
    ) -> None:
        self.batcher = batcher
        self.metrics = metrics
        self.max_pixels = max_pixels
        self.threads = threads
        self._pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="decode")
        self.decode_budget = DecodeBudget(
            decode_memory_bytes or default_decode_memory(max_pixels), decode_wait_s
        )

    def close(self) -> None:
        self._pool.shutdown(wait=True)

    async def score(self, data: bytes) -> Inspected:
        """Decode (in the pool), queue for the next batch, decide.

        Refusals and inference failures come out as ApiError.
        """
        loop = asyncio.get_running_loop()
        meta = self.batcher.runtime.current.metadata
        try:
            t0 = time.perf_counter()
            plan = await loop.run_in_executor(
                self._pool, plan_prepare, data, meta.input, meta.grid, self.max_pixels
            )
            planned_s = time.perf_counter() - t0
            reservation = await self.decode_budget.acquire(plan.peak_bytes)
            with self.batcher.expecting():
                t1 = time.perf_counter()
                prepared = await self._prepare(data, meta, plan, reservation)
                decode_s = planned_s + time.perf_counter() - t1  # the wait not counted
                future = self.batcher.enqueue(prepared.tensor)
            scored = await future
        except InputRejected as exc:
            raise ApiError(400, exc.reason.value, exc.message) from exc
        except DecodeTooLarge as exc:
            raise ApiError(413, "decode_too_large", str(exc)) from exc
        except DecodeBusy as exc:
            raise ApiError(503, "decode_busy", str(exc), {"Retry-After": "1"}) from exc
        except QueueFull as exc:
            raise ApiError(503, "queue_full", str(exc), {"Retry-After": "1"}) from exc
        except InferenceFailed as exc:
            message = f"the model failed on this batch: {exc}"
            raise ApiError(500, "inference_failed", message) from exc
        used = scored.artifact.metadata  # the model that ran, even if a reload came between
        d = decide(scored.image_error, scored.tile_errors, used.thresholds)
        return Inspected(prepared, scored, d, decode_s)

    async def _prepare(
        self, data: bytes, meta: ModelMetadata, plan: DecodePlan, reservation: Reservation
    ) -> PreparedImage:
        """Decode in the pool; the reserved bytes go back when the decoder is
        done, also when the request is cancelled while it runs."""
        loop = asyncio.get_running_loop()
        done = self._pool.submit(prepare, data, meta.input, meta.grid, self.max_pixels, plan)

        def give_back(_: Future[PreparedImage]) -> None:  # in a pool thread, or here
            with contextlib.suppress(RuntimeError):  # the loop closed at shutdown
                loop.call_soon_threadsafe(reservation.release)

        done.add_done_callback(give_back)
        return await asyncio.wrap_future(done)

    async def heatmap_png(self, item: Inspected) -> bytes:
        """The overlay as PNG, encoded in the pool."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _overlay_png, item)

    def respond(
        self, item: Inspected, request_id: str, started: float, heatmap_png: bytes | None = None
    ) -> InspectResponse:
        """The answer for one image; counts its verdict and scores."""
        prepared, scored, d = item.prepared, item.scored, item.decision
        meta = scored.artifact.metadata
        labels = (meta.name, str(meta.version))
        metrics = self.metrics
        metrics.decode_duration.labels(*labels).observe(item.decode_s)
        metrics.verdicts.labels(*labels, d.verdict).inc()
        seen = InputInfo.judge(prepared.codec, meta.calibration.codec)
        if not seen.matches_calibration:
            metrics.codec_mismatch.labels(*labels, seen.format).inc()
        metrics.image_score.labels(*labels).observe(d.image_score)
        for k, s in enumerate(d.tile_scores, start=1):
            metrics.tile_score.labels(*labels, str(k)).observe(s)
        if d.verdict == DEFECT_FREE:
            metrics.observe_good(*labels, d.score)
        total_ms = (time.perf_counter() - started) * 1000
        return InspectResponse(
            request_id=request_id,
            model=ModelRef(name=meta.name, version=meta.version, family=meta.family),
            verdict=d.verdict,
            image=ImageResult(
                error=d.image_error, threshold=meta.thresholds.eps0, score=d.image_score
            ),
            tiles=[
                TileResult(tile=k, error=e, threshold=t, score=s, defective=k in d.defective_tiles)
                for k, (e, t, s) in enumerate(
                    zip(d.tile_errors, meta.thresholds.tiles, d.tile_scores, strict=True), start=1
                )
            ],
            defective_tiles=list(d.defective_tiles),
            batch_size=scored.batch_size,
            timings_ms=Timings(
                decode=round(item.decode_s * 1000, 3),
                queue=round(scored.queue_s * 1000, 3),
                inference=round(scored.inference_s * 1000, 3),
                total=round(total_ms, 3),
            ),
            input=seen,
            heatmap_png_base64=base64.b64encode(heatmap_png).decode() if heatmap_png else None,
        )


def _overlay_png(item: Inspected) -> bytes:
    meta = item.scored.artifact.metadata
    img: np.ndarray = overlay(
        item.prepared.rgb, item.scored.anomaly_map, meta.thresholds.eps0,
        item.decision.defective_tiles, meta.grid.rows, meta.grid.cols,
    )  # fmt: skip
    return to_png(img)
