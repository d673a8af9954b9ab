"""P-WAE's fitting, run by the shared trainer (model_export/trainer.py): the
frozen encoder's features once, SGD steps on the three losses under the
paper's learning-rate schedule, then the feature decoder (where an error
space may need it) and the error's statistics."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Unpack

import torch
import torch.nn.functional as F

from model_export import trainer
from model_export.pwae.config import GRID, TILE, PWAEConfig
from model_export.pwae.loss import losses
from model_export.pwae.model import PWAE, floored_spread, grid_of


def lr_at(cfg: PWAEConfig, progress: float) -> float:
    return cfg.lr / (1 + 10 * progress) ** 0.75


def whole_batches(n: int, batch: int) -> int:
    """Images one epoch's steps see of ``n`` in batches of ``batch``: whole
    batches only (the last, partial one is dropped), or all ``n`` where they
    are fewer than a batch."""
    return min(n, max(1, n // batch) * batch)


def images_per_epoch(config: PWAEConfig, n: int) -> int:
    """Images one of the latent's epochs sees (:func:`whole_batches`)."""
    return whole_batches(n, config.batch_size)


def progress_total(config: PWAEConfig, n: int) -> int:
    """Images :func:`fit` reports to ``progress`` over a whole training of
    ``n`` images: the frozen encoder's feature pass, every epoch's steps, the
    feature decoder's epochs, and the passes that fit the error's statistics
    (the feature channels' scales, the per-pixel statistics), so a bar ends
    at 100%."""
    features = n * len(_views(config)) if config.freeze_encoder else 0
    statistics = n * (_fits_statistics(config) + _fits_feature_scale(config))
    decoder = feature_decoder_images(config, n)
    if decoder and not config.freeze_encoder:
        decoder += n * len(_views(config))  # its features, computed then
    return features + config.epochs * images_per_epoch(config, n) + decoder + statistics


def _fits_statistics(config: PWAEConfig) -> bool:
    """Whether fitting ends with the per-pixel error statistics: z-scored
    errors, in a space already named (an "auto" space or normalisation fits
    them when it is settled, model_export/pwae/error_space.py)."""
    return config.error_normalisation == "zscore" and config.error_space != "auto"


def _fits_feature_scale(config: PWAEConfig) -> bool:
    """Whether fitting ends with the feature channels' scales (for a feature
    error, or one error_space="auto" may settle on)."""
    return config.error_feature_scale == "channel" and config.error_space != "pixel"


def feature_decoder_images(config: PWAEConfig, n: int) -> int:
    """Images the feature decoder's epochs see over ``n`` training images
    (each view of each, whole batches only)."""
    if not config.builds_feature_decoder():
        return 0
    views = n * len(_views(config))
    return config.feature_decoder_epochs * whole_batches(views, FEATURE_DECODER_BATCH)


# The feature decoder's optimiser: Adam, lr 1e-3, batches of 16 (its targets
# are fixed features, not a distribution to match, so the latent's SGD
# schedule has nothing to offer it).
FEATURE_DECODER_BATCH = 16
FEATURE_DECODER_LR = 1e-3


def _views(config: PWAEConfig) -> tuple[bool, ...]:
    """The views of an image training draws from: as it is, and mirrored
    left-right where ``augment_hflip``."""
    return (False, True) if config.augment_hflip else (False,)


