"""OT prototypes' fitting, run by the shared trainer (model_export/trainer.py):
the frozen encoder's features of every image once, then, each epoch, every
member's prototypes moved by entropic OT (model_export/sinkhorn.py) towards
the patches of seeded batches, and after the epochs each member's score scale.

Each member draws from its own generator seeded with ``config.seed``, and
members share nothing but the features, so running the epochs member by
member or (as the trainer does) epoch by epoch gives the same prototypes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any, Unpack

import torch
import torch.nn.functional as F
from torch import nn

from model_export import trainer
from model_export.device import module_device
from model_export.ot_prototypes.config import OTPrototypesConfig
from model_export.ot_prototypes.cost import barycentres, ema_update, transport_cost
from model_export.ot_prototypes.model import OTPrototypesModel, PrototypeMember
from model_export.sinkhorn import log_sinkhorn


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


def progress_total(config: OTPrototypesConfig, n: int) -> int:
    """Images :func:`fit` reports to ``progress`` over a whole training of
    ``n`` images: every member's pass over them in every epoch."""
    return n * config.epochs * len(config.members)


class MemberFitting:
    """One member's prototypes learnt on its (N, C, h, w) training features,
    on their device; the random draws come from a seeded CPU generator and
    are moved there."""

    def __init__(
        self, member: PrototypeMember, feats: torch.Tensor, config: OTPrototypesConfig
    ) -> None:
        self.member, self.feats, self.config = member, feats, config
        self.gen = torch.Generator().manual_seed(config.seed)
        self.marginal_errors: list[float] = []
        self.prototype_shift: list[float] = []  # mean |delta p| per epoch

    @torch.no_grad()
    def initialise(self) -> None:
        """Each cell's k prototypes from that cell's feature in k random
        training images: the OT updates start from plausible patches."""
        member, feats = self.member, self.feats
        n, c, h, w = feats.shape
        k = member.config.prototypes_per_position
        x_all = feats.flatten(2).transpose(1, 2)  # (N, h*w, C)
        pick = torch.randint(0, n, (h * w, k), generator=self.gen).to(feats.device)  # (h*w, k)
        cells = torch.arange(h * w, device=feats.device)[:, None].expand(h * w, k)
        member.prototypes.copy_(F.normalize(x_all[pick, cells].reshape(h * w * k, c), dim=-1))

    @torch.no_grad()
    def epoch(self, progress: trainer.Progress = None) -> None:
        member, feats, config, gen = self.member, self.feats, self.config, self.gen
        device = feats.device
        n, c, h, w = feats.shape
        k = member.config.prototypes_per_position
        x_all = feats.flatten(2).transpose(1, 2)  # (N, h*w, C)
        ipb = max(1, config.images_per_batch)
        n_cells = min(h * w, max(1, config.prototypes_per_problem // k))
        protos = member.prototypes.view(h * w, k, c)  # shares storage with the buffer
        proto_pos = member.proto_positions.view(h * w, k, 2)
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
                self.marginal_errors.append(res.marginal_error)
            if progress is not None:
                progress(len(idx))
        self.prototype_shift.append(float((member.prototypes - start).norm(dim=1).mean()))

    @torch.no_grad()
    def finish(self) -> None:
        """Members are averaged: divide each by its mean training-patch score
        so that a member with larger raw costs does not drown the others."""
        member, feats = self.member, self.feats
        n = feats.shape[0]
        scores = torch.cat(
            [member(feats[i : i + 4]).flatten() * member.score_scale for i in range(0, n, 4)]
        )
        member.score_scale.copy_(scores.mean().clamp_min(1e-6))


def fit_member(
    member: PrototypeMember,
    feats: torch.Tensor,
    config: OTPrototypesConfig,
    progress: trainer.Progress = None,
) -> MemberFitting:
    """One member fitted alone for ``config.epochs`` (what :class:`OTFitting`
    does for every member, epoch by epoch)."""
    fitting = MemberFitting(member, feats, config)
    fitting.initialise()
    for _ in range(config.epochs):
        fitting.epoch(progress)
    fitting.finish()
    return fitting


class OTFitting:
    """OT prototypes' part of the shared trainer's loop (model_export.trainer.Fitting)."""

    def __init__(
        self,
        config: OTPrototypesConfig,
        images: Sequence[torch.Tensor],
        device: torch.device,
        encoder: nn.Module | None = None,
    ) -> None:
        self.config, self.images = config, images
        # Built on the CPU under the trainer's seed; frozen, so always in eval mode.
        self.model = OTPrototypesModel(config, encoder).to(device)
        self.model.eval()
        self.members: list[MemberFitting] = []

    def prepare(self, progress: trainer.Progress) -> int:
        """The frozen encoder's features of every image, once; each member's
        prototypes initialised from them."""
        feats = extract_features(self.model, self.images)
        for member in self.model.prototype_members():
            fitting = MemberFitting(member, feats[member.config.scale], self.config)
            fitting.initialise()
            self.members.append(fitting)
        return len(self.images)

    def images_per_epoch(self) -> int:
        """An epoch runs every member over the images: an image counts once per member."""
        return len(self.images) * len(self.members)

    def epoch(self, epoch: int, progress: trainer.Progress) -> dict[str, float]:
        for member in self.members:
            member.epoch(progress)
        return {
            "prototype_shift": sum(m.prototype_shift[-1] for m in self.members) / len(self.members)
        }

    def state(self) -> dict[str, Any]:
        return {
            "generators": [m.gen.get_state() for m in self.members],
            "marginal_errors": [m.marginal_errors for m in self.members],
            "prototype_shift": [m.prototype_shift for m in self.members],
        }

    def load_state(self, state: dict[str, Any]) -> None:
        for m, gen, errors, shift in zip(
            self.members,
            state["generators"],
            state["marginal_errors"],
            state["prototype_shift"],
            strict=True,
        ):
            m.gen.set_state(gen)
            m.marginal_errors, m.prototype_shift = list(errors), list(shift)

    def finish(self, progress: trainer.Progress, on_stage: Callable[[str], object] | None) -> None:
        for member in self.members:
            member.finish()

    def log(self) -> dict[str, Any]:
        """Every Sinkhorn solve's marginal error, and each member's mean prototype
        shift per epoch, member after member."""
        return {
            "train_images": len(self.images),
            "marginal_errors": [e for m in self.members for e in m.marginal_errors],
            "prototype_shift": [s for m in self.members for s in m.prototype_shift],
        }


def fit(
    config: OTPrototypesConfig,
    images: Sequence[torch.Tensor],
    encoder: nn.Module | None = None,
    **options: Unpack[trainer.Options],
) -> tuple[OTPrototypesModel, dict[str, Any]]:
    """Fit every ensemble member on defect-free (3, 300, 300) normalised
    images with the shared trainer (model_export/trainer.py: seeding, device,
    progress, epoch records, checkpoint and resume). The log has the epochs'
    ``history``, ``seconds_before``, ``marginal_errors`` and ``prototype_shift``."""

    def start(
        cfg: OTPrototypesConfig, imgs: Sequence[torch.Tensor], dev: torch.device
    ) -> OTFitting:
        return OTFitting(cfg, imgs, dev, encoder)

    model, log = trainer.train(start, config, images, **options)
    assert isinstance(model, OTPrototypesModel)
    return model, log
