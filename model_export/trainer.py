"""The one training loop of every family: seeding, device, epochs, progress,
per-epoch records, checkpoint and resume.

A family brings its fitting (:class:`Fitting`, e.g. model_export.pwae.fit and
model_export.ot_prototypes.fit): the model, a pass done once before the
epochs (a frozen encoder's features), one epoch, the state besides the
model's weights that a resumed run needs (an optimizer's, random
generators'), and a pass done once after the epochs (P-WAE's error
statistics, OT's score scales). :func:`train` does the rest, the same way
for every family:

* seeding: ``torch.manual_seed(config.seed)`` before the model is built, so
  a seed gives the same initial weights on any device; every later draw comes
  from the family's own seeded CPU generators (model_export/device.py);
* device: the model is built on the CPU and trained on ``device``;
* progress: ``progress`` is told every image of every pass, the epochs a
  resumed run skips at once, so a bar of the family's ``progress_total``
  ends at 100%;
* records: ``on_epoch`` gets the one-off pass's record (``stage``
  "features", ``epoch`` 0) and each epoch's (images, seconds, images/s, and
  ``loss`` where the family has one); ``on_stage`` hears of the after-pass;
* checkpoint and resume: with ``checkpoint``, the state is written after
  every epoch (aside, then renamed: a run killed mid-save leaves the previous
  epoch's state whole) and a run that finds one resumes from it, giving the
  same model as an uninterrupted run. The state keeps the seconds the
  training took up to its epoch over every run that got it there; the log's
  ``seconds_before`` is what earlier runs spent (0 for a fresh start).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, TypedDict, Unpack

import torch
from torch import nn

from model_export.device import throughput

Progress = Callable[[int], object] | None


class Config(Protocol):
    @property
    def seed(self) -> int: ...
    @property
    def epochs(self) -> int: ...
    def to_dict(self) -> dict[str, Any]: ...


class Fitting(Protocol):
    """One family's fitting, driven by :func:`train`."""

    @property
    def model(self) -> nn.Module:
        """The model being fitted, on the training device."""

    def prepare(self, progress: Progress) -> int | None:
        """The pass before the epochs; the images it saw, or None where there is none."""

    def images_per_epoch(self) -> int:
        """The images one epoch reports to ``progress``."""

    def epoch(self, epoch: int, progress: Progress) -> dict[str, float]:
        """Epoch ``epoch`` (0-based); its figures for the history (``total``: the loss)."""

    def state(self) -> dict[str, Any]:
        """What a resumed run needs besides the model's state dict."""

    def load_state(self, state: dict[str, Any]) -> None: ...

    def finish(self, progress: Progress, on_stage: Callable[[str], object] | None) -> None:
        """The pass after the epochs; leaves the model in eval mode."""

    def log(self) -> dict[str, Any]:
        """The family's own figures for the training log, besides the history."""


class Options(TypedDict, total=False):
    """What a caller may tell :func:`train` (and each family's ``fit``, which
    passes them on) besides the config and the images."""

    progress: Progress
    checkpoint: Path | None
    stop_after_epoch: int | None
    device: torch.device | str
    on_epoch: Callable[[dict[str, Any]], object] | None
    on_stage: Callable[[str], object] | None
    started: float | None


def train(
    start: Callable[[Any, Sequence[torch.Tensor], torch.device], Fitting],
    config: Config,
    images: Sequence[torch.Tensor],
    **options: Unpack[Options],
) -> tuple[nn.Module, dict[str, Any]]:
    """Fit ``start(config, images, device)`` (see the module doc); the model,
    on ``device``, and the log: ``history`` (a record per epoch),
    ``seconds_before`` and the family's own figures.

    ``started`` is when the training began (time.perf_counter(); default:
    now), which the checkpoint's seconds count from. ``stop_after_epoch``
    ends the epochs early, as a killed run (for tests). ``device`` defaults
    to the CPU; the others to none.
    """
    progress = options.get("progress")
    checkpoint = options.get("checkpoint")
    stop_after_epoch = options.get("stop_after_epoch")
    on_epoch = options.get("on_epoch")
    on_stage = options.get("on_stage")
    started = options.get("started")
    started = time.perf_counter() if started is None else started
    device = torch.device(options.get("device", "cpu"))
    torch.manual_seed(config.seed)
    fitting = start(config, images, device)
    t = time.perf_counter()
    seen = fitting.prepare(progress)
    if seen is not None and on_epoch is not None:
        on_epoch(throughput(device, t, seen, stage="features", epoch=0, epochs=0))
    history: list[dict[str, Any]] = []
    start_epoch = 0
    seconds_before = 0.0
    if checkpoint is not None and checkpoint.is_file():
        # Loaded on the CPU, whatever device wrote it: the weights and any
        # optimizer state are copied onto the model's device, generators stay.
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["config"] != config.to_dict():
            raise ValueError(
                f"{checkpoint} was written with another config; delete it to start afresh"
            )
        fitting.model.load_state_dict(state["model"])
        fitting.load_state(state)
        history = state["history"]
        start_epoch = state["epoch"]
        # States from before the seconds were kept: their epochs' own seconds.
        seconds_before = float(state.get("seconds", sum(h.get("seconds", 0.0) for h in history)))
        if progress is not None and start_epoch:  # the epochs done before, at once
            progress(start_epoch * fitting.images_per_epoch())
    for epoch in range(start_epoch, config.epochs):
        t = time.perf_counter()
        figures = fitting.epoch(epoch, progress)
        record = throughput(
            device, t, fitting.images_per_epoch(), epoch=epoch + 1, epochs=config.epochs
        )
        history.append({"epoch": epoch + 1, **figures, **record})
        if on_epoch is not None:
            loss = {"loss": figures["total"]} if "total" in figures else {}
            on_epoch({**record, **loss})
        if checkpoint is not None:
            partial = checkpoint.with_suffix(".partial")
            torch.save(
                {
                    "model": fitting.model.state_dict(),
                    **fitting.state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "seconds": seconds_before + time.perf_counter() - started,
                },
                partial,
            )
            os.replace(partial, checkpoint)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    fitting.finish(progress, on_stage)
    return fitting.model, {"history": history, "seconds_before": seconds_before, **fitting.log()}
