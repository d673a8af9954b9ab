"""P-WAE: a patch-wise Wasserstein autoencoder for anomaly screening (Zhang et al.).

A 300x300 image is cut into a 3x3 grid of 100x100 tiles (service.tiler, the
same code the server's tests check). During training the tiles are shuffled by
a permutation drawn from a fixed set (the jigsaw task); a Siamese encoder maps
every tile to a latent code; tile k's codes are pulled towards its own prior
T(nu=5, mu=k, sigma=1) by a sliced-Wasserstein distance; a linear head
recovers the permutation from the nine codes; a decoder of
Upsample-Conv-BN-ReLU blocks reconstructs the image. At test time the tiles
are not shuffled and the errors are L2 reconstruction errors: e0 over the
whole image, e1..e9 per tile, all computed inside the exported graph.

Where the paper is vague, the choices are made here and said why:

* The latent code of a tile is a small spatial map (``latent_channels`` x 7 x 7
  from the encoder's stride-16 features), not a single vector: a vector per
  100x100 tile reconstructs only a blur, and the blur's error on good images
  drowns the defects. The bottleneck stays meaningful: 9 x 16 x 7 x 7 = 7056
  numbers for 270,000 input values (38x), so the decoder cannot copy its input.
* The decoder sees the nine codes reassembled in their true (unshuffled) grid
  positions, as one 21x21 map, and decodes the whole image at once: decoding
  tiles one by one leaves seams at tile borders that look like defects.
* The encoder is ImageNet-pretrained and frozen by default (``freeze_encoder``):
  on a 2-core CPU fine-tuning it costs 10x the training time. The latent
  projection on top of it, the jigsaw head and the decoder are trained.
* The sliced-Wasserstein distance matches each tile's *code* (its latent map
  pooled to ``latent_channels`` numbers, the vector the jigsaw head reads) to
  the tile's prior, not every number of the map (``swd_on``). Matched on the
  whole 392-number map, the T(mu=k) prior asks every number of tile k to sit
  near k, which the latent's batch normalisation cannot give: the SWD term
  stayed near 260 against a reconstruction loss of 0.1, took the latent from
  the decoder and left a blurrier reconstruction (training MSE 0.098, against
  0.081 with the code matched and 0.059 with no SWD at all). Without the batch
  normalisation, SGD at the paper's lr diverged (NaN) either way.
* The error is the paper's L2 in pixel space, Gaussian-smoothed
  (``error_sigma``). By default each pixel's error is then standardised by
  that pixel's mean and standard deviation over the training images
  (``error_normalisation="zscore"``): the parts are aligned, so where the
  reconstruction is always poor (the bottle's glass rim) no longer hides
  where it is poor only on this part. And a tile's error e1..e9 is the
  largest value of the smoothed map in it (``tile_error="peak"``, the L2
  error of its worst window) rather than its mean, which a small defect is
  averaged away in. e0 stays the mean over the whole image.
* These three choices, and the latent's 16 channels (the paper gives no
  size), were made on validation figures alone: held-out defect-free images
  against the same images with synthetic defects (model_export/validation.py,
  model_export/paired_validation.py), never test images;
  docs/pwae-experiments.md has the figures. ``PAPER`` keeps the paper's
  recipe (``--preset paper``).
* A frozen ImageNet feature space for the error (the encoder's first three
  stages on the whole image) is available as ``error_space="feature"``; it
  scored lower on bottle with the paper's recipe (image AUROC 0.82 against
  0.90 for pixels), so it is not the default.
"""

from __future__ import annotations

import itertools
import math
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from model_export.backbones import BackboneName, Encoder, build_encoder
from model_export.device import throughput
from service import tiler

IMAGE_SIZE = 300
GRID = 3
TILE = IMAGE_SIZE // GRID
OPSET = 18


