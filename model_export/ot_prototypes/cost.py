"""OT prototypes' objective: the transport cost between patches and
prototypes (feature and spatial terms), and the update a transport plan
gives the prototypes (barycentres, moving average)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def grid_positions(h: int, w: int, device: torch.device | str | None = None) -> torch.Tensor:
    """(h*w, 2) cell centres in [0, 1]^2, row-major like a flattened feature map."""
    ys = (torch.arange(h, dtype=torch.float32, device=device) + 0.5) / h
    xs = (torch.arange(w, dtype=torch.float32, device=device) + 0.5) / w
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([yy.reshape(-1), xx.reshape(-1)], dim=1)


def feature_cost(x: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """(1 - cosine) / 2 in [0, 1]: (..., n, d) x (m, d) -> (..., n, m)."""
    xn = F.normalize(x, dim=-1)
    pn = F.normalize(p, dim=-1)
    return ((1.0 - xn @ pn.T) * 0.5).clamp(0.0, 1.0)


def spatial_cost(pos_x: torch.Tensor, pos_p: torch.Tensor) -> torch.Tensor:
    """Euclidean distance / sqrt(2) in [0, 1]: (n, 2) x (m, 2) -> (n, m).

    Written with matmul rather than cdist so it exports to any ONNX opset.
    """
    sq = (pos_x * pos_x).sum(1, keepdim=True) + (pos_p * pos_p).sum(1)[None, :]
    sq = sq - 2.0 * pos_x @ pos_p.T
    return sq.clamp_min(0.0).sqrt() * (1.0 / math.sqrt(2.0))


def transport_cost(
    x: torch.Tensor, pos_x: torch.Tensor, p: torch.Tensor, pos_p: torch.Tensor, alpha: float
) -> torch.Tensor:
    """(1 - alpha) * feature cost + alpha * spatial cost; the terms are skipped at 0 weight."""
    cost = feature_cost(x, p) * (1.0 - alpha) if alpha < 1.0 else None
    if alpha > 0.0:
        s = spatial_cost(pos_x, pos_p) * alpha
        cost = s if cost is None else cost + s
    assert cost is not None
    return cost


def barycentres(plan: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Each prototype's transport barycentre: (n, m) plan, (n, d) patches -> (m, d)."""
    mass = plan.sum(0).clamp_min(1e-30)[:, None]  # (m, 1)
    return (plan.T @ x) / mass


def ema_update(prototypes: torch.Tensor, target: torch.Tensor, ema: float) -> torch.Tensor:
    return ema * prototypes + (1.0 - ema) * target
