"""The model being served, and swapping it for a newer one without a gap.

Requests read ``runtime.current`` once per batch, so a reload that replaces
it mid-stream is atomic: every batch runs wholly on the old model or wholly on
the new, and the new one is only put in place after it loaded, passed the
artifact checks and ran a warm-up inference.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import numpy as np

from service.artifact import ArtifactError, LoadedArtifact, load_artifact, resolve_version_dir
from service.contract import INPUT_NAME, OUTPUT_NAMES
from service.logs import log
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("service.runtime")


def warm_up(art: LoadedArtifact) -> None:
    """One inference on a blank batch of two: proves the graph runs and fills caches."""
    meta = art.metadata
    x = np.zeros((2, 3, meta.input.height, meta.input.width), np.float32)
    try:
        outs = art.session.run(list(OUTPUT_NAMES), {INPUT_NAME: x})
    except Exception as exc:  # onnxruntime's own exception types are not public
        raise ArtifactError(art.path, f"warm-up inference failed: {exc}") from exc
    if not all(np.isfinite(o).all() for o in outs):
        raise ArtifactError(art.path, "warm-up inference gave NaN or infinite errors")


def open_model(settings: Settings, model_dir: Path | None = None) -> LoadedArtifact:
    art = load_artifact(
        model_dir or settings.model_dir,
        settings.providers,
        settings.intra_op_threads,
        settings.intra_op_spinning,
    )
    warm_up(art)
    return art


class ModelRuntime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._current: LoadedArtifact | None = None
        self._reload_lock = asyncio.Lock()
        self._failed: Path | None = None  # the newest version, where it failed to load

    @property
    def ready(self) -> bool:
        return self._current is not None

    @property
    def current(self) -> LoadedArtifact:
        if self._current is None:
            raise RuntimeError("no model loaded yet")
        return self._current

    def _install(self, art: LoadedArtifact) -> None:
        old = self._current
        meta = art.metadata
        if old is not None:
            om = old.metadata
            self.metrics.model_info.remove(
                om.name, str(om.version), om.family, om.onnx_sha256, old.provider
            )
        self.metrics.model_info.labels(
            meta.name, str(meta.version), meta.family, meta.onnx_sha256, art.provider
        ).set(1)
        self.metrics.model_installed(
            meta.name,
            str(meta.version),
            meta.calibration.reference_score,
            (old.metadata.name, str(old.metadata.version)) if old is not None else None,
        )
        self._current = art
        log(
            logger, logging.INFO, "model in service",
            model=meta.name, version=meta.version, family=meta.family,
            provider=art.provider, path=str(art.path), sha256=meta.onnx_sha256,
        )  # fmt: skip

    def load(self) -> LoadedArtifact:
        art = open_model(self.settings)
        self._install(art)
        return art

    async def reload(self) -> LoadedArtifact:
        """Load the newest version, verify and warm it up, then swap it in.

        On failure the model in service stays, the failure is counted, and
        the ArtifactError goes to the caller.
        """
        async with self._reload_lock:
            try:
                art = await asyncio.to_thread(open_model, self.settings)
            except ArtifactError as exc:
                self.metrics.reloads.labels("failure").inc()
                log(logger, logging.ERROR, "reload failed; previous model keeps serving",
                    error=str(exc))  # fmt: skip
                raise
            self._install(art)
            self.metrics.reloads.labels("success").inc()
            return art

    async def watch(self, interval_s: float) -> None:
        """Reload whenever the newest version under the model directory is not
        the one in service: a version written by ``service.recalibrate`` (or a
        trainer) is picked up without a signal, on every replica that shares
        the directory, and removing it rolls back the same way.

        A version that fails to load is tried again only once the directory's
        newest version changes, so a broken one is reported once, not every poll.
        """
        while True:
            await asyncio.sleep(interval_s)
            try:
                newest = await asyncio.to_thread(resolve_version_dir, self.settings.model_dir)
            except ArtifactError as exc:
                log(logger, logging.WARNING, "model directory unreadable", error=str(exc))
                continue
            if self._current is None or newest in (self._current.path, self._failed):
                continue
            try:
                await self.reload()
                self._failed = None
            except ArtifactError:
                self._failed = newest  # counted and logged in reload