class PWAEConfig(BaseModel):
    """Hyper-parameters; the paper's settings are the defaults where it gives them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneName = "efficientnet_lite0"
    backbone_weights: str | None = None  # ResNet-50 only: torchvision's state dict file
    freeze_encoder: bool = True
    # The encoder's output stride, i.e. the latent map's cell size: 16 gives
    # each tile a 7x7 map, 8 a 13x13 one.
    encoder_stride: Literal[8, 16] = 16
    # 16, not 8: chosen on validation figures (docs/pwae-experiments.md).
    latent_channels: int = Field(16, ge=1)
    # The latent's batch normalisation with a learnt scale and shift per
    # channel. Without them (the default) every channel has mean 0 over the
    # nine tiles, which the priors' means 1..9 can never be matched to.
    latent_affine: bool = False
    # Three x2 blocks: 21 -> 168 pixels, then bilinear to 300. A fourth block to
    # 336 cost 5x the training time on CPU for detail the smoothed error map
    # (error_sigma) averages away anyway.
    decoder_channels: tuple[int, ...] = (64, 32, 16)
    # Jigsaw (Noroozi & Favaro): a fixed set of permutations with large Hamming distance.
    permutations: int = Field(1000, ge=2)
    permutation_seed: int = 0
    # Student-t prior per tile k: T(nu, mu = k * prior_mu_step, sigma).
    prior_nu: float = Field(5.0, gt=0)
    prior_mu_step: float = 1.0
    prior_sigma: float = Field(1.0, gt=0)
    swd_projections: int = Field(64, ge=1)
    # What the SWD matches to the prior: "map", every number of a tile's
    # latent map (c x 7 x 7); "code", the tile's code (its map pooled to c
    # numbers, what the jigsaw head sees).
    swd_on: Literal["map", "code"] = "code"
    # Loss = w_ae * L_AE + w_swd * L_SWD + w_jigsaw * L_jigsaw.
    w_ae: float = 1.0
    w_swd: float = 1.0
    w_jigsaw: float = 1.0
    # SGD, lr = lr0 / (1 + 10 p)^0.75 with p the training progress in [0, 1].
    lr: float = 0.01
    momentum: float = 0.9
    epochs: int = Field(30, ge=1)
    batch_size: int = Field(8, ge=2)  # the SWD compares distributions: >= 2 codes per tile
    error_sigma: float = Field(4.0, ge=0)
    # Where the reconstruction error is measured. "pixel": the paper's L2 in
    # image space. "feature": L2 between frozen ImageNet features (stride 8)
    # of the image and of its reconstruction; measured worse on bottle (see
    # the module docstring), kept as an option.
    error_space: Literal["pixel", "feature"] = "pixel"
    # "zscore": each pixel's error is standardised by the mean and standard
    # deviation of that pixel's error over the training images, then clipped
    # at 0 (errors below the usual are no defect, and the thresholds must be
    # positive). The parts on a line are aligned, so where the reconstruction
    # is always poor (the glass rim's fine texture) stops hiding the pixels
    # where it is poor only on this part. "none" is the paper's raw error.
    error_normalisation: Literal["none", "zscore"] = "zscore"
    # Floor of the per-pixel std, as a fraction of its image mean: a pixel
    # whose error never varies (flat background) must not blow noise up.
    error_std_floor: float = Field(0.01, gt=0)
    # e1..e9: "mean", the tile's L2 error (the paper); "peak", the largest
    # value of the smoothed map in the tile, i.e. the L2 error of the tile's
    # worst error_sigma-sized window, which a defect a few pixels wide is not
    # averaged away in. e0 stays the whole image's mean either way.
    tile_error: Literal["mean", "peak"] = "peak"
    # The same feature-space term as a training loss. Off by default: back-
    # propagating through the feature network at 300x300 is an order of
    # magnitude slower on a 2-core CPU (docs/pwae-experiments.md).
    w_perceptual: float = Field(0.0, ge=0)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PWAEConfig:
        return cls.model_validate(raw)


# The defaults are the recipe chosen on held-out images with synthetic
# defects (model_export/validation.py, docs/pwae-experiments.md). PAPER is the
# recipe as the paper gives it: the prior matched on the whole latent, the raw
# pixel L2 error, tile means, with the latent size (which the paper does not
# give) of models/bottle-pwae/1. FEATURE_ERROR is the feature-space experiment.
PAPER = PWAEConfig(latent_channels=8, swd_on="map", error_normalisation="none", tile_error="mean")
FEATURE_ERROR = PAPER.model_copy(update={"error_space": "feature"})


# --- the pieces the paper names ------------------------------------------------


def permutation_set(
    count: int, seed: int, n: int = GRID * GRID, candidates: int = 40_000
) -> np.ndarray:
    """``count`` permutations of ``n`` with large pairwise Hamming distance.

    Greedy max-min selection (Noroozi & Favaro's "maximal" set): each step
    adds the candidate farthest, in Hamming distance, from those already
    chosen. The candidates are a seeded sample of ``candidates`` of the n!
    permutations rather than all 362,880: the selected set's distances are the
    same in practice at a tenth of the time (the default 1000 differ pairwise
    in 8.0 of 9 positions on average, at least 5; tests/unit/test_pwae.py).
    Row 0 is the identity, the order used at test time.
    """
    rng = np.random.default_rng(seed)
    perms = np.array(list(itertools.permutations(range(n))), dtype=np.int8)
    if count > len(perms):
        raise ValueError(f"only {len(perms)} permutations of {n} exist, asked for {count}")
    identity = np.arange(n, dtype=np.int8)[None]
    sample = perms[rng.permutation(len(perms))[:candidates]]
    perms = np.concatenate([identity, sample[(sample != identity).any(1)]])
    chosen = [0]
    min_dist = (perms != perms[chosen[0]]).sum(1)
    for _ in range(count - 1):
        nxt = int(np.argmax(min_dist))
        chosen.append(nxt)
        np.minimum(min_dist, (perms != perms[nxt]).sum(1), out=min_dist)
    return perms[chosen].astype(np.int64)


def sample_student_t(
    shape: Sequence[int],
    nu: float,
    mu: torch.Tensor | float,
    sigma: float,
    generator: torch.Generator,
) -> torch.Tensor:
    """Student-t samples: mu + sigma * z / sqrt(chi2_nu / nu), z ~ N(0, 1).

    chi2_nu = 2 * Gamma(nu / 2, 1), drawn by Marsaglia and Tsang's method from
    the given generator: torch's own gamma sampler takes no generator, and
    training must be reproducible under a seed. The draws are made on the
    generator's device (the trainer's is a CPU one) and moved to ``mu``'s
    where that is a tensor, so a seed gives the same sample on either device.
    """
    z = torch.randn(*shape, generator=generator)
    # Gamma(k, 1) by Marsaglia-Tsang with the generator, vectorised.
    k = nu / 2.0
    d = k - 1.0 / 3.0 if k >= 1 else k + 2.0 / 3.0
    c = 1.0 / math.sqrt(9.0 * d)
    out = torch.empty(*shape)
    todo = torch.ones(*shape, dtype=torch.bool)
    while todo.any():
        x = torch.randn(*shape, generator=generator)
        v = (1 + c * x) ** 3
        u = torch.rand(*shape, generator=generator)
        ok = (v > 0) & (
            torch.log(u.clamp_min(1e-12))
            < 0.5 * x**2 + d - d * v + d * torch.log(v.clamp_min(1e-12))
        )
        take = ok & todo
        out[take] = (d * v)[take]
        todo &= ~ok
    if k < 1:  # boost: Gamma(k) = Gamma(k + 1) * U^(1/k)
        out = out * torch.rand(*shape, generator=generator) ** (1.0 / k)
    chi2 = 2.0 * out
    noise = sigma * z / torch.sqrt(chi2 / nu)
    if isinstance(mu, torch.Tensor):
        noise = noise.to(mu.device)
    return mu + noise


def sliced_wasserstein(a: torch.Tensor, b: torch.Tensor, projections: torch.Tensor) -> torch.Tensor:
    """Squared sliced-Wasserstein-2 distance between two equal-size samples.

    a, b: (..., B, D); projections: (D, L) unit columns. Each projection turns
    both samples into 1-D ones, whose W2 is the mean squared difference of
    their sorted values; the result is the mean over projections (and over
    any leading batch of sample pairs).
    """
    pa = torch.sort(a @ projections, dim=-2).values
    pb = torch.sort(b @ projections, dim=-2).values
    return ((pa - pb) ** 2).mean()


def random_projections(
    dim: int, count: int, generator: torch.Generator, device: torch.device | None = None
) -> torch.Tensor:
    """(dim, count) directions drawn uniformly on the unit sphere, on the
    generator's device, then moved to ``device`` where one is given."""
    p = torch.randn(dim, count, generator=generator)
    p = p / p.norm(dim=0, keepdim=True)
    return p if device is None else p.to(device)


def gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-(x**2) / (2 * sigma**2))
    return k / k.sum()


# --- the model -----------------------------------------------------------------


def latent_cells(stride: int) -> int:
    """The side of a tile's latent map: 7 at the encoder's stride 16, 13 at 8."""
    return math.ceil(TILE / stride)


def _up_block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Upsample(scale_factor=2, mode="nearest"),
        nn.Conv2d(cin, cout, 3, padding=1, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class PWAE(nn.Module):
    """forward(image) -> (image_error (N), tile_errors (N, 9), anomaly_map (N, 300, 300))."""

    # Buffers of error_normalisation="zscore": per-pixel statistics of the
    # training images' raw error maps, (300, 300) each.
    error_mean: torch.Tensor
    error_std: torch.Tensor

    def __init__(self, config: PWAEConfig, encoder: Encoder | None = None) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder or build_encoder(
            config.backbone, TILE, stride=config.encoder_stride, weights=config.backbone_weights
        )
        if config.freeze_encoder:
            self.encoder.eval()
            for p in self.encoder.parameters():
                p.requires_grad_(False)
        c = config.latent_channels
        self.to_latent = nn.Sequential(
            nn.Conv2d(self.encoder.channels, c, 1), nn.BatchNorm2d(c, affine=config.latent_affine)
        )
        self.cells = latent_cells(self.encoder.stride)
        self.jigsaw = nn.Linear(GRID * GRID * c, config.permutations)
        chans = (c, *config.decoder_channels)
        self.decoder = nn.Sequential(
            *(_up_block(a, b) for a, b in itertools.pairwise(chans)),
            nn.Conv2d(chans[-1], 3, 3, padding=1),
        )
        perms = permutation_set(config.permutations, config.permutation_seed)
        self.register_buffer("perms", torch.from_numpy(perms), persistent=True)
        # The feature space of the error, where one is used: frozen, ImageNet's statistics kept.
        self.perceptual: Encoder | None = None
        if config.error_space == "feature" or config.w_perceptual > 0:
            self.perceptual = build_encoder("efficientnet_lite0", IMAGE_SIZE, stride=8)
            self.perceptual.eval()
            for p in self.perceptual.parameters():
                p.requires_grad_(False)
        kernel = gaussian_kernel(config.error_sigma) if config.error_sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)
        if config.error_normalisation == "zscore":
            # Set by fit() from the training images; saved with the weights.
            self.register_buffer("error_mean", torch.zeros(IMAGE_SIZE, IMAGE_SIZE))
            self.register_buffer("error_std", torch.ones(IMAGE_SIZE, IMAGE_SIZE))

    def train(self, mode: bool = True) -> PWAE:
        super().train(mode)
        if self.config.freeze_encoder:
            self.encoder.eval()  # frozen BN statistics stay ImageNet's
        if self.perceptual is not None:
            self.perceptual.eval()
        return self

    # (N, 3, 300, 300) -> (N, 9, 3, 100, 100), tiles row-major
    def tiles(self, image: torch.Tensor) -> torch.Tensor:
        return tiler.to_tiles(image, GRID, GRID).permute(0, 2, 1, 3, 4)

    def encode(self, tiles: torch.Tensor) -> torch.Tensor:
        """(N, 9, 3, 100, 100) -> latent maps (N, 9, c, 7, 7); the encoder is shared (Siamese)."""
        n = tiles.shape[0]
        feats = self.encoder(tiles.reshape(n * GRID * GRID, 3, TILE, TILE))
        return self.latent(feats.reshape(n, GRID * GRID, *feats.shape[1:]))

    def latent(self, feats: torch.Tensor) -> torch.Tensor:
        """Encoder features (N, 9, C, 7, 7) -> latent maps (N, 9, c, 7, 7)."""
        n = feats.shape[0]
        z = self.to_latent(feats.reshape(n * GRID * GRID, *feats.shape[2:]))
        return z.reshape(n, GRID * GRID, *z.shape[1:])

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent maps in true grid order (N, 9, c, h, w) -> image (N, 3, 300, 300)."""
        # (N, 9, c, h, w) -> (N, c, 9, h, w) -> (N, c, 3h, 3w): the tiler's inverse.
        grid = tiler.from_tiles(z.permute(0, 2, 1, 3, 4), GRID, GRID)
        out = self.decoder(grid)
        return F.interpolate(
            out, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )

    def feature_error(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Squared feature difference, mean over channels, at image size: (N, 1, 300, 300)."""
        assert self.perceptual is not None, (
            "built only with error_space='feature' or w_perceptual > 0"
        )
        err = ((self.perceptual(image) - self.perceptual(recon)) ** 2).mean(1, keepdim=True)
        return F.interpolate(err, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def error_map(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """The anomaly map (N, 300, 300): the raw error map, normalised as configured."""
        err = self.raw_error_map(image, recon)
        if self.config.error_normalisation == "zscore":
            err = F.relu((err - self.error_mean) / self.error_std)
        return err

    @torch.no_grad()
    def fit_error_statistics(
        self,
        images: torch.Tensor,
        batch: int = 16,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Per-pixel mean and floored std of the raw error map over ``images``
        (``progress`` is told each batch's images)."""
        parts = []
        for x in images.split(batch):
            parts.append(self.raw_error_map(x, self.reconstruct(x)))
            if progress is not None:
                progress(len(x))
        maps = torch.cat(parts)
        std = maps.std(0)
        self.error_mean.copy_(maps.mean(0))
        self.error_std.copy_(std.clamp_min(self.config.error_std_floor * float(std.mean())))

    def raw_error_map(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Per-pixel squared error, mean over channels, Gaussian-smoothed: (N, 300, 300)."""
        if self.config.error_space == "feature":
            err = self.feature_error(image, recon)
        else:
            err = ((image - recon) ** 2).mean(1, keepdim=True)
        if self.config.error_sigma > 0:
            k: torch.Tensor = self.kernel  # type: ignore[assignment]
            r = k.numel() // 2
            err = F.conv2d(F.pad(err, (r, r, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
            err = F.conv2d(F.pad(err, (0, 0, r, r), mode="reflect"), k.view(1, 1, -1, 1))
        return err[:, 0]

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Image (N, 3, 300, 300) -> its reconstruction, tiles in their true order."""
        return self.decode(self.encode(self.tiles(image)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        recon = self.reconstruct(image)
        amap = self.error_map(image, recon)
        reduce = tiler.tile_means if self.config.tile_error == "mean" else tiler.tile_maxima
        return amap.mean((1, 2)), reduce(amap, GRID, GRID), amap


# --- training --------------------------------------------------------------------


def losses(
    model: PWAE,
    image: torch.Tensor,
    feats: torch.Tensor | None,
    perm_idx: torch.Tensor,
    generator: torch.Generator,
) -> dict[str, torch.Tensor]:
    """The three losses for one batch shuffled by permutations ``perm_idx``.

    ``feats`` are the frozen encoder's features of the unshuffled tiles when
    cached; the encoder is Siamese (per tile), so shuffling tiles shuffles
    their features identically and the cache stays valid.
    """
    cfg = model.config
    n = image.shape[0]
    perm_idx = perm_idx.to(image.device)  # drawn from the CPU generator
    perms = model.perms[perm_idx]  # type: ignore[index]  # (N, 9): slot i shows original tile perms[i]
    z_true = model.encode(model.tiles(image)) if feats is None else model.latent(feats)
    # The shuffled sequence the jigsaw head sees: slot i holds tile perms[i].
    z_shuffled = torch.gather(
        z_true, 1, perms.view(n, -1, 1, 1, 1).expand(-1, -1, *z_true.shape[2:])
    )
    codes = z_shuffled.mean((3, 4)).reshape(n, -1)  # pooled code per slot, in shuffled order
    l_jig = F.cross_entropy(model.jigsaw(codes), perm_idx)
    # SWD: codes of original tile k against samples of its prior T(nu, mu=k, sigma),
    # summed over tiles; tile numbers are 1-based (service.tiler).
    on = z_true if cfg.swd_on == "map" else z_true.mean((3, 4))
    flat = on.reshape(n, GRID * GRID, -1).transpose(0, 1)  # (9, N, D)
    proj = random_projections(flat.shape[-1], cfg.swd_projections, generator, flat.device)
    mu = (
        torch.arange(1, GRID * GRID + 1, dtype=flat.dtype, device=flat.device).view(-1, 1, 1)
        * cfg.prior_mu_step
    )
    prior = sample_student_t(flat.shape, cfg.prior_nu, mu, cfg.prior_sigma, generator)
    l_swd = sliced_wasserstein(flat, prior, proj) * (GRID * GRID)
    recon = model.decode(z_true)
    l_ae = F.mse_loss(recon, image)
    l_perc = (
        model.feature_error(image, recon).mean() if cfg.w_perceptual > 0 else l_ae.new_zeros(())
    )
    total = cfg.w_ae * l_ae + cfg.w_perceptual * l_perc + cfg.w_swd * l_swd + cfg.w_jigsaw * l_jig
    return {"total": total, "ae": l_ae, "perceptual": l_perc, "swd": l_swd, "jigsaw": l_jig}


def lr_at(cfg: PWAEConfig, progress: float) -> float:
    return cfg.lr / (1 + 10 * progress) ** 0.75


def images_per_epoch(config: PWAEConfig, n: int) -> int:
    """Images one epoch's steps see: whole batches only (the last, partial
    one is dropped), or all ``n`` where they are fewer than a batch."""
    return min(n, max(1, n // config.batch_size) * config.batch_size)


def progress_total(config: PWAEConfig, n: int) -> int:
    """Images :func:`fit` reports to ``progress`` over a whole training of
    ``n`` images: the frozen encoder's feature pass, every epoch's steps, and
    the pass that fits the per-pixel error statistics, so a bar ends at 100%."""
    features = n if config.freeze_encoder else 0
    statistics = n if config.error_normalisation == "zscore" else 0
    return features + config.epochs * images_per_epoch(config, n) + statistics


def fit(
    config: PWAEConfig,
    images: Sequence[torch.Tensor],
    progress: Callable[[int], object] | None = None,
    checkpoint: Path | None = None,
    stop_after_epoch: int | None = None,
    device: torch.device | str = "cpu",
    on_epoch: Callable[[dict[str, Any]], object] | None = None,
    on_stage: Callable[[str], object] | None = None,
    started: float | None = None,
) -> tuple[PWAE, dict[str, Any]]:
    """Train on defect-free images; deterministic under ``config.seed`` on CPU.

    With ``checkpoint``, the state is saved after every epoch and a run that
    finds one resumes from it, giving the same model as an uninterrupted run.
    The model is built on the CPU (the seed gives the same initial weights
    everywhere) and trained on ``device`` (model_export.device), where it is
    returned; every random draw comes from the CPU generator. ``on_epoch``
    gets each epoch's record: loss, images, seconds and images/s of its steps
    (after one of the frozen encoder's feature pass: ``stage`` "features", ``epoch`` 0).
    ``progress`` is told the images of every pass (:func:`progress_total` in
    all, the epochs a resumed run skips at once); ``on_stage`` hears of the
    passes that are not epochs. The checkpoint keeps the seconds training took
    up to its epoch, from ``started`` (time.perf_counter(); default: now) on,
    over every run that got it there; the log's ``seconds_before`` is what
    earlier runs spent (0 for a fresh start).
    """
    started = time.perf_counter() if started is None else started
    device = torch.device(device)
    torch.manual_seed(config.seed)
    model = PWAE(config).to(device)
    x_all = torch.stack(list(images)).to(device)
    feats_all: torch.Tensor | None = None
    if config.freeze_encoder:
        started = time.perf_counter()
        with torch.no_grad():
            tiles = model.tiles(x_all)
            chunks = []
            for t in tiles.split(16):
                chunks.append(model.encoder(t.reshape(-1, 3, TILE, TILE)))
                if progress is not None:
                    progress(len(t))
            feats_all = torch.cat(chunks).reshape(
                len(x_all), GRID * GRID, model.encoder.channels, model.cells, model.cells
            )
        if on_epoch is not None:  # the frozen encoder's features, computed once
            on_epoch(throughput(device, started, len(x_all), stage="features", epoch=0, epochs=0))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=config.lr, momentum=config.momentum)
    gen = torch.Generator().manual_seed(config.seed)
    steps_per_epoch = max(1, len(x_all) // config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    history: list[dict[str, float]] = []
    start_epoch = 0
    seconds_before = 0.0  # what earlier runs spent getting the checkpoint's epochs
    if checkpoint is not None and checkpoint.is_file():
        # Loaded on the CPU, whatever device wrote it: the weights and the
        # optimizer's state are copied onto the model's device, the generator stays.
        state = torch.load(checkpoint, map_location="cpu", weights_only=False)
        if state["config"] != config.to_dict():
            raise ValueError(
                f"{checkpoint} was written with another config; delete it to start afresh"
            )
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        gen.set_state(state["generator"])
        history = state["history"]
        start_epoch = state["epoch"]
        # States from before the seconds were kept: their epochs' own seconds.
        seconds_before = float(state.get("seconds", sum(h.get("seconds", 0.0) for h in history)))
        if progress is not None and start_epoch:  # the epochs done before, at once
            progress(start_epoch * images_per_epoch(config, len(x_all)))
    model.train()
    for epoch in range(start_epoch, config.epochs):
        started, seen = time.perf_counter(), 0
        order = torch.randperm(len(x_all), generator=gen)
        sums = {"total": 0.0, "ae": 0.0, "perceptual": 0.0, "swd": 0.0, "jigsaw": 0.0}
        for s in range(steps_per_epoch):
            idx = order[s * config.batch_size : (s + 1) * config.batch_size].to(device)
            for group in opt.param_groups:
                group["lr"] = lr_at(config, (epoch * steps_per_epoch + s) / total_steps)
            perm_idx = torch.randint(config.permutations, (len(idx),), generator=gen)
            feats = None if feats_all is None else feats_all[idx]
            parts = losses(model, x_all[idx], feats, perm_idx, gen)
            opt.zero_grad(set_to_none=True)
            parts["total"].backward()
            opt.step()
            for key, value in parts.items():
                sums[key] += value.item() / steps_per_epoch
            seen += len(idx)
            if progress is not None:
                progress(len(idx))
        record = throughput(device, started, seen, epoch=epoch + 1, epochs=config.epochs)
        history.append({"epoch": epoch + 1, **sums, **record})
        if on_epoch is not None:
            on_epoch({**record, "loss": sums["total"]})
        if checkpoint is not None:
            # Written aside and renamed: a run killed mid-save leaves the
            # previous epoch's state whole, never a torn file.
            partial = checkpoint.with_suffix(".partial")
            torch.save(
                {
                    "model": model.state_dict(),
                    "optimizer": opt.state_dict(),
                    "generator": gen.get_state(),
                    "history": history,
                    "epoch": epoch + 1,
                    "config": config.to_dict(),
                    "seconds": seconds_before + time.perf_counter() - started,
                },
                partial,
            )
            os.replace(partial, checkpoint)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            break
    model.eval()
    if config.error_normalisation == "zscore":
        if on_stage is not None:
            on_stage(
                f"fitting per-pixel error statistics on the {len(x_all)} images "
                "(once, after the epochs)"
            )
        model.fit_error_statistics(x_all, progress=progress)
    return model, {"history": history, "seconds_before": seconds_before}


def to_onnx(model: PWAE) -> bytes:
    """The contract graph: image -> image_error, tile_errors, anomaly_map; dynamic batch.

    Exported on the CPU whatever device the model was trained on (it is moved there).
    """
    import io

    model.cpu().eval()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE),),
        buf,  # type: ignore[arg-type]
        input_names=["image"],
        output_names=["image_error", "tile_errors", "anomaly_map"],
        dynamic_axes={
            "image": {0: "N"},
            "image_error": {0: "N"},
            "tile_errors": {0: "N"},
            "anomaly_map": {0: "N"},
        },
        opset_version=OPSET,
        dynamo=False,
    )
    return buf.getvalue()
