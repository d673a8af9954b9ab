"""Synthetic defects for model selection on held-out images (model_export/validation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_export.data import load_tensor
from model_export.evaluation import score
from model_export.paired_validation import paired_auroc_difference
from model_export.validation import (
    DEFECT_KINDS,
    inject_defect,
    synthetic_defectives,
    synthetic_validation,
)
from service import tiler
from tests.helpers.synthetic import encode_png, good_image

# Bounds on each kind's mask on a 300x300 image, from its drawing: a patch
# 12-39 px a side, a stain's ellipse of 5-15 px semi-axes, a scratch up to 60
# px long and 3 wide, a crack of up to 11 steps of 8 px, 2 wide, a blob's
# ellipse of 4-32 px semi-axes, a turned square 16-64 px a side.
MASK_PIXELS = {
    "patch": (144, 39 * 39),
    "stain": (60, int(np.pi * 16 * 16)),
    "scratch": (20, 64 * 6),
    "crack": (5, 11 * 8 * 4),
    "blob": (20, int(np.pi * 48 * 48)),  # its soft edge fades out up to half an axis past it
    "texture": (16 * 16, 64 * 64),
}


def test_every_kind_has_its_mask_bounds() -> None:
    assert set(MASK_PIXELS) == set(DEFECT_KINDS)


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_changes_the_image_where_its_mask_says(kind: str) -> None:
    rng = np.random.default_rng(0)
    low, high = MASK_PIXELS[kind]
    for _ in range(20):
        rgb = good_image(rng)
        out, mask = inject_defect(rgb, rng, kind)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert mask.dtype == bool and low <= mask.sum() <= high
        changed = (out != rgb).any(axis=2)
        assert changed[mask].mean() > 0.3, "the defect must show inside its mask"
        if kind != "stain":  # a stain's soft edge reaches a pixel or two past its mask
            assert not changed[~mask].any()
        assert mask[45:255, 45:255].any(), "a defect starts in the central 70% of the frame"


def test_unknown_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown defect kind"):
        inject_defect(np.zeros((300, 300, 3), np.uint8), np.random.default_rng(0), "dent")


class _DistanceToReference(nn.Module):
    """A stand-in anomaly model: squared distance to one reference image."""

    def __init__(self, reference: torch.Tensor) -> None:
        super().__init__()
        self.reference = reference

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        amap = ((x - self.reference) ** 2).mean(1)
        return amap.mean((1, 2)), tiler.tile_means(amap, 3, 3), amap


class _Blind(nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        n = len(x)
        return torch.ones(n), torch.ones(n, 9), torch.ones(n, 300, 300)


def test_validation_separates_defects_a_model_can_see(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    part = good_image(rng)
    paths = []
    for i in range(6):  # the same part with faint sensor noise
        noisy = np.clip(part + rng.normal(0, 2, part.shape), 0, 255).astype(np.uint8)
        paths.append(tmp_path / f"{i}.png")
        paths[-1].write_bytes(encode_png(noisy))
    model = _DistanceToReference(load_tensor(paths[0]))
    errors, _ = score(model, paths)
    eps = errors.max(axis=0) * 1.01
    figures = synthetic_validation(model, paths, errors, eps, seed=0, per_image=3)
    assert figures["synthetic_images"] == 18
    assert figures["synthetic_auroc"] > 0.95
    assert figures["synthetic_detected"] > 0.9
    # A model blind to everything scores chance.
    flat = synthetic_validation(_Blind(), paths, np.ones((6, 10)), np.ones(10), seed=0)
    assert flat["synthetic_auroc"] == 0.5


def test_synthetic_defectives_are_the_same_under_a_seed(tmp_path: Path) -> None:
    path = tmp_path / "part.png"
    path.write_bytes(encode_png(good_image(np.random.default_rng(2))))
    first = synthetic_defectives([path], seed=5, per_image=3)
    again = synthetic_defectives([path], seed=5, per_image=3)
    other = synthetic_defectives([path], seed=6, per_image=3)
    assert len(first) == 3 and first[0].shape == (3, 300, 300)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))


def test_paired_difference_is_zero_for_a_copy_and_positive_for_a_better_model() -> None:
    rng = np.random.default_rng(0)
    good, bad = rng.normal(0, 1, 40), rng.normal(1, 1, 80)  # a fair model: AUROC ~0.76
    perfect_good, perfect_bad = good - 10, bad + 10  # separates every pair
    diffs = paired_auroc_difference(
        np.stack([good, good, perfect_good]), np.stack([bad, bad, perfect_bad]), resamples=200
    )
    assert diffs.shape == (200, 2)
    assert np.all(diffs[:, 0] == 0), "a candidate identical to the base differs by nothing"
    assert np.quantile(diffs[:, 1], 0.05) > 0.1
