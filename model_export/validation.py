"""Model selection without test images: synthetic defects on held-out normals.

A choice between configurations (error normalisation, smoothing, latent size)
needs a figure that says which detects defects better, and the test split may
not give it: whatever is tuned on test images is no longer measured by them.
The held-out defect-free images that calibrate the thresholds give it instead:
each is scored as it is and again with a synthetic defect pasted in, and the
AUROC of the continuous score max_k(ek/epsk) between the two sets is the
validation figure. The defects are generic kinds a line sees, never drawn
from the real defect classes of the test split, and span what a defect can
be to a model: a structural change (a patch of the part moved elsewhere and
re-lit; a region of the surface turned or mirrored so its texture runs the
wrong way), a change of colour (a stain), of brightness that keeps the
texture (a soft blob, from faint to strong), and thin dark or bright lines,
straight (a scratch) or wandering (a crack), from 4 to 64 pixels across.

The first three kinds (patch, stain, scratch) were the whole set until
2026-12-02; on the magnetic tiles they ranked two P-WAE configurations the
other way round from the test split (docs/pwae-experiments.md, "Magnetic
tile"). With all six, validation ranked 16 OT-prototype configurations on
the tiles much as the test split did (Spearman 0.89; docs/ot-prototypes.md,
"the sweep on validation").
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from model_export.evaluation import score_tensors
from service.calibration import rule_flags, rule_score
from service.codec import apply_codec
from service.contract import Codec, InputSpec
from service.preprocessing import as_input_colour, normalise, prepare

DEFECT_KINDS = ("patch", "stain", "scratch", "crack", "blob", "texture")


def _gain(rng: np.random.Generator, low: float, high: float) -> float:
    """A brightness gain whose distance from 1 is in [low, high], darker or brighter."""
    d = rng.uniform(low, high)
    return 1.0 - d if rng.random() < 0.5 else 1.0 + d


def _relight(out: np.ndarray, mask: np.ndarray, gain: float) -> None:
    """Multiply ``out``'s pixels under ``mask`` by ``gain``, in place."""
    lit = out[mask > 0].astype(np.float32) * gain
    out[mask > 0] = np.clip(lit, 0, 255).astype(np.uint8)


