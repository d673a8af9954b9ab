"""Dynamic batching: requests from concurrent clients run as one onnxruntime call.

Like Triton's dynamic batcher, a batch closes when it holds the largest
planned batch size (by default 8 on a GPU provider, 1 on the CPU: see
:mod:`service.batch_shapes`) or when its first image has waited
``max_queue_delay``. Unlike a fixed delay, the batcher waits only while more
images are on their way (requests still decoding): a lone client never pays
the delay. A batch is padded up to the next planned size and runs on that
size's session, so on a GPU no session ever sees a new shape.

The queue is bounded: a full queue raises :class:`QueueFull` at once (the API
answers 503 with Retry-After) instead of growing without bound. Inference runs
on ``streams`` worker threads (one by default), so the event loop never
blocks on it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from service.artifact import LoadedArtifact
from service.contract import INPUT_NAME, OUTPUT_NAMES
from service.logs import log
from service.metrics import Metrics
from service.runtime import ModelRuntime

logger = logging.getLogger("service.batcher")


class QueueFull(Exception):
    """No room for another image; try again shortly."""


class InferenceFailed(Exception):
    """onnxruntime raised while running a batch."""


@dataclass(frozen=True)
class Scored:
    image_error: float
    tile_errors: np.ndarray  # (K,)
    anomaly_map: np.ndarray  # (H, W)
    artifact: LoadedArtifact
    queue_s: float
    inference_s: float
    batch_size: int  # images of the batch (before padding)


@dataclass
class _Job:
    tensor: np.ndarray
    future: asyncio.Future[Scored]
    enqueued: float = field(default_factory=time.perf_counter)


class Batcher:
    def __init__(
        self,
        runtime: ModelRuntime,
        metrics: Metrics,
        max_queue_delay_s: float,
        max_queue: int,
        streams: int = 1,
    ) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.max_queue_delay_s = max_queue_delay_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=max_queue)
        self.expected = 0  # requests decoding now, whose images will arrive shortly
        self.streams = streams
        self._executor = ThreadPoolExecutor(max_workers=streams, thread_name_prefix="inference")
        self._tasks: list[asyncio.Task[None]] = []
        self._running = 0  # batches in onnxruntime now

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._tasks = [
            loop.create_task(self._run(), name=f"batcher-{i}") for i in range(self.streams)
        ]

    async def stop(self) -> None:
        """Finish what is queued and running, then stop."""
        while not self.queue.empty() or self._running:
            await asyncio.sleep(0.005)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._executor.shutdown(wait=True)

    def _labels(self) -> tuple[str, str]:
        meta = self.runtime.current.metadata
        return meta.name, str(meta.version)

    @contextlib.contextmanager
    def expecting(self) -> Iterator[None]:
        """Around a request's decoding: a batch being collected waits for its image."""
        self.expected += 1
        try:
            yield
        finally:
            self.expected -= 1

    def enqueue(self, tensor: np.ndarray) -> asyncio.Future[Scored]:
        """Queue one image; the future resolves when its batch has run."""
        future: asyncio.Future[Scored] = asyncio.get_running_loop().create_future()
        try:
            self.queue.put_nowait(_Job(tensor, future))
        except asyncio.QueueFull:
            raise QueueFull(f"{self.queue.maxsize} images already waiting") from None
        self.metrics.queue_depth.labels(*self._labels()).set(self.queue.qsize())
        return future

    async def _collect(self) -> list[_Job]:
        batch = [await self.queue.get()]
        deadline = batch[0].enqueued + self.max_queue_delay_s
        limit = self.runtime.served.plan.largest
        while len(batch) < limit:
            try:
                batch.append(self.queue.get_nowait())
                continue
            except asyncio.QueueEmpty:
                pass
            remaining = deadline - time.perf_counter()
            if self.expected <= 0 or remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), remaining))
            except TimeoutError:
                break
        return batch

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [j for j in await self._collect() if not j.future.cancelled()]
            if not batch:
                continue
            served = self.runtime.served  # one model per batch, even during a reload
            art = served.artifact
            labels = (art.metadata.name, str(art.metadata.version))
            self.metrics.queue_depth.labels(*labels).set(self.queue.qsize())
            started = time.perf_counter()
            self._running += 1
            try:
                # Inside the try: images prepared for a model that a reload
                # has since replaced may not stack; they fail, the loop lives.
                size = served.plan.size_for(len(batch))
                tensors = [j.tensor for j in batch]
                # Padding repeats the last image: a real input, so no
                # normalisation meets values it never saw; its outputs are dropped.
                x = np.stack(tensors + tensors[-1:] * (size - len(batch)))
                outs = await loop.run_in_executor(
                    self._executor,
                    served.session_for(size).run,
                    list(OUTPUT_NAMES),
                    {INPUT_NAME: x},
                )
            except Exception as exc:  # onnxruntime's exception types are not public
                log(logger, logging.ERROR, "inference failed", batch=len(batch), error=str(exc))
                for j in batch:
                    if not j.future.done():
                        j.future.set_exception(InferenceFailed(str(exc)))
                continue
            finally:
                self._running -= 1
            took = time.perf_counter() - started
            self.metrics.batch_size.labels(*labels).observe(len(batch))
            self.metrics.padded_images.labels(*labels).inc(size - len(batch))
            image_error, tile_errors, anomaly_map = outs
            for i, j in enumerate(batch):
                if j.future.done():  # the client went away
                    continue
                queue_s = started - j.enqueued
                self.metrics.queue_duration.labels(*labels).observe(queue_s)
                self.metrics.inference_duration.labels(*labels).observe(took)
                j.future.set_result(
                    Scored(
                        image_error=float(image_error[i]),
                        tile_errors=np.asarray(tile_errors[i]),
                        anomaly_map=np.asarray(anomaly_map[i]),
                        artifact=art,
                        queue_s=queue_s,
                        inference_s=took,
                        batch_size=len(batch),
                    )
                )
