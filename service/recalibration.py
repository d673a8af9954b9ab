"""Recalibrating a model version on good parts: new thresholds, same graph.

Production drifts (lighting, a new batch of material, a camera swap). An
operator collects parts confirmed good on the line and recalibrates: the
served version's own graph scores them, :mod:`service.calibration` sets new
thresholds eps0..epsK, and the result is written as the *next* version with
identical ``model.onnx`` bytes (same sha256) and a calibration record that
says who, when, on how many images and with what promise. Versions stay
immutable: the parent is never touched, and a rollback is removing the new
directory and reloading.

Two things keep the conformal promise exact:

* the scales the rule's score divides by come from the parent (its recorded
  ``calibration.scales``, or its thresholds for older artifacts), never from
  the new images, so the images only pick the order statistic;
* the record describes the line images alone, never pooled with the parent's
  held-out set: its count and fingerprint are those of the images given.

Plain numpy and onnxruntime, no torch: the server's admin route and
``python -m service.recalibrate`` call it, and the trainer calls
:func:`score_images` and :func:`recalibrated_metadata` for its hold-out.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import EllipsisType
from typing import Literal

import numpy as np

from service.artifact import (
    LoadedArtifact,
    load_artifact,
    next_version,
    read_metadata,
    write_artifact,
)
from service.calibration import (
    METHOD,
    MIN_TARGET_FPR,
    ConformalThresholds,
    conformal_thresholds,
    images_for_target,
)
from service.codec import apply_codec, detect_codec
from service.contract import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_IMAGE_ERROR,
    OUTPUT_TILE_ERRORS,
    Calibration,
    Codec,
    Evaluation,
    ModelMetadata,
    Thresholds,
)
from service.preprocessing import prepare
from service.rejection import InputRejected
from service.signing import Signer

# Fewer distinct good images than this are refused: with n images the best
# promise is 1/(n+1), and below ten the thresholds hang on one or two parts.
MIN_IMAGES = 10
DEFAULT_TARGET_FPR = 0.01


class RecalibrationError(ValueError):
    """Input a recalibration cannot use; ``reason`` is machine-readable."""

    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(message)


class ImageRefused(RecalibrationError):
    """One of the given images cannot be read; says which and why."""

    def __init__(self, index: int, name: str | None, cause: InputRejected | ValueError) -> None:
        self.index = index
        self.name = name
        self.cause = cause
        why = cause.message if isinstance(cause, InputRejected) else str(cause)
        label = f"image {index}" + (f" ({name})" if name else "")
        super().__init__("invalid_image", f"{label}: {why}")


def parse_target(value: float | str) -> float:
    """A target false-reject rate in [MIN_TARGET_FPR, 1), or RecalibrationError."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        target = float("nan")
    if not MIN_TARGET_FPR <= target < 1:
        raise RecalibrationError(
            "invalid_target",
            f"target_fpr must be a number in [{MIN_TARGET_FPR:g}, 1), got {value!r}",
        )
    return target


def parse_operator(text: str) -> str:
    """Who confirmed the parts good: required for a line calibration, at most 200 characters."""
    operator = text.strip()
    if not operator or len(operator) > 200:
        raise RecalibrationError(
            "invalid_operator",
            "operator must name who confirmed the parts good (1..200 characters)",
        )
    return operator


def parse_codec(text: str) -> Codec:
    """``png``, ``jpeg:90``, ... or RecalibrationError."""
    try:
        return Codec.parse(text)
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        raise RecalibrationError(
            "invalid_codec",
            f"codec {text!r} is not one of png, bmp, tiff, jpeg or jpeg:<quality 1..100>",
        ) from exc


def images_fingerprint(images: Sequence[bytes]) -> str:
    """sha256 of the sorted per-image sha256 hex digests, concatenated.

    Order-free, so the same set of files gives the same fingerprint however
    they were listed; a duplicate counts as often as it is given.
    """
    digests = sorted(hashlib.sha256(d).hexdigest() for d in images)
    return hashlib.sha256("".join(digests).encode()).hexdigest()


