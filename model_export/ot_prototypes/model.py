"""The OT-prototypes module: a frozen encoder's multi-scale patch features,
one prototype member per (scale, alpha), the ensemble's smoothed map and the
contract's errors, and its export."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_export.backbones import LITE_STAGES, efficientnet_lite
from model_export.blur import gaussian_kernel, separable_blur
from model_export.export import to_onnx as export_onnx
from model_export.ot_prototypes.config import (
    IMAGE_SIZE,
    OPSET,
    SCALES,
    MemberConfig,
    OTPrototypesConfig,
)
from model_export.ot_prototypes.cost import grid_positions, transport_cost
from service import tiler


def frozen_encoder(name: str) -> nn.Module:
    """A shared pretrained EfficientNet-Lite (model_export.backbones), whole, frozen.

    Its static 'same' padding is set for the 300x300 image this family sees.
    """
    encoder = efficientnet_lite(name, IMAGE_SIZE, stride=32)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


class MultiScaleFeatures(nn.Module):
    """Frozen encoder -> one (N, C, h, w) patch-feature map per requested scale."""

    def __init__(self, encoder: nn.Module, scales: Sequence[str], backbone: str) -> None:
        super().__init__()
        self.scales = tuple(dict.fromkeys(scales))
        stage_end = [last for last, _ in LITE_STAGES[backbone]]
        # scale -> the block indices it taps
        self.scale_taps = {s: tuple(stage_end[t - 1] for t in SCALES[s]) for s in self.scales}
        taps = sorted({i for s in self.scales for i in self.scale_taps[s]})
        self.last = max(taps)
        self.taps = taps
        # backbones.Encoder's body: stem conv, BN, activation, then the MBConv
        # blocks; the taps index those blocks.
        seq: Any = getattr(encoder, "body", None)
        body = list(seq.children()) if isinstance(seq, nn.Sequential) else []
        if len(body) != 3 + stage_end[-1] + 1:
            raise ValueError(f"expected model_export.backbones' {backbone} up to stride 32")
        self.stem = nn.Sequential(*body[:3])
        self.blocks = nn.ModuleList(body[3 : 3 + self.last + 1])
        self.eval()

    def forward(self, image: torch.Tensor) -> dict[str, torch.Tensor]:
        x = self.stem(image)
        tapped: dict[int, torch.Tensor] = {}
        for i, block in enumerate(self.blocks):
            x = block(x)
            if i in self.taps:
                # 3x3 neighbourhood average: a patch feature describes its
                # surroundings, which makes it robust to one-pixel shifts.
                tapped[i] = F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
        out: dict[str, torch.Tensor] = {}
        for s in self.scales:
            first, *deeper = (tapped[i] for i in self.scale_taps[s])
            resized = [
                F.interpolate(d, size=first.shape[-2:], mode="bilinear", align_corners=False)
                for d in deeper
            ]
            out[s] = torch.cat([first, *resized], dim=1) if resized else first  # (N, C, h, w)
        return out


class PrototypeMember(nn.Module):
    """Prototypes of one (scale, alpha) member and its patch scoring."""

    def __init__(self, config: MemberConfig, dim: int, grid: tuple[int, int]) -> None:
        super().__init__()
        self.config = config
        self.alpha = float(config.alpha)
        self.grid = grid
        h, w = grid
        k = config.prototypes_per_position
        cells = grid_positions(h, w)  # (h*w, 2)
        # Prototype j = cell * k + r sits on cell `cell`.
        self.register_buffer("prototypes", torch.zeros(h * w * k, dim))
        self.register_buffer("proto_positions", cells.repeat_interleave(k, dim=0))
        self.register_buffer("patch_positions", cells)
        self.register_buffer("score_scale", torch.ones(()))

    prototypes: torch.Tensor
    proto_positions: torch.Tensor
    patch_positions: torch.Tensor
    score_scale: torch.Tensor

    def costs(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) features -> (N, h*w, m) costs to every prototype."""
        x = feats.flatten(2).transpose(1, 2)  # (N, h*w, C)
        return transport_cost(
            x, self.patch_positions, self.prototypes, self.proto_positions, self.alpha
        )

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        """(N, C, h, w) -> (N, h, w): each patch's cost to its best prototype, rescaled."""
        n = feats.shape[0]
        best = self.costs(feats).min(dim=-1).values  # (N, h*w)
        return best.reshape(n, *self.grid) / self.score_scale


class OTPrototypesModel(nn.Module):
    """image (N, 3, 300, 300) -> (image_error (N), tile_errors (N, 9), anomaly_map (N, H, W))."""

    def __init__(
        self,
        config: OTPrototypesConfig,
        encoder: nn.Module | None = None,
        rows: int = 3,
        cols: int = 3,
    ) -> None:
        super().__init__()
        self.config = config
        self.rows, self.cols = rows, cols
        self.features = MultiScaleFeatures(
            encoder if encoder is not None else frozen_encoder(config.backbone),
            [m.scale for m in config.members],
            config.backbone,
        )
        with torch.no_grad():
            probe = self.features(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        self.members = nn.ModuleList(
            PrototypeMember(m, probe[m.scale].shape[1], tuple(probe[m.scale].shape[-2:]))
            for m in config.members
        )
        sigma = config.smoothing_sigma
        self.register_buffer("blur", gaussian_kernel(sigma) if sigma > 0 else torch.ones(1))

    blur: torch.Tensor

    def prototype_members(self) -> list[PrototypeMember]:
        return [m for m in self.members if isinstance(m, PrototypeMember)]

    def _smooth(self, m: torch.Tensor) -> torch.Tensor:
        # Replicate padding, so borders are not darkened.
        return separable_blur(m[:, None], self.blur, "replicate")[:, 0]

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        return self.map_from_features(self.features(image))

    def map_from_features(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        """The smoothed ensemble map (N, 300, 300) from each scale's features
        (what ``features`` gives), so a sweep over settings scores cached features."""
        first = next(iter(feats.values()))
        total = torch.zeros(
            first.shape[0], IMAGE_SIZE, IMAGE_SIZE, dtype=first.dtype, device=first.device
        )
        for member in self.prototype_members():
            s = member(feats[member.config.scale])  # (N, h, w)
            up = F.interpolate(
                s[:, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
            )
            total = total + up[:, 0]
        return self._smooth(total / len(self.members))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        amap = self.anomaly_map(image)  # (N, 300, 300)
        image_error = amap.flatten(1).max(dim=1).values  # (N,)
        tile_errors = tiler.tile_maxima(amap, self.rows, self.cols)  # (N, 9)
        return image_error, tile_errors, amap


def to_onnx(model: OTPrototypesModel, opset: int = OPSET) -> bytes:
    """The whole ensemble as one contract graph (model_export/export.py),
    exported on the CPU whatever device it was fitted on. The spatial cost of
    a local member stays computed in the graph from the (h*w, 2) and (m, 2)
    position tables (model_export/export.py says why it is not folded)."""
    return export_onnx(model, opset, (IMAGE_SIZE, IMAGE_SIZE))
