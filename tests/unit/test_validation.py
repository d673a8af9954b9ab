"""Synthetic defects for model selection on held-out images (model_export/validation.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from model_export.data import load_tensor
from model_export.evaluation import score
from model_export.validation import DEFECT_KINDS, inject_defect, synthetic_validation
from service import tiler
from tests.helpers.synthetic import encode_png, good_image


@pytest.mark.parametrize("kind", DEFECT_KINDS)
def test_each_defect_changes_the_image_where_its_mask_says(kind: str) -> None:
    rng = np.random.default_rng(0)
    for _ in range(20):
        rgb = good_image(rng)
        out, mask = inject_defect(rgb, rng, kind)
        assert out.shape == rgb.shape and out.dtype == np.uint8
        assert mask.dtype == bool and 20 <= mask.sum() <= 40 * 40
        changed = (out != rgb).any(axis=2)
        assert changed[mask].mean() > 0.3, "the defect must show inside its mask"
        if kind != "stain":  # a stain's soft edge reaches a pixel or two past its mask
            assert not changed[~mask].any()
        ys, xs = np.nonzero(mask)
        assert 0.1 * 300 <= ys.mean() <= 0.9 * 300 and 0.1 * 300 <= xs.mean() <= 0.9 * 300


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