def score_images(
    artifact: LoadedArtifact,
    images: Sequence[bytes],
    codec: Codec | None = None,
    batch: int = 8,
    *,
    names: Sequence[str] | None = None,
) -> np.ndarray:
    """(n, 1+K) errors e0..eK of ``images`` from the artifact's own session.

    With ``codec``, each image is first passed through it (as the camera
    would encode it), except where it already is exactly that codec: a JPEG
    from the line encoded again would carry the artefacts twice. A refused
    image raises :class:`ImageRefused` naming its index (and ``names[i]``).
    """
    meta = artifact.metadata
    out: list[np.ndarray] = []
    for start in range(0, len(images), max(1, batch)):
        tensors = []
        for i in range(start, min(start + batch, len(images))):
            data = images[i]
            try:
                if codec is not None and detect_codec(data) != codec:
                    # Checked as posted first: OpenCV would re-encode a cut-off
                    # file's grey remainder without a word.
                    prepare(data, meta.input, meta.grid)
                    data = apply_codec(data, codec)
                tensors.append(prepare(data, meta.input, meta.grid).tensor)
            except (InputRejected, ValueError) as exc:
                raise ImageRefused(i, names[i] if names else None, exc) from exc
        x = np.stack(tensors)  # (B, 3, H, W)
        e0, ek = artifact.session.run([OUTPUT_IMAGE_ERROR, OUTPUT_TILE_ERRORS], {INPUT_NAME: x})
        out.append(np.concatenate([np.asarray(e0)[:, None], np.asarray(ek)], axis=1))
    k = meta.grid.count
    errors = np.concatenate(out).astype(np.float64) if out else np.empty((0, 1 + k))
    bad = np.flatnonzero(~np.isfinite(errors).all(axis=1))
    if bad.size:
        raise RecalibrationError(
            "inference_failed", f"the model gave NaN or infinite errors on images {bad.tolist()}"
        )
    return errors


def parent_scales(parent: ModelMetadata) -> np.ndarray:
    """The scales for the rule's score: recorded ones, else the parent's thresholds.

    Both are fixed before the new images are seen, which is what keeps the
    conformal guarantee exact; the old thresholds' ratios say how large each
    error runs relative to the others, which is all a scale has to say.
    """
    scales = parent.calibration.scales or parent.thresholds.all
    return np.asarray(scales, np.float64)


def calibration_record(
    cal: ConformalThresholds,
    *,
    source: Literal["holdout", "line"],
    codec: Codec,
    operator: str | None,
    images_sha256: str,
    holdout_fraction: float | None = None,
    split_seed: int | None = None,
    parent_version: int | None = None,
) -> Calibration:
    """The metadata's record of a conformal calibration: ``cal`` and what it
    was made from. The trainer's ``calibrate`` and recalibration both write it."""
    return Calibration(
        method=METHOD,
        target_fpr=cal.target_fpr,
        achieved_fpr=cal.achieved_fpr,
        holdout_images=cal.images,
        holdout_fraction=holdout_fraction,
        split_seed=split_seed,
        promised_fpr=cal.promised_fpr,
        fpr_upper_90=cal.fpr_upper_90,
        images_for_target=images_for_target(cal.target_fpr),
        scales=tuple(float(s) for s in cal.scales),
        score_threshold=cal.score_threshold,
        reference_score=cal.reference_score,
        codec=codec,
        source=source,
        calibrated_at=datetime.now(UTC),
        operator=operator,
        images_sha256=images_sha256,
        parent_version=parent_version,
    )


def recalibrated_metadata(
    parent: ModelMetadata,
    cal: ConformalThresholds,
    *,
    version: int,
    source: Literal["holdout", "line"],
    codec: Codec,
    operator: str | None,
    images_sha256: str,
    holdout_fraction: float | None = None,
    split_seed: int | None = None,
    evaluation: Evaluation | EllipsisType | None = ...,
) -> ModelMetadata:
    """The parent's metadata with ``cal``'s thresholds and a new calibration record.

    ``evaluation`` left out: the parent's for a hold-out calibration (the
    caller re-evaluates if it wants), None for the line: the parent's test
    figures were measured with other thresholds and would describe a model
    this version is not.
    """
    eps = [float(e) for e in cal.eps]
    if len(eps) != 1 + parent.grid.count:
        raise ValueError(f"{len(eps)} thresholds for e0 and {parent.grid.count} tiles")
    if source == "line" and (holdout_fraction is not None or split_seed is not None):
        raise ValueError("a line calibration has no hold-out fraction or split seed")
    if evaluation is ...:
        evaluation = parent.evaluation if source == "holdout" else None
    calibration = calibration_record(
        cal, source=source, codec=codec, operator=operator, images_sha256=images_sha256,
        holdout_fraction=holdout_fraction, split_seed=split_seed, parent_version=parent.version,
    )  # fmt: skip
    now = calibration.calibrated_at
    return parent.model_copy(
        update={
            "version": version,
            "created_at": now,
            "thresholds": Thresholds(eps0=eps[0], tiles=tuple(eps[1:])),
            "calibration": calibration,
            "evaluation": evaluation,
            "artifact_sha256": None,  # the parent's; the writer stamps the new content's
        }
    )


