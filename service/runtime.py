"""The model being served, and swapping it for a newer one without a gap.

Requests read ``runtime.current`` once per batch, so a reload that replaces
it mid-stream is atomic: every batch runs wholly on the old model or wholly on
the new, and the new one is only put in place after it loaded, passed the
artifact checks and ran a warm-up inference.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from service.artifact import (
    ArtifactError,
    LoadedArtifact,
    load_artifact,
    open_session,
    resolve_version_dir,
)
from service.batch_shapes import ShapePlan, shape_plan
from service.contract import INPUT_NAME, MODEL_FILE, OUTPUT_NAMES
from service.logs import log
from service.metrics import Metrics
from service.settings import Settings

logger = logging.getLogger("service.runtime")


# Runs per batch size before a model is ready: the first allocates and picks
# the convolution algorithms; the others prove the shape stays cheap.
WARM_UP_RUNS = 3


@dataclass(frozen=True)
class Served:
    """A loaded model version with a session for every batch size it runs."""

    artifact: LoadedArtifact
    plan: ShapePlan
    sessions: dict[int, Any]  # batch size -> onnxruntime session

    def session_for(self, size: int) -> Any:
        return self.sessions[size]


def warm_up(served: Served, runs: int = WARM_UP_RUNS) -> None:
    """Every planned batch size, ``runs`` times on its own session, before the
    model is put in service: proves the graph runs, and no request pays a
    first run or a shape change (service/batch_shapes.py)."""
    art = served.artifact
    meta = art.metadata
    for size in served.plan.sizes:
        x = np.zeros((size, 3, meta.input.height, meta.input.width), np.float32)
        for _ in range(runs):
            try:
                outs = served.session_for(size).run(list(OUTPUT_NAMES), {INPUT_NAME: x})
            except Exception as exc:  # onnxruntime's own exception types are not public
                raise ArtifactError(
                    art.path, f"warm-up inference at batch size {size} failed: {exc}"
                ) from exc
            if not all(np.isfinite(o).all() for o in outs):
                raise ArtifactError(art.path, "warm-up inference gave NaN or infinite errors")


def open_model(settings: Settings, model_dir: Path | None = None) -> Served:
    """Load, verify, open a session per batch size where the plan says so, warm up."""
    art = load_artifact(
        model_dir or settings.model_dir,
        settings.providers,
        settings.intra_op_threads,
        settings.intra_op_spinning,
        verifier=settings.artifact_verifier(),
    )
    plan = shape_plan(
        art.provider, settings.max_batch_size, settings.batch_sizes, settings.session_per_size
    )
    batch_dim = art.session.get_inputs()[0].shape[0]  # "N" in exported graphs
    sessions: dict[int, Any] = {}
    for size in plan.sizes:
        if plan.session_per_size and isinstance(batch_dim, str):
            sessions[size] = open_session(
                art.path / MODEL_FILE,
                settings.providers,
                settings.intra_op_threads,
                settings.intra_op_spinning,
                fixed_dims={batch_dim: size},
            )
        else:
            sessions[size] = art.session
    served = Served(art, plan, sessions)
    # A shared CPU session has no shape to settle: one run per size proves it.
    runs = WARM_UP_RUNS if plan.session_per_size else 1
    warm_up(served, runs)
    log(logger, logging.INFO, "model warmed up", version=art.metadata.version,
        batch_sizes=list(plan.sizes), session_per_size=plan.session_per_size,
        runs_per_size=runs)  # fmt: skip
    return served


class ModelRuntime:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self._served: Served | None = None
        self._reload_lock = asyncio.Lock()
        self._failed: Path | None = None  # the newest version, where it failed to load

    @property
    def ready(self) -> bool:
        return self._served is not None

    @property
    def served(self) -> Served:
        """The model in service with its sessions; read once per batch."""
        if self._served is None:
            raise RuntimeError("no model loaded yet")
        return self._served

    @property
    def current(self) -> LoadedArtifact:
        return self.served.artifact

    def _install(self, served: Served) -> None:
        art = served.artifact
        old = self._served.artifact if self._served is not None else None
        meta = art.metadata
        if old is not None:
            om = old.metadata
            self.metrics.model_info.remove(
                om.name, str(om.version), om.family, om.onnx_sha256, old.provider
            )
        self.metrics.model_info.labels(
            meta.name, str(meta.version), meta.family, meta.onnx_sha256, art.provider
        ).set(1)
        self.metrics.provider_in_use(
            meta.name, str(meta.version), self.settings.providers, art.provider
        )
        self.metrics.model_installed(
            meta.name,
            str(meta.version),
            meta.calibration.reference_score,
            (old.metadata.name, str(old.metadata.version)) if old is not None else None,
        )
        self._served = served
        log(
            logger, logging.INFO, "model in service",
            model=meta.name, version=meta.version, family=meta.family,
            provider=art.provider, path=str(art.path), sha256=meta.onnx_sha256,
        )  # fmt: skip

    def load(self) -> LoadedArtifact:
        served = open_model(self.settings)
        self._install(served)
        return served.artifact

    async def reload(self) -> LoadedArtifact:
        """Load the newest version, verify and warm it up, then swap it in.

        On failure the model in service stays, the failure is counted, and
        the ArtifactError goes to the caller.
        """
        async with self._reload_lock:
            try:
                served = await asyncio.to_thread(open_model, self.settings)
            except ArtifactError as exc:
                self.metrics.reloads.labels("failure").inc()
                log(logger, logging.ERROR, "reload failed; previous model keeps serving",
                    error=str(exc))  # fmt: skip
                raise
            self._install(served)
            self.metrics.reloads.labels("success").inc()
            return served.artifact

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
            if self._served is None or newest in (self.current.path, self._failed):
                continue
            try:
                await self.reload()
                self._failed = None
            except ArtifactError:
                self._failed = newest  # counted and logged in reload
