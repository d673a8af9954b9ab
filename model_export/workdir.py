"""What ``train`` does in a work directory that is not empty, decided before any work.

* ``checkpoint.pt`` of the same training (family, settings, images, split,
  codec, colour): it is reused, and the trainer says so; nothing is trained
  and the training time it recorded stays the true one.
* ``train_state.pt`` of the same training, left by an interrupted run of
  either family (the shared trainer, model_export/trainer.py, writes it):
  training resumes at its epoch, and the trainer says so; the training time
  recorded is that of the earlier runs plus this one.
* anything of another training: the trainer stops and says what differs;
  ``--force`` deletes what the trainer wrote there and trains afresh.

``training.json``, written before training starts, says what is being
trained, so an interrupted run's state is only resumed for the same images.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from model_export.data import checkpoint_good_root

CHECKPOINT = "checkpoint.pt"
TRAIN_STATE = "train_state.pt"
TRAINING = "training.json"
# Everything the trainer's stages write under --work: what --force deletes.
OUTPUTS = (
    CHECKPOINT, TRAIN_STATE, TRAINING, "train_state.partial", "calibration.json",
    "evaluation.json", "per_image.json", "summary.md", "roc.png", "scores.png", "heatmaps.png",
)  # fmt: skip
# The fields that say which training a checkpoint is.
IDENTITY = (
    "family", "config", "good", "fit", "holdout", "holdout_fraction", "split_seed",
    "augment_codec", "input",
)  # fmt: skip


class WorkDirConflict(ValueError):
    """The work directory holds another training; the message says what differs."""


@dataclass(frozen=True)
class TrainPlan:
    action: Literal["train", "resume", "reuse"]
    message: str | None = None  # what the trainer says about it, where it is not a fresh start
    resume_epoch: int = 0


def identity(
    family: str,
    config: dict[str, Any],
    good: Path,
    fit: list[Path],
    holdout: list[Path],
    holdout_fraction: float,
    split_seed: int,
    augment_codec: str | None,
    input_spec: dict[str, Any],
) -> dict[str, Any]:
    """What a training is, as a checkpoint records it (names relative to ``good``)."""
    return {
        "family": family,
        "config": config,
        "good": str(good.resolve()),
        "fit": [p.relative_to(good).as_posix() for p in fit],
        "holdout": [p.relative_to(good).as_posix() for p in holdout],
        "holdout_fraction": holdout_fraction,
        "split_seed": split_seed,
        "augment_codec": augment_codec,
        "input": input_spec,
    }


def recorded_identity(ckpt: dict[str, Any]) -> dict[str, Any]:
    """The identity fields of a checkpoint (older ones: the good folder derived)."""
    out = {k: ckpt.get(k) for k in IDENTITY}
    # As JSON: OT checkpoints from before its pydantic config held the
    # members as a tuple of dicts, which to_dict now writes as a list.
    out["config"] = json.loads(json.dumps(out["config"]))
    out["good"] = str(checkpoint_good_root(ckpt).resolve())
    return out


def differences(recorded: dict[str, Any], wanted: dict[str, Any]) -> list[str]:
    """What differs between two trainings, in words."""
    out = []
    for key in IDENTITY:
        a, b = recorded.get(key), wanted.get(key)
        if a == b or (key == "input" and a is None):
            continue
        if key == "config":
            ka, kb = a or {}, b or {}
            for k in sorted(set(ka) | set(kb)):
                if ka.get(k) != kb.get(k):
                    out.append(f"{k} {json.dumps(ka.get(k))} -> {json.dumps(kb.get(k))}")
        elif key in ("fit", "holdout"):
            out.append(f"{key} images ({len(a or [])} -> {len(b or [])}, or other files)")
        else:
            out.append(f"{key} {json.dumps(a)} -> {json.dumps(b)}")
    return out


def _conflict(work: Path, what: str, diffs: list[str]) -> WorkDirConflict:
    return WorkDirConflict(
        f"{work} already holds {what} of another training ({'; '.join(diffs)}): use another "
        "--work, or --force to delete what the trainer wrote there and train afresh"
    )


def clear(work: Path) -> list[str]:
    """Delete what the trainer wrote under ``work`` (``--force``); the names deleted."""
    gone = []
    for name in OUTPUTS:
        path = work / name
        if path.is_file():
            path.unlink()
            gone.append(name)
    return gone


def plan_training(work: Path, wanted: dict[str, Any], force: bool = False) -> TrainPlan:
    """What ``train`` does in ``work`` for the training ``wanted`` (see the module doc)."""
    if force:
        gone = clear(work) if work.is_dir() else []
        note = f"--force: deleted {', '.join(gone)} in {work}; training afresh" if gone else None
        return TrainPlan("train", note)
    ckpt_path = work / CHECKPOINT
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        diffs = differences(recorded_identity(ckpt), wanted)
        if diffs:
            raise _conflict(work, f"a trained model ({CHECKPOINT})", diffs)
        return TrainPlan(
            "reuse",
            f"{ckpt_path} is this same training, finished ({len(ckpt['fit'])} images, "
            f"{float(ckpt['train_seconds']):.0f} s of training): reusing it, nothing is trained "
            "again (--force trains afresh)",
        )
    state_path = work / TRAIN_STATE
    if not state_path.is_file():
        return TrainPlan("train")
    if (work / TRAINING).is_file():
        diffs = differences(json.loads((work / TRAINING).read_text()), wanted)
        if diffs:
            raise _conflict(work, f"an interrupted training ({TRAIN_STATE})", diffs)
    state = torch.load(state_path, map_location="cpu", weights_only=False)
    if state.get("config") != wanted["config"]:
        diffs = differences({"config": state.get("config")}, {"config": wanted["config"]})
        raise _conflict(work, f"an interrupted training ({TRAIN_STATE})", diffs)
    epoch, epochs = int(state["epoch"]), int(wanted["config"].get("epochs", 0))
    what = (
        f"all {epochs} epochs were trained by an earlier run; finishing the model without "
        "training again"
        if epoch >= epochs
        else f"resuming the interrupted training at epoch {epoch + 1} of {epochs}"
    )
    return TrainPlan("resume", f"{state_path}: {what} (--force trains afresh)", epoch)


def write_training(work: Path, wanted: dict[str, Any]) -> None:
    work.mkdir(parents=True, exist_ok=True)
    (work / TRAINING).write_text(json.dumps(wanted, indent=2) + "\n")