@dataclass(frozen=True)
class RecalibrationResult:
    version_dir: Path
    metadata: ModelMetadata  # the new version's
    parent: ModelMetadata
    calibration: ConformalThresholds
    images: int  # distinct images calibrated on
    duplicates: int  # exact duplicates dropped
    codec: Codec  # recorded: given, else the most common one in the images
    codec_mix: dict[str, int] = field(default_factory=dict)  # detected codec -> images
    warning: str | None = None  # why the target cannot be promised, if it cannot

    @property
    def codec_note(self) -> str | None:
        """A line for the operator when the images came in several codecs."""
        if len(self.codec_mix) <= 1:
            return None
        mix = ", ".join(f"{n} {c}" for c, n in sorted(self.codec_mix.items(), key=lambda x: -x[1]))
        return f"the images mix codecs ({mix}); recorded {self.codec}"


def _dedupe(
    images: Sequence[bytes], names: Sequence[str] | None
) -> tuple[list[bytes], list[str] | None, int]:
    seen: set[str] = set()
    kept: list[bytes] = []
    kept_names: list[str] = []
    for i, data in enumerate(images):
        digest = hashlib.sha256(data).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        kept.append(data)
        kept_names.append(names[i] if names else str(i))
    return kept, (kept_names if names else None), len(images) - len(kept)


def _detected_codec(images: Sequence[bytes]) -> tuple[Codec, dict[str, int]]:
    found = Counter(detect_codec(d) for d in images)
    mix = {str(c) if c else "unknown": n for c, n in found.items()}
    known = [(n, c) for c, n in found.items() if c is not None]
    if not known:
        return Codec(), mix
    # The most common; ties go to the codec seen first.
    best = max(known, key=lambda nc: nc[0])[1]
    return best, mix


def recalibrate(
    version_dir: Path | str | LoadedArtifact,
    images: Sequence[bytes],
    *,
    target_fpr: float,
    operator: str | None,
    codec: Codec | None = None,
    out_dir: Path | None = None,
    names: Sequence[str] | None = None,
    signer: Signer | None = None,
) -> RecalibrationResult:
    """Write the next version of ``version_dir``'s model, calibrated on ``images``.

    ``version_dir`` is a version directory (or a model directory: its newest
    version), opened on the CPU, or an already loaded artifact, whose session
    is reused (the server's, so no second copy of the graph). The new version
    goes under ``out_dir``, by default the parent's model directory. Images
    are good parts from the line; ``names`` only label them in errors. A
    ``signer`` signs the new version as it is written (service/signing.py).
    """
    target_fpr = parse_target(target_fpr)
    if names is not None and len(names) != len(images):
        raise ValueError(f"{len(names)} names for {len(images)} images")
    if isinstance(version_dir, LoadedArtifact):
        art = version_dir
    else:
        art = load_artifact(version_dir, providers=("CPUExecutionProvider",))
    parent = art.metadata

    distinct, distinct_names, duplicates = _dedupe(images, names)
    if len(distinct) < MIN_IMAGES:
        raise RecalibrationError(
            "too_few_images",
            f"{len(distinct)} distinct images ({duplicates} exact duplicates dropped); "
            f"recalibration needs at least {MIN_IMAGES}, and "
            f"{images_for_target(target_fpr)} to promise a {target_fpr:.2%} false-reject rate",
        )

    detected, mix = _detected_codec(distinct)
    errors = score_images(art, distinct, codec, names=distinct_names)
    cal = conformal_thresholds(errors, parent_scales(parent), target_fpr)

    model_dir = Path(out_dir) if out_dir is not None else art.path.parent
    version = next_version(model_dir)
    metadata = recalibrated_metadata(
        parent,
        cal,
        version=version,
        source="line",
        codec=codec or detected,
        operator=operator,
        images_sha256=images_fingerprint(distinct),
    )
    # The parent's bytes as they are on disk, checked against its recorded
    # hash by write_artifact's own hashing below: the graph is shared exactly.
    onnx_bytes = (art.path / MODEL_FILE).read_bytes()
    if hashlib.sha256(onnx_bytes).hexdigest() != parent.onnx_sha256:
        raise RecalibrationError(
            "parent_changed", f"{art.path / MODEL_FILE} no longer has the sha256 it was loaded with"
        )
    new_dir = write_artifact(model_dir / str(version), onnx_bytes, metadata, signer)
    return RecalibrationResult(
        version_dir=new_dir,
        metadata=read_metadata(new_dir),  # as written: with its artifact_sha256
        parent=parent,
        calibration=cal,
        images=len(distinct),
        duplicates=duplicates,
        codec=metadata.calibration.codec,
        codec_mix=mix if codec is None else {},
        warning=cal.warning(),
    )
