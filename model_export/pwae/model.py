"""The P-WAE module: tiles, Siamese encoder, latent maps, jigsaw head, decoder,
and the error maps computed inside the exported graph."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from model_export.backbones import Encoder, build_encoder
from model_export.blur import gaussian_kernel, separable_blur
from model_export.export import to_onnx as export_onnx
from model_export.pwae.config import GRID, IMAGE_SIZE, OPSET, TILE, ErrorSpace, PWAEConfig
from service import tiler


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


# The error spaces that compare the image with its reconstruction in pixels.
RECONSTRUCTS_PIXELS: set[ErrorSpace] = {"pixel", "feature"}


def grid_of(tile_maps: torch.Tensor) -> torch.Tensor:
    """Tile maps (N, 9, C, h, w), tiles row-major -> one map (N, C, 3h, 3w):
    the tiler's inverse, each tile's map in its place."""
    return tiler.from_tiles(tile_maps.permute(0, 2, 1, 3, 4), GRID, GRID)


def floored_spread(std: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviations floored at a thousandth of their mean,
    so a dead channel divides by no zero."""
    return std.clamp_min(1e-3 * float(std.mean()))


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
    # Buffer of error_feature_scale="channel": (C,) of the feature network.
    feature_scale: torch.Tensor
    # Buffer of the feature decoder: (C,) of the encoder.
    feature_target_scale: torch.Tensor

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
        # The feature space of the error, where one is used: frozen, ImageNet's
        # statistics kept. Built on a forked random state: building it draws
        # numbers, and where the error is measured must not change what is trained.
        self.perceptual: Encoder | None = None
        if config.error_space != "pixel" or config.w_perceptual > 0:
            with torch.random.fork_rng(devices=[]):
                self.perceptual = build_encoder(
                    config.error_backbone, IMAGE_SIZE, stride=config.error_feature_stride
                )
            self.perceptual.eval()
            for p in self.perceptual.parameters():
                p.requires_grad_(False)
            if config.error_feature_scale == "channel":
                # Set by fit_feature_scale() from the training images; saved with the weights.
                self.register_buffer("feature_scale", torch.ones(self.perceptual.channels))
        # The feature decoder of error_space "feature_reconstruction", and the
        # spread of each encoder channel its targets are divided by (set by
        # fit_feature_decoder(), saved with the weights). Built on a forked
        # random state, as the feature network is: the rest is initialised
        # as without it.
        self.feature_decoder: nn.Sequential | None = None
        if config.builds_feature_decoder():
            with torch.random.fork_rng(devices=[]):
                w = config.feature_decoder_width
                self.feature_decoder = nn.Sequential(
                    nn.Conv2d(c, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                    nn.Conv2d(w, w, 3, padding=1), nn.BatchNorm2d(w), nn.ReLU(inplace=True),
                    nn.Conv2d(w, self.encoder.channels, 1),
                )  # fmt: skip
            self.register_buffer("feature_target_scale", torch.ones(self.encoder.channels))
        kernel = gaussian_kernel(config.error_sigma) if config.error_sigma > 0 else torch.ones(1)
        self.register_buffer("kernel", kernel, persistent=False)
        if config.error_normalisation in ("zscore", "auto"):
            # Set by fit() from the training images (by settling, where
            # "auto"); saved with the weights.
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

    def features_and_latent(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Image (N, 3, 300, 300) -> the encoder's features and the latent, each
        tile's maps in its place on the grid: (N, C, 21, 21) and (N, c, 21, 21)."""
        n = image.shape[0]
        tiles = self.tiles(image)
        feats = self.encoder(tiles.reshape(n * GRID * GRID, 3, TILE, TILE))
        feats = feats.reshape(n, GRID * GRID, *feats.shape[1:])
        return grid_of(feats), grid_of(self.latent(feats))

    def feature_reconstruction_error(
        self, image: torch.Tensor, encoded: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Squared difference between the encoder's features of the image and
        the feature decoder's reconstruction of them from the latent, each
        channel in units of its spread, mean over channels, at image size:
        (N, 1, 300, 300). ``encoded``: the image's features_and_latent(),
        where they are at hand."""
        assert self.feature_decoder is not None, (
            "built only with error_space 'feature_reconstruction' or 'auto'"
        )
        feats, z = self.features_and_latent(image) if encoded is None else encoded
        target = feats / self.feature_target_scale.view(1, -1, 1, 1)
        err = ((self.feature_decoder(z) - target) ** 2).mean(1, keepdim=True)
        return F.interpolate(err, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Latent maps in true grid order (N, 9, c, h, w) -> image (N, 3, 300, 300)."""
        return self.decode_grid(grid_of(z))

    def decode_grid(self, z: torch.Tensor) -> torch.Tensor:
        """The latent grid (N, c, 21, 21) -> image (N, 3, 300, 300)."""
        out = self.decoder(z)
        return F.interpolate(
            out, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False
        )

    def feature_error(self, image: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
        """Squared feature difference, mean over channels, at image size: (N, 1, 300, 300)."""
        assert self.perceptual is not None, (
            "built only with error_space 'feature' or 'auto', or w_perceptual > 0"
        )
        diff = self.perceptual(image) - self.perceptual(recon)
        if self.config.error_feature_scale == "channel":
            diff = diff / self.feature_scale.view(1, -1, 1, 1)
        err = (diff**2).mean(1, keepdim=True)
        return F.interpolate(err, size=image.shape[-2:], mode="bilinear", align_corners=False)

    def normalise(self, raw: torch.Tensor) -> torch.Tensor:
        """Raw error maps (N, 300, 300) -> the anomaly maps, as configured."""
        if self.config.error_normalisation == "auto":
            raise ValueError(
                "error_normalisation='auto' is settled after training, on held-out images "
                "(model_export/pwae/error_space.py); this model's has not been"
            )
        if self.config.error_normalisation == "zscore":
            return F.relu((raw - self.error_mean) / self.error_std)
        return raw

    def errors(self, amap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anomaly maps (N, 300, 300) -> (e0 (N), e1..e9 (N, 9))."""
        reduce = tiler.tile_means if self.config.tile_error == "mean" else tiler.tile_maxima
        return amap.mean((1, 2)), reduce(amap, GRID, GRID)

    @torch.no_grad()
    def raw_error_maps(
        self,
        images: torch.Tensor,
        spaces: tuple[ErrorSpace, ...] | None = None,
        batch: int = 16,
        progress: Callable[[int], object] | None = None,
    ) -> dict[ErrorSpace, torch.Tensor]:
        """The raw error maps (N, 300, 300) of ``images`` in each of ``spaces``
        (the configured one by default), each image reconstructed once (where
        a space compares it with its reconstruction) on the model's device,
        the maps on the images' (``progress`` is told each batch's images)."""
        spaces = spaces or (self.error_space(),)
        device = self.kernel.device
        parts: dict[ErrorSpace, list[torch.Tensor]] = {space: [] for space in spaces}
        for x in images.split(batch):
            x_on = x.to(device)
            # The encoder runs once per batch, for every space.
            encoded = self.features_and_latent(x_on)
            recon = self.decode_grid(encoded[1]) if set(spaces) & RECONSTRUCTS_PIXELS else None
            for space in spaces:
                err = self.raw_error_map(x_on, space, encoded, recon)
                parts[space].append(err.to(x.device))
            if progress is not None:
                progress(len(x))
        return {space: torch.cat(maps) for space, maps in parts.items()}

    def fit_error_statistics(
        self,
        images: torch.Tensor,
        batch: int = 16,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """Per-pixel mean and floored std of the raw error map over ``images``
        (``progress`` is told each batch's images)."""
        (maps,) = self.raw_error_maps(images, batch=batch, progress=progress).values()
        self.set_error_statistics(maps)

    @torch.no_grad()
    def fit_feature_scale(
        self,
        images: torch.Tensor,
        batch: int = 16,
        progress: Callable[[int], object] | None = None,
    ) -> None:
        """error_feature_scale="channel": each feature channel's standard
        deviation over ``images``' features, every position (floored:
        :func:`floored_spread`)."""
        assert self.perceptual is not None and self.config.error_feature_scale == "channel"
        device = self.feature_scale.device
        n = 0
        total = torch.zeros(self.perceptual.channels, dtype=torch.float64, device=device)
        total_sq = torch.zeros_like(total)
        for x in images.split(batch):
            f = self.perceptual(x.to(device)).double()
            n += f.shape[0] * f.shape[2] * f.shape[3]
            total += f.sum((0, 2, 3))
            total_sq += (f**2).sum((0, 2, 3))
            if progress is not None:
                progress(len(x))
        mean = total / n
        std = (total_sq / n - mean**2).clamp_min(0).sqrt()
        self.feature_scale.copy_(floored_spread(std).float())

    def set_error_statistics(self, maps: torch.Tensor) -> None:
        """The z-score's per-pixel mean and floored std from raw error maps (N, 300, 300)."""
        std = maps.std(0)
        std = std.clamp_min(self.config.error_std_floor * float(std.mean()))
        mean = maps.mean(0)
        r = self.config.error_stat_radius
        if r > 0:  # the neighbourhood's largest: see PWAEConfig.error_stat_radius
            mean, std = (F.max_pool2d(m[None, None], 2 * r + 1, 1, r)[0, 0] for m in (mean, std))
        self.error_mean.copy_(mean)
        self.error_std.copy_(std)

    def raw_error_map(
        self,
        image: torch.Tensor,
        space: ErrorSpace | None = None,
        encoded: tuple[torch.Tensor, torch.Tensor] | None = None,
        recon: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-pixel squared error in ``space`` (the configured one by
        default), mean over channels, Gaussian-smoothed: (N, 300, 300).
        ``encoded`` (the image's features_and_latent()) and ``recon`` (its
        reconstruction) are made here where the space needs them and they
        are not given."""
        space = space or self.error_space()
        encoded = self.features_and_latent(image) if encoded is None else encoded
        if space == "feature_reconstruction":
            err = self.feature_reconstruction_error(image, encoded)
        else:
            recon = self.decode_grid(encoded[1]) if recon is None else recon
            if space == "feature":
                err = self.feature_error(image, recon)
            else:
                err = ((image - recon) ** 2).mean(1, keepdim=True)
        if self.config.error_sigma > 0:
            err = separable_blur(err, self.kernel, "reflect")  # type: ignore[arg-type]
        return err[:, 0]

    def error_space(self) -> ErrorSpace:
        """The space the error is measured in; "auto" must have been settled."""
        if self.config.error_space == "auto":
            raise ValueError(
                "error_space='auto' is settled after training, on held-out images "
                "(model_export/pwae/error_space.py); this model's has not been"
            )
        return self.config.error_space

    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """Image (N, 3, 300, 300) -> its reconstruction, tiles in their true order."""
        return self.decode(self.encode(self.tiles(image)))

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        amap = self.normalise(self.raw_error_map(image))
        e0, tiles = self.errors(amap)
        return e0, tiles, amap


def to_onnx(model: PWAE) -> bytes:
    """The contract graph (model_export/export.py), exported on the CPU
    whatever device the model was trained on (it is moved there)."""
    return export_onnx(model, OPSET, (IMAGE_SIZE, IMAGE_SIZE))