def inject_defect(
    rgb: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``rgb`` ((H, W, 3) uint8) with one defect, and its mask ((H, W) bool).

    Defects start in the central 70% of the frame, where the inspected part
    is (a crack may wander out of it).
    """
    kind = kind or DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    h, w = rgb.shape[:2]
    out = rgb.copy()
    mask = np.zeros((h, w), np.uint8)
    cx, cy = (
        int(rng.integers(int(0.15 * w), int(0.85 * w))),
        int(rng.integers(int(0.15 * h), int(0.85 * h))),
    )
    if kind == "patch":  # a piece of the part, moved and re-lit (CutPaste)
        pw, ph = int(rng.integers(12, 40)), int(rng.integers(12, 40))
        sx, sy = int(rng.integers(0, w - pw)), int(rng.integers(0, h - ph))
        patch = rgb[sy : sy + ph, sx : sx + pw].astype(np.float32) * rng.uniform(0.6, 1.4)
        x0 = min(max(cx - pw // 2, 0), w - pw)
        y0 = min(max(cy - ph // 2, 0), h - ph)
        out[y0 : y0 + ph, x0 : x0 + pw] = np.clip(patch, 0, 255).astype(np.uint8)
        mask[y0 : y0 + ph, x0 : x0 + pw] = 1
    elif kind == "stain":  # contamination: a soft-edged blot of a foreign colour
        axes = (int(rng.integers(5, 16)), int(rng.integers(5, 16)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        opacity = rng.uniform(0.5, 1.0)
        alpha = opacity * cv2.GaussianBlur(mask.astype(np.float32), (0, 0), 1.5)[..., None]
        colour = rng.integers(0, 256, 3).astype(np.float32)
        out = (out * (1 - alpha) + colour * alpha).astype(np.uint8)
    elif kind == "scratch":  # a thin line, darker or brighter than the surface
        angle = rng.uniform(0, np.pi)
        half = rng.uniform(0.04, 0.1) * w
        dx, dy = np.cos(angle) * half, np.sin(angle) * half
        p0, p1 = (int(cx - dx), int(cy - dy)), (int(cx + dx), int(cy + dy))
        cv2.line(mask, p0, p1, 1, int(rng.integers(2, 4)))
        _relight(out, mask, 0.3 if rng.random() < 0.5 else 1.8)
    elif kind == "crack":  # a thin wandering line, often faint
        pts = [np.array([cx, cy], np.float64)]
        heading = rng.uniform(0, 2 * np.pi)
        for _ in range(int(rng.integers(4, 12))):
            heading += rng.normal(0, 0.6)
            step = rng.uniform(3, 8) * np.array([np.cos(heading), np.sin(heading)])
            pts.append(np.clip(pts[-1] + step, 0, [w - 1, h - 1]))
        cv2.polylines(mask, [np.round(pts).astype(np.int32)], False, 1, int(rng.integers(1, 3)))
        _relight(out, mask, _gain(rng, 0.2, 0.6))
    elif kind == "blob":  # the surface itself darker or brighter, texture kept
        axes = (int(rng.integers(4, 33)), int(rng.integers(4, 33)))
        cv2.ellipse(mask, (cx, cy), axes, float(rng.uniform(0, 180)), 0, 360, 1, -1)
        soft = cv2.GaussianBlur(mask.astype(np.float32), (0, 0), max(axes) / 4)
        soft[soft < 0.05] = 0  # the blob ends where its edge fades out
        shade = 1.0 + (_gain(rng, 0.1, 0.5) - 1.0) * soft[..., None]
        out = np.clip(out.astype(np.float32) * shade, 0, 255).astype(np.uint8)
        mask = ((soft > 0) & (out != rgb).any(axis=2)).astype(np.uint8)
    elif kind == "texture":  # a region whose texture runs the wrong way
        side = int(rng.integers(16, 65))
        x0 = min(max(cx - side // 2, 0), w - side)
        y0 = min(max(cy - side // 2, 0), h - side)
        region = rgb[y0 : y0 + side, x0 : x0 + side]
        turned = [np.rot90(region), region[::-1], region[:, ::-1]][int(rng.integers(3))]
        out[y0 : y0 + side, x0 : x0 + side] = turned
        mask[y0 : y0 + side, x0 : x0 + side] = 1
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    return out, mask > 0


def synthetic_defectives(
    holdout: Sequence[Path],
    seed: int = 0,
    per_image: int = 2,
    spec: InputSpec | None = None,
    codec: Codec | None = None,
) -> list[torch.Tensor]:
    """``per_image`` copies of each held-out image, each with one synthetic
    defect, prepared as the model's (3, H, W) input; the same under a seed.
    With a lossy ``codec`` the defective image is encoded as the camera would
    encode it, as the good images are."""
    spec = spec or InputSpec()
    rng = np.random.default_rng(seed)
    defective = []
    for path in holdout:
        rgb = prepare(path.read_bytes(), spec).rgb
        for _ in range(per_image):
            img, _ = inject_defect(rgb, rng)
            defective.append(as_sent(img, spec, codec))
    return defective


def as_sent(rgb: np.ndarray, spec: InputSpec, codec: Codec | None = None) -> torch.Tensor:
    """An image made from a prepared one ((H, W, 3) uint8), as the model reads
    it when the camera sends it: in the model's colour (a grey model sees a
    stain's luma) and, with a lossy ``codec``, encoded as the camera would."""
    img = as_input_colour(rgb, spec)
    if codec is not None and codec.format == "jpeg":
        ok, enc = cv2.imencode(".png", cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
        assert ok
        return torch.from_numpy(prepare(apply_codec(enc.tobytes(), codec), spec).tensor)
    return torch.from_numpy(normalise(img.astype(np.float32) / 255, spec))


def synthetic_validation(
    model: nn.Module,
    holdout: Sequence[Path],
    holdout_errors: np.ndarray,
    eps: np.ndarray,
    seed: int = 0,
    per_image: int = 2,
    spec: InputSpec | None = None,
    codec: Codec | None = None,
) -> dict[str, float]:
    """Validation figures of ``model`` with thresholds ``eps`` on held-out images.

    ``holdout_errors`` (N, 10) are the held-out images' errors, already
    computed by calibration. Each image gets ``per_image`` synthetic defects.
    """
    errors, _ = score_tensors(model, synthetic_defectives(holdout, seed, per_image, spec, codec))
    return validation_figures(holdout_errors, errors, eps)


def validation_figures(
    good_errors: np.ndarray, defective_errors: np.ndarray, eps: np.ndarray
) -> dict[str, float]:
    """The validation figures from the errors of held-out good images and of
    their synthetic defectives, whatever scored them (torch or the graph)."""
    from sklearn.metrics import roc_auc_score

    good = rule_score(good_errors, eps)
    bad = rule_score(defective_errors, eps)
    labels = np.r_[np.zeros(len(good)), np.ones(len(bad))]
    return {
        "synthetic_auroc": float(roc_auc_score(labels, np.r_[good, bad])),
        "synthetic_auroc_e0": float(
            roc_auc_score(labels, np.r_[good_errors[:, 0], defective_errors[:, 0]])
        ),
        "synthetic_detected": float(rule_flags(defective_errors, eps).mean()),
        "synthetic_images": float(len(bad)),
    }
