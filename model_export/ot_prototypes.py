"""Local and global prototypes with optimal transport (Trombetta & Lartizien, 2025).

The model, as in the paper:

* a frozen ImageNet-pretrained encoder gives patch features at one or two
  intermediate scales of the 300x300 image (EfficientNet-Lite0 from
  model_export.backbones, the one P-WAE uses; each
  "scale" concatenates two taps, the deeper one upsampled, after a 3x3 local
  average so a patch sees its neighbourhood);
* every feature-grid position owns ``prototypes_per_position`` prototypes,
  each a feature vector (learned) and a fixed position (that grid cell);
* the cost between patch i and prototype j is
  ``(1 - alpha) * (1 - cos(x_i, p_j)) / 2 + alpha * |pos_i - pos_j| / sqrt(2)``
  with positions in [0, 1]^2, so both terms lie in [0, 1]. alpha = 0 makes the
  prototypes global (any patch may use any prototype); alpha > 0 makes them
  local (a patch pays for using a prototype from elsewhere in the image);
* learning: entropic OT (log-domain Sinkhorn, uniform marginals) between a
  batch of patches and all prototypes; each prototype moves to an exponential
  moving average (default 0.95) of its transport barycentre
  ``b_j = sum_i T_ij x_i / sum_i T_ij``;
* scoring: each patch's cost to its best prototype is its anomaly score; the
  map is upsampled to 300x300. The final model ensembles (scale, alpha)
  members: each member's map is divided by its mean score on the training
  patches so members weigh alike, the maps are averaged and smoothed.

The contract's errors are reductions of that map with the service's tiler:
e0 = the map's maximum, e1..e9 = each tile's maximum (service.tiler), so the
server's threshold rule works unchanged. Maxima, not means: a defect that is
a few pixels wide must raise its tile's error, and a mean over 100x100 pixels
would dilute it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from model_export.device import module_device, throughput
from model_export.sinkhorn import log_sinkhorn
from service import tiler

IMAGE_SIZE = 300

# EfficientNet-Lite0 block outputs (index into model._blocks) for a 300x300 input:
#   4 -> 40 ch @ 38x38 (stride 8), 10 -> 112 ch @ 19x19 (stride 16),
#   14 -> 192 ch @ 10x10 (stride 32).
SCALES: dict[str, tuple[int, int]] = {
    "s8": (4, 10),  # 152-d features on a 38x38 grid
    "s16": (10, 14),  # 304-d features on a 19x19 grid
}


@dataclass(frozen=True)
class MemberConfig:
    """One member of the ensemble: a feature scale and the weight of the spatial cost."""

    scale: str = "s8"
    alpha: float = 0.0
    prototypes_per_position: int = 16

    def __post_init__(self) -> None:
        if self.scale not in SCALES:
            raise ValueError(f"unknown scale {self.scale!r}; choose from {sorted(SCALES)}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {self.alpha}")
        if self.prototypes_per_position < 1:
            raise ValueError("prototypes_per_position must be >= 1")


def _default_members() -> tuple[MemberConfig, ...]:
    # The fine scale keeps 4 prototypes per cell: 38*38*4 = 5776 prototypes,
    # as many as the coarse scale's 19*19*16; 16 per cell at 38x38 would make
    # the Sinkhorn problem 4x larger for no gain on the 167-image bottle fit.
    return (
        MemberConfig("s8", 0.0, 4),
        MemberConfig("s8", 0.5, 4),
        MemberConfig("s16", 0.0, 16),
        MemberConfig("s16", 0.5, 16),
    )


@dataclass(frozen=True)
class OTPrototypesConfig:
    members: tuple[MemberConfig, ...] = field(default_factory=_default_members)
    epsilon: float = 0.05  # entropic regularisation, in cost units (costs lie in [0, 1])
    sinkhorn_iterations: int = 30
    ema: float = 0.95  # prototype <- ema * prototype + (1 - ema) * barycentre
    epochs: int = 1
    images_per_batch: int = 4
    # A batch of images is transported chunk by chunk: each OT problem takes
    # the patches of a random subset of grid cells and the prototypes of the
    # same cells, and the chunks cover every cell. Every cell in a problem
    # brings its share of patch mass and of prototype mass (so the uniform
    # marginals stay meaningful for local prototypes), each prototype is
    # updated once per batch, and the problem stays small: one whole image
    # against all 5776 fine-scale prototypes is a 1444 x 5776 plan, chunks of
    # 512 prototypes cost ~10x less for the same number of updates. For
    # alpha = 0 a chunk is a random subset of the global prototypes.
    prototypes_per_problem: int = 512
    smoothing_sigma: float = 4.0  # Gaussian blur of the 300x300 map, in pixels
    seed: int = 0

    def __post_init__(self) -> None:
        if not self.members:
            raise ValueError("the ensemble needs at least one member")
        if not 0.0 <= self.ema < 1.0:
            raise ValueError(f"ema must be in [0, 1), got {self.ema}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OTPrototypesConfig:
        raw = dict(raw)
        members = tuple(MemberConfig(**m) for m in raw.pop("members", ()))
        return cls(members=members, **raw) if members else cls(**raw)


# --- encoder ----------------------------------------------------------------


def efficientnet_lite0_blocks() -> nn.Module:
    """The shared pretrained EfficientNet-Lite0 (model_export.backbones), whole, frozen.

    Its static 'same' padding is set for the 300x300 image this family sees.
    """
    from model_export.backbones import efficientnet_lite0

    encoder = efficientnet_lite0(IMAGE_SIZE, stride=32)
    encoder.eval()
    for p in encoder.parameters():
        p.requires_grad_(False)
    return encoder


class MultiScaleFeatures(nn.Module):
    """Frozen encoder -> one (N, C, h, w) patch-feature map per requested scale."""

    def __init__(self, encoder: nn.Module, scales: Sequence[str]) -> None:
        super().__init__()
        self.scales = tuple(dict.fromkeys(scales))
        taps = sorted({i for s in self.scales for i in SCALES[s]})
        self.last = max(taps)
        self.taps = taps
        # backbones.Encoder's body: stem conv, BN, activation, then the 16
        # MBConv blocks; the taps index those blocks.
        seq: Any = getattr(encoder, "body", None)
        body = list(seq.children()) if isinstance(seq, nn.Sequential) else []
        if len(body) != 3 + 16:
            raise ValueError("expected model_export.backbones' EfficientNet-Lite0 up to stride 32")
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
            shallow, deep = (tapped[i] for i in SCALES[s])
            deep = F.interpolate(
                deep, size=shallow.shape[-2:], mode="bilinear", align_corners=False
            )
            out[s] = torch.cat([shallow, deep], dim=1)  # (N, C, h, w)
        return out


# --- costs and prototypes -----------------------------------------------------


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


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(t * t) / (2 * sigma * sigma))
    return k / k.sum()


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
            encoder if encoder is not None else efficientnet_lite0_blocks(),
            [m.scale for m in config.members],
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
        # Separable Gaussian, replicate padding so borders are not darkened.
        k = self.blur.numel()
        if k == 1:
            return m
        r = k // 2
        x = F.pad(m[:, None], (r, r, r, r), mode="replicate")
        x = F.conv2d(x, self.blur.view(1, 1, 1, k))
        x = F.conv2d(x, self.blur.view(1, 1, k, 1))
        return x[:, 0]

    def anomaly_map(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.features(image)
        total = torch.zeros(
            image.shape[0], IMAGE_SIZE, IMAGE_SIZE, dtype=image.dtype, device=image.device
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


# --- fitting --------------------------------------------------------------------


@dataclass
class FitLog:
    """What happened during fitting, for the metadata and the tests."""

    marginal_errors: list[float] = field(default_factory=list)
    prototype_shift: list[float] = field(
        default_factory=list
    )  # mean |delta p| per epoch, per member
    train_images: int = 0


@torch.no_grad()
def extract_features(
    model: OTPrototypesModel, images: Iterable[torch.Tensor], batch_size: int = 8
) -> dict[str, torch.Tensor]:
    """Stack each scale's features over all images: {scale: (N, C, h, w)}.

    The images are moved to the model's device; so are the features.
    """
    chunks: dict[str, list[torch.Tensor]] = {}
    batch: list[torch.Tensor] = []
    device = module_device(model)

    def flush() -> None:
        if batch:
            out = model.features(torch.stack(batch).to(device))
            for s, f in out.items():
                chunks.setdefault(s, []).append(f)
            batch.clear()

    for img in images:
        batch.append(img)
        if len(batch) == batch_size:
            flush()
    flush()
    if not chunks:
        raise ValueError("no training images")
    return {s: torch.cat(c) for s, c in chunks.items()}


@torch.no_grad()
def fit_member(
    member: PrototypeMember,
    feats: torch.Tensor,
    config: OTPrototypesConfig,
    log: FitLog | None = None,
    progress: Callable[[int], None] | None = None,
    on_epoch: Callable[[dict[str, Any]], object] | None = None,
) -> None:
    """Learn one member's prototypes on (N, C, h, w) training features.

    Runs on the device of ``feats`` (the member must be there too); the random
    draws come from a seeded CPU generator and are moved there. ``on_epoch``
    gets each epoch's images, seconds and images/s.
    """
    gen = torch.Generator().manual_seed(config.seed)
    device = feats.device
    n, c, h, w = feats.shape
    k = member.config.prototypes_per_position
    x_all = feats.flatten(2).transpose(1, 2)  # (N, h*w, C)
    # Initialise each cell's k prototypes from that cell's feature in k
    # random training images: the OT updates start from plausible patches.
    pick = torch.randint(0, n, (h * w, k), generator=gen).to(device)  # (h*w, k)
    cells = torch.arange(h * w, device=device)[:, None].expand(h * w, k)
    member.prototypes.copy_(F.normalize(x_all[pick, cells].reshape(h * w * k, c), dim=-1))

    ipb = max(1, config.images_per_batch)
    n_cells = min(h * w, max(1, config.prototypes_per_problem // k))
    protos = member.prototypes.view(h * w, k, c)  # shares storage with the buffer
    proto_pos = member.proto_positions.view(h * w, k, 2)
    for epoch in range(config.epochs):
        started = time.perf_counter()
        start = member.prototypes.clone()
        order = torch.randperm(n, generator=gen).to(device)
        for b0 in range(0, n, ipb):
            idx = order[b0 : b0 + ipb]  # (B,) images
            x_batch = x_all[idx]  # (B, h*w, C)
            chunks = torch.randperm(h * w, generator=gen).to(device).split(n_cells)
            for cells in chunks:  # (S,) cells
                x = x_batch[:, cells].reshape(-1, c)  # (B*S, C) patches
                pos = member.patch_positions[cells].repeat(len(idx), 1)  # (B*S, 2)
                p = protos[cells].reshape(-1, c)  # (S*k, C) prototypes of those cells
                cost = transport_cost(x, pos, p, proto_pos[cells].reshape(-1, 2), member.alpha)
                res = log_sinkhorn(cost, config.epsilon, config.sinkhorn_iterations)
                target = barycentres(res.plan, F.normalize(x, dim=-1))
                # Prototypes live on the unit sphere, like the features the cosine compares.
                p_new = ema_update(F.normalize(p, dim=-1), target, config.ema)
                protos[cells] = p_new.view(-1, k, c)
                if log is not None:
                    log.marginal_errors.append(res.marginal_error)
            if progress is not None:
                progress(len(idx))
        if on_epoch is not None:
            on_epoch(throughput(device, started, n, epoch=epoch + 1, epochs=config.epochs))
        if log is not None:
            log.prototype_shift.append(float((member.prototypes - start).norm(dim=1).mean()))

    # Members are averaged: divide each by its mean training-patch score so
    # that a member with larger raw costs does not drown the others.
    scores = torch.cat(
        [member(feats[i : i + 4]).flatten() * member.score_scale for i in range(0, n, 4)]
    )
    member.score_scale.copy_(scores.mean().clamp_min(1e-6))


def fit(
    config: OTPrototypesConfig,
    images: Sequence[torch.Tensor],
    encoder: nn.Module | None = None,
    progress: Callable[[int], None] | None = None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, Any]], object] | None = None,
) -> tuple[OTPrototypesModel, FitLog]:
    """Fit every ensemble member on defect-free (3, 300, 300) normalised images.

    The model is built on the CPU and fitted on ``device`` (model_export.device),
    where it is returned. ``on_epoch`` gets each member's epoch records (with
    ``member``, e.g. "s8/alpha=0.0/k=4"), after one of the frozen encoder's
    feature extraction (``stage`` "features", ``epoch`` 0).
    """
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model = OTPrototypesModel(config, encoder).to(device)
    model.eval()
    started = time.perf_counter()
    feats = extract_features(model, images)
    if on_epoch is not None:
        on_epoch(throughput(device, started, len(images), stage="features", epoch=0, epochs=0))
    log = FitLog(train_images=len(images))
    for member in model.prototype_members():
        m = member.config
        name = f"{m.scale}/alpha={m.alpha}/k={m.prototypes_per_position}"
        report = None if on_epoch is None else _tagged(on_epoch, name)
        fit_member(member, feats[member.config.scale], config, log, progress, report)
    return model, log


def _tagged(
    on_epoch: Callable[[dict[str, Any]], object], member: str
) -> Callable[[dict[str, Any]], object]:
    return lambda record: on_epoch({"member": member, **record})


# --- export ---------------------------------------------------------------------

OPSET = 17


def to_onnx(model: OTPrototypesModel, opset: int = OPSET) -> bytes:
    """The whole ensemble as one ONNX graph with a dynamic batch axis.

    The TorchScript exporter without constant folding: the spatial cost of a
    local member is computed in the graph from the (h*w, 2) and (m, 2)
    position tables; folding would store the (h*w, m) matrix instead, ~33 MB
    per fine-scale member. onnxruntime still folds what is cheap at load time.
    """
    import io

    from service.contract import (
        INPUT_NAME,
        OUTPUT_ANOMALY_MAP,
        OUTPUT_IMAGE_ERROR,
        OUTPUT_NAMES,
        OUTPUT_TILE_ERRORS,
    )

    model.cpu().eval()  # exported on the CPU whatever device it was fitted on
    buf = io.BytesIO()
    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    torch.onnx.export(
        model,
        (dummy,),
        buf,  # type: ignore[arg-type]  # a file object works; the stub says path
        dynamo=False,
        input_names=[INPUT_NAME],
        output_names=list(OUTPUT_NAMES),
        opset_version=opset,
        do_constant_folding=False,
        dynamic_axes={
            INPUT_NAME: {0: "N"},
            OUTPUT_IMAGE_ERROR: {0: "N"},
            OUTPUT_TILE_ERRORS: {0: "N"},
            OUTPUT_ANOMALY_MAP: {0: "N"},
        },
    )
    return buf.getvalue()
