"""How a score holds when the line changes a little: validation without test images.

A line drifts between calibrations: a lamp ages, a lens is cleaned or
knocked out of focus, a fixture lets the part sit a few pixels off. A good
part seen that way is still good, and a score that throws it away is a
score the line switches off. The synthetic defects of
model_export/validation.py say how well a score separates defects; these
changes say how far it moves on good parts, and both are read on the
held-out good images only.

The figure is the count of changed held-out images a calibrated threshold
rejects. The threshold must not have seen the image it judges, so the
held-out images are cut in two halves (even and odd positions); the
conformal threshold of one half (service/calibration.py) judges the other
half's images, unchanged and under each change, and the other way round.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from model_export.validation import as_sent
from service.calibration import conformal_rank
from service.contract import Codec, InputSpec
from service.preprocessing import prepare

Change = Callable[[np.ndarray], np.ndarray]


def _gain(g: float) -> Change:
    return lambda rgb: np.clip(rgb.astype(np.float32) * g, 0, 255).astype(np.uint8)


def _shift(rgb: np.ndarray, d: int = 3) -> np.ndarray:
    """The part ``d`` pixels right and down; the uncovered border repeats the edge."""
    h, w = rgb.shape[:2]
    return np.pad(rgb, ((d, 0), (d, 0), (0, 0)), mode="edge")[:h, :w]


def _blur(rgb: np.ndarray) -> np.ndarray:
    return cv2.GaussianBlur(rgb, (0, 0), 1.0)


# Small enough that an inspector would call the part the same part.
LINE_CHANGES: dict[str, Change] = {
    "darker_5pct": _gain(0.95),  # a lamp 5% dimmer
    "brighter_5pct": _gain(1.05),
    "shifted_3px": _shift,  # the part 3 px right and down
    "blurred_sigma1": _blur,  # the lens slightly out of focus
}


def changed_inputs(
    holdout: Sequence[Path], spec: InputSpec, change: Change, codec: Codec | None = None
) -> torch.Tensor:
    """The held-out images under ``change``, as the model reads them when the
    camera sends them through ``codec``: (N, 3, H, W)."""
    return torch.stack(
        [as_sent(change(prepare(p.read_bytes(), spec).rgb), spec, codec) for p in holdout]
    )


def half_split_rejects(
    held: np.ndarray, changed: Mapping[str, np.ndarray], target_fpr: float = 0.01
) -> dict[str, int]:
    """How many images each half's conformal threshold rejects in the other
    half: ``held`` the held-out images' scores, ``changed`` the same images'
    scores under each change (in the same order); "unchanged" counts ``held``."""
    index = np.arange(len(held))
    if len(held) < 2:
        raise ValueError("the half split needs at least two held-out images")
    counts = {"unchanged": 0, **{name: 0 for name in changed}}
    for ref, judged in ((0, 1), (1, 0)):
        ref_idx, judged_idx = index[index % 2 == ref], index[index % 2 == judged]
        threshold = np.sort(held[ref_idx])[conformal_rank(len(ref_idx), target_fpr) - 1]
        counts["unchanged"] += int((held[judged_idx] > threshold).sum())
        for name, scores in changed.items():
            counts[name] += int((scores[judged_idx] > threshold).sum())
    return counts
