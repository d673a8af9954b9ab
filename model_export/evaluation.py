"""Scoring images with a model and the quality figures of the test split."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from model_export.data import load_tensor
from model_export.device import module_device
from service.calibration import rule_flags, rule_score
from service.contract import Codec, InputSpec


def score(
    model: nn.Module,
    paths: Sequence[Path],
    batch: int = 4,
    codec: Codec | None = None,
    spec: InputSpec | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(N, 10) errors e0..e9 and (N, 300, 300) maps of the images at ``paths``,
    each passed through ``codec`` first where one is given, prepared as
    ``spec`` (the model's, e.g. data.checkpoint_spec: its colour) says."""
    return _score_batches(
        model,
        (
            torch.stack([load_tensor(p, spec, codec) for p in paths[i : i + batch]])
            for i in range(0, len(paths), batch)
        ),
    )


def score_tensors(
    model: nn.Module, images: Sequence[torch.Tensor], batch: int = 4
) -> tuple[np.ndarray, np.ndarray]:
    """As :func:`score`, for images already prepared as (3, 300, 300) tensors."""
    return _score_batches(
        model, (torch.stack(list(images[i : i + batch])) for i in range(0, len(images), batch))
    )


@torch.no_grad()
def _score_batches(
    model: nn.Module, batches: Iterable[torch.Tensor]
) -> tuple[np.ndarray, np.ndarray]:
    # The images are read on the CPU and scored on the model's device.
    device = module_device(model)
    errs, maps = [], []
    for x in batches:
        e0, tiles, amap = model(x.to(device))
        errs.append(torch.cat([e0[:, None], tiles], 1).cpu().numpy())
        maps.append(amap.cpu().numpy())
    return np.concatenate(errs), np.concatenate(maps)


def verdicts(
    items: Sequence[tuple[Path, int, np.ndarray]], errors: np.ndarray, eps: np.ndarray, root: Path
) -> list[dict[str, object]]:
    """The calibrated rule's verdict and errors of every test image, for checking
    a deployment against (an artifact's evaluation.json)."""
    return [
        {
            "image": str(p.relative_to(root)),
            "label": "defective" if y else "defect_free",
            "verdict": "defective" if bool(rule_flags(e, eps)) else "defect_free",
            "e0": float(e[0]),
            "tile_errors": [float(v) for v in e[1:]],
            "score": float(rule_score(e, eps)),
        }
        for (p, y, _), e in zip(items, errors, strict=True)
    ]


def max_balanced_accuracy(labels: np.ndarray, scores: np.ndarray) -> float:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(labels, scores)
    return float(((tpr + 1 - fpr) / 2).max())


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3, steps: int = 200) -> float:
    """Per-region overlap averaged over ground-truth regions, integrated over
    pixel FPR in [0, max_fpr] and divided by max_fpr (MVTec AD's PRO).

    As in the MVTec AD evaluation code, the curve is linearly interpolated at
    max_fpr, so a map with ties (a flat background) still gets its due area.
    """
    regions: list[tuple[int, np.ndarray]] = []  # (image index, region pixels flat indices)
    for i, m in enumerate(masks):
        n, lab = cv2.connectedComponents(m.astype(np.uint8), connectivity=8)
        for r in range(1, n):
            regions.append((i, np.flatnonzero(lab == r)))
    if not regions:
        return float("nan")
    normal = maps[~masks]
    # Thresholds: fine over the top of the normal scores (where FPR <= max_fpr
    # is decided) and coarse over the defect scores (where PRO changes).
    cands = np.concatenate(
        [
            np.quantile(normal, np.linspace(max(0.0, 1.0 - 1.5 * max_fpr), 1.0, steps)),
            np.quantile(maps[masks], np.linspace(0.0, 1.0, 50)),
        ]
    )
    flat = maps.reshape(len(maps), -1)
    fprs, pros = [0.0], [0.0]  # threshold +inf: nothing flagged
    for t in np.unique(cands)[::-1]:
        fprs.append(float((normal >= t).mean()))
        pros.append(float(np.mean([(flat[i, px] >= t).mean() for i, px in regions])))
    f, p = np.array(fprs), np.array(pros)
    inside = f <= max_fpr
    f_in, p_in = f[inside], p[inside]
    if not inside.all():  # close the curve exactly at max_fpr
        j = int(np.argmax(~inside))  # first point past max_fpr; f is non-decreasing
        w = (max_fpr - f[j - 1]) / (f[j] - f[j - 1])
        f_in = np.append(f_in, max_fpr)
        p_in = np.append(p_in, p[j - 1] + w * (p[j] - p[j - 1]))
    return float(np.trapezoid(p_in, f_in)) / max_fpr


def evaluate_scores(
    errors: np.ndarray, maps: np.ndarray, labels: np.ndarray, masks: np.ndarray, eps: np.ndarray
) -> dict[str, float]:
    from sklearn.metrics import roc_auc_score

    ratio = rule_score(errors, eps)
    predicted = rule_flags(errors, eps)
    metrics = {
        "image_auroc": float(roc_auc_score(labels, ratio)),
        "image_auroc_e0": float(roc_auc_score(labels, errors[:, 0])),
        "max_balanced_accuracy": max_balanced_accuracy(labels, ratio),
        "tp": float((predicted & (labels == 1)).sum()),
        "fp": float((predicted & (labels == 0)).sum()),
        "tn": float((~predicted & (labels == 0)).sum()),
        "fn": float((~predicted & (labels == 1)).sum()),
        # What the line sees of the calibrated rule: good parts thrown away,
        # defective parts caught.
        "false_reject_rate": float(predicted[labels == 0].mean()) if (labels == 0).any() else 0.0,
        "detection_rate": float(predicted[labels == 1].mean()) if (labels == 1).any() else 0.0,
    }
    # Pixel figures need masks: over the good images and the defective ones
    # that have a mask (a defective image without one would count its
    # defect's pixels as normal); none at all where no defective image has one.
    pixel = (labels == 0) | masks.reshape(len(masks), -1).any(1)
    if masks.any():
        m, a = masks[pixel], maps[pixel]
        sub = (slice(None), slice(None, None, 2), slice(None, None, 2))  # 150x150: 4x less memory
        metrics["pixel_auroc"] = float(roc_auc_score(m[sub].ravel(), a[sub].ravel()))
        metrics["pro_30"] = pro_score(m, a)
    return metrics


def masked_defectives(labels: np.ndarray, masks: np.ndarray) -> int:
    """How many defective images have a mask: the pixel figures' defective images."""
    return int(((labels == 1) & masks.reshape(len(masks), -1).any(1)).sum())