class PWAEFitting:
    """P-WAE's part of the shared trainer's loop (model_export.trainer.Fitting)."""

    def __init__(
        self, config: PWAEConfig, images: Sequence[torch.Tensor], device: torch.device
    ) -> None:
        self.config = config
        self.device = device
        # Built on the CPU under the trainer's seed: the same initial weights everywhere.
        self.model = PWAE(config).to(device)
        self.x_all = torch.stack(list(images)).to(device)
        self.feats_all: torch.Tensor | None = None
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
        # Every random draw of the epochs: batches, permutations, priors, projections.
        self.gen = torch.Generator().manual_seed(config.seed)
        self.steps_per_epoch = max(1, len(self.x_all) // config.batch_size)

    def prepare(self, progress: trainer.Progress) -> int | None:
        """The frozen encoder's features of every tile of every view, computed
        once (its features do not change): (views, N, 9, C, h, w); a
        fine-tuned encoder has no such pass."""
        if not self.config.freeze_encoder:
            return None
        model, x_all = self.model, self.x_all
        views = []
        with torch.no_grad():
            for mirrored in _views(self.config):
                tiles = model.tiles(x_all.flip(-1) if mirrored else x_all)
                chunks = []
                for t in tiles.split(16):
                    chunks.append(model.encoder(t.reshape(-1, 3, TILE, TILE)))
                    if progress is not None:
                        progress(len(t))
                views.append(
                    torch.cat(chunks).reshape(
                        len(x_all), GRID * GRID, model.encoder.channels, model.cells, model.cells
                    )
                )
        self.feats_all = torch.stack(views)
        return len(x_all) * len(views)

    def images_per_epoch(self) -> int:
        return images_per_epoch(self.config, len(self.x_all))

    def epoch(self, epoch: int, progress: trainer.Progress) -> dict[str, float]:
        """One pass of SGD steps over a seeded shuffle of the images, the
        last partial batch dropped; the mean of each loss over the steps."""
        config, model, opt, gen = self.config, self.model, self.opt, self.gen
        model.train()
        steps = self.steps_per_epoch
        total_steps = steps * config.epochs
        order = torch.randperm(len(self.x_all), generator=gen)
        sums = {"total": 0.0, "ae": 0.0, "perceptual": 0.0, "swd": 0.0, "jigsaw": 0.0}
        for s in range(steps):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size].to(self.device)
            for group in opt.param_groups:
                group["lr"] = lr_at(config, (epoch * steps + s) / total_steps)
            perm_idx = torch.randint(config.permutations, (len(idx),), generator=gen)
            image, view = self.x_all[idx], torch.zeros_like(idx)
            if config.augment_hflip:  # drawn only then: the default's draws stay as they were
                view = torch.randint(2, (len(idx),), generator=gen).to(self.device)
                image = torch.where(view.bool().view(-1, 1, 1, 1), image.flip(-1), image)
            feats = None if self.feats_all is None else self.feats_all[view, idx]
            parts = losses(model, image, feats, perm_idx, gen)
            opt.zero_grad(set_to_none=True)
            parts["total"].backward()
            opt.step()
            for key, value in parts.items():
                sums[key] += value.item() / steps
            if progress is not None:
                progress(len(idx))
        return sums

    def state(self) -> dict[str, Any]:
        return {"optimizer": self.opt.state_dict(), "generator": self.gen.get_state()}

    def load_state(self, state: dict[str, Any]) -> None:
        self.opt.load_state_dict(state["optimizer"])
        self.gen.set_state(state["generator"])

    def finish(self, progress: trainer.Progress, on_stage: Callable[[str], object] | None) -> None:
        """Eval mode, the feature decoder where an error space may need it,
        the feature channels' scales where the feature error is scaled, and
        the per-pixel error statistics where the errors are z-scores."""
        self.model.eval()
        if self.config.builds_feature_decoder():
            if on_stage is not None:
                on_stage(
                    f"training the feature decoder on the {len(self.x_all)} images' latents "
                    f"({self.config.feature_decoder_epochs} epochs)"
                )
            self.fit_feature_decoder(progress)
        if _fits_feature_scale(self.config):
            if on_stage is not None:
                on_stage(f"fitting the feature channels' scales on the {len(self.x_all)} images")
            self.model.fit_feature_scale(self.x_all, progress=progress)
        if _fits_statistics(self.config):
            if on_stage is not None:
                on_stage(
                    f"fitting per-pixel error statistics on the {len(self.x_all)} images "
                    "(once, after the epochs)"
                )
            self.model.fit_error_statistics(self.x_all, progress=progress)

    def fit_feature_decoder(self, progress: trainer.Progress) -> None:
        """The feature decoder, trained to reconstruct the encoder's features
        of every view of every training image from their latent (the
        latent's weights fixed, in eval mode, as it will be served); each
        encoder channel's target is divided by its spread over them. Its own
        seeded generator: the epochs' draws are not touched."""
        model, config = self.model, self.config
        assert model.feature_decoder is not None
        with torch.no_grad():
            pairs = []  # (features, latent) grids of batches of images
            if self.feats_all is None:  # a fine-tuned encoder: its final features
                for mirrored in _views(config):
                    x_all = self.x_all.flip(-1) if mirrored else self.x_all
                    for x in x_all.split(16):
                        pairs.append(model.features_and_latent(x))
                        if progress is not None:
                            progress(len(x))
            else:
                for f in self.feats_all.flatten(0, 1).split(64):  # (views * N, 9, C, h, w)
                    pairs.append((grid_of(f), grid_of(model.latent(f))))
            grids = torch.cat([f for f, _ in pairs])
            latents = torch.cat([z for _, z in pairs])
            spread = grids.transpose(0, 1).flatten(1).std(1)
            model.feature_target_scale.copy_(floored_spread(spread))
            targets = grids / model.feature_target_scale.view(1, -1, 1, 1)
        decoder = model.feature_decoder
        decoder.train()
        opt = torch.optim.Adam(decoder.parameters(), lr=FEATURE_DECODER_LR)
        gen = torch.Generator().manual_seed(config.seed)
        batch = FEATURE_DECODER_BATCH
        steps = max(1, len(grids) // batch)
        for _ in range(config.feature_decoder_epochs):
            order = torch.randperm(len(grids), generator=gen).to(grids.device)
            for s in range(steps):
                idx = order[s * batch : (s + 1) * batch]
                loss = F.mse_loss(decoder(latents[idx]), targets[idx])
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if progress is not None:
                    progress(len(idx))
        decoder.eval()

    def log(self) -> dict[str, Any]:
        return {}


def fit(
    config: PWAEConfig, images: Sequence[torch.Tensor], **options: Unpack[trainer.Options]
) -> tuple[PWAE, dict[str, Any]]:
    """Train on defect-free images with the shared trainer (model_export/trainer.py:
    seeding, device, progress, epoch records, checkpoint and resume);
    deterministic under ``config.seed`` on the CPU. ``progress`` is told
    :func:`progress_total` images in all; the log has each epoch's losses
    (``history``) and ``seconds_before``."""
    model, log = trainer.train(PWAEFitting, config, images, **options)
    assert isinstance(model, PWAE)
    return model, log
