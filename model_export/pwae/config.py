"""P-WAE's hyper-parameters (one pydantic model, as every family's config) and
its named recipes; model_export/pwae/__init__.py says why the defaults are what they are."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_export.backbones import BackboneName, InputNormalisation, LiteName

IMAGE_SIZE = 300
GRID = 3
TILE = IMAGE_SIZE // GRID
OPSET = 18

ErrorSpace = Literal["pixel", "feature", "feature_reconstruction"]
ErrorNormalisation = Literal["zscore", "none"]


class PWAEConfig(BaseModel):
    """Hyper-parameters; the paper's settings are the defaults where it gives them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: BackboneName = "efficientnet_lite0"
    backbone_weights: str | None = None  # ResNet-50 only: torchvision's state dict file
    # ImageNet's mean/std, not EfficientNet-Lite0's own (x - 127) / 128: chosen
    # on validation (held-out good images with synthetic defects; AUROC
    # bottle 0.946 against 0.945, magnetic tiles 0.699 against 0.609 with the
    # backbone's own; docs/pwae-experiments.md, "The backbone's own input").
    input_normalisation: InputNormalisation = "imagenet"
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
    # Each training step shows each image as it is or mirrored left-right,
    # drawn at random (the frozen encoder's features are cached for both
    # views); the served image is never mirrored. For parts whose mirror
    # image is still a good part.
    augment_hflip: bool = False
    batch_size: int = Field(8, ge=2)  # the SWD compares distributions: >= 2 codes per tile
    error_sigma: float = Field(4.0, ge=0)
    # Where the reconstruction error is measured. "pixel": the paper's L2 in
    # image space. "feature": L2 between frozen pretrained features of the
    # image and of its reconstruction, at error_feature_stride. "auto": the
    # one of the two with the higher validation AUROC on this category's
    # held-out images with synthetic defects, settled after training
    # (model_export/pwae/error_space.py). Neither wins everywhere: on
    # validation pixels lead on the bottle (0.826 against 0.780), features
    # on the magnetic tiles (0.730 against 0.640), whose blurry
    # reconstruction differs from the texture in every pixel but less in
    # what a deeper layer sees (docs/pwae-experiments.md, "Where the error
    # is measured"). "feature_reconstruction": the encoder's own features of
    # each tile against their reconstruction by a second decoder from the
    # same latent (feature_decoder_*), trained after the epochs on the
    # final latent; no pixel is reconstructed ("auto" weighs it too,
    # docs/pwae-experiments.md, "Reconstructing the encoder's features").
    error_space: ErrorSpace | Literal["auto"] = "auto"
    # The feature decoder of "feature_reconstruction" (built where
    # error_space is "auto" too): two 3x3 convolutions of this width on the
    # latent grid, then a 1x1 to the encoder's channels, each channel's
    # target standardised by its spread over the training images. Trained
    # with Adam (lr 1e-3, batches of 16) for this many epochs after the
    # latent's, whose weights it does not change: the pixel decoder and the
    # other error spaces are the same to the last digit with or without it.
    feature_decoder_width: int = Field(128, ge=1)
    feature_decoder_epochs: int = Field(40, ge=1)
    # The feature error's tap: the end of the stride-8 or stride-16 stage of
    # error_backbone (on Lite1, blocks 6 or 14: 40 or 112 channels).
    error_feature_stride: Literal[8, 16] = 16
    # The frozen network the feature error is measured with, apart from the
    # encoder. Lite1, not Lite0 (the encoder's): chosen on validation by
    # rescoring the default trainings (magnetic tiles 0.730 and 0.741 against
    # 0.713 and 0.730 on two draws of synthetic defects, bottle 0.815 and
    # 0.791 against 0.812 and 0.780; docs/pwae-experiments.md).
    error_backbone: LiteName = "efficientnet_lite1"
    # "channel": each feature channel's difference is divided by that
    # channel's standard deviation over the training images' features (all
    # positions) before the mean over channels, so the few channels with
    # large activations do not outweigh the rest (a Mahalanobis distance
    # with a diagonal covariance). "none": the plain squared difference,
    # kept on validation (magnetic tiles 0.726 and 0.735 against 0.727 and
    # 0.737; docs/pwae-experiments.md, "The feature error's form"). The
    # scales are fitted after the epochs, so a training loss on features
    # (w_perceptual) sees the difference unscaled.
    error_feature_scale: Literal["none", "channel"] = "none"
    # "zscore": each pixel's error is standardised by the mean and standard
    # deviation of that pixel's error over the training images, then clipped
    # at 0 (errors below the usual are no defect, and the thresholds must be
    # positive). The parts on a line are aligned, so where the reconstruction
    # is always poor (the glass rim's fine texture) stops hiding the pixels
    # where it is poor only on this part. "none" is the paper's raw error.
    # "auto": settled after training with the error space: of the
    # candidates within 0.01 of the best validation AUROC, the one whose
    # threshold rejects the fewest held-out good parts when the line changes
    # a little (model_export/pwae/error_space.py, model_export/line_changes.py).
    # The z-score is what made a 5% dimmer lamp reject every held-out good
    # bottle; without it the tiles lose 0.046 of validation AUROC
    # (docs/pwae-experiments.md, "When the line changes a little").
    error_normalisation: ErrorNormalisation | Literal["auto"] = "auto"
    # Floor of the per-pixel std, as a fraction of its image mean: a pixel
    # whose error barely varied over the training images (flat background,
    # a steady highlight) must not blow up the change a good part brings
    # when the line changes a little (a lamp 5% dimmer, the part 3 px off).
    # At 1 no pixel's std is below the image's mean one; at 0.01 (until
    # 2026-12-02) a 5% dimmer lamp rejected every held-out good bottle
    # (docs/pwae-experiments.md, "When the line changes a little").
    error_std_floor: float = Field(1.0, gt=0)
    # Radius in pixels over which each pixel's mean and std are the largest
    # in their neighbourhood: a part a few pixels off where the training
    # parts sat (a fixture's play, a lens knocked) moves its usual errors
    # (the rim, the edges) onto pixels whose own statistics never saw them.
    # 0: each pixel's own statistics. Measured on validation and not adopted:
    # it held the line's small changes no better than the floor
    # (docs/pwae-experiments.md, "When the line changes a little").
    error_stat_radius: int = Field(0, ge=0)
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

    def builds_feature_decoder(self) -> bool:
        """Whether the model has a feature decoder: for the error space that
        needs it, or one "auto" may settle on."""
        return self.error_space in ("auto", "feature_reconstruction")

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> PWAEConfig:
        """The config ``to_dict`` wrote, or settings over the defaults. A
        whole config written before a setting existed (every field but
        those in _SINCE) takes the value it was trained with then."""
        raw = dict(raw)
        missing = set(cls.model_fields) - set(raw)
        if missing and missing <= set(_SINCE):
            backbone = raw.get("backbone", "efficientnet_lite0")
            for key in missing:
                raw[key] = _SINCE[key](backbone)
        return cls.model_validate(raw)


# Fields added since the feature error became a setting, and what a whole
# config written before each meant, given its encoder: the feature error at
# stride 8 (the only tap then), no mirroring, and measured with the encoder's
# own EfficientNet-Lite (Lite0 beside a ResNet-50).
_SINCE: dict[str, Callable[[str], Any]] = {
    "error_feature_stride": lambda _: 8,
    "augment_hflip": lambda _: False,
    "error_backbone": lambda b: "efficientnet_lite0" if b == "resnet50" else b,
    "error_feature_scale": lambda _: "none",
    # Never used by a config written before: its error space was never
    # "feature_reconstruction", and an "auto" one was settled before it was saved.
    "feature_decoder_width": lambda _: 128,
    "feature_decoder_epochs": lambda _: 40,
    "error_stat_radius": lambda _: 0,
}


# The defaults are the recipe chosen on held-out images with synthetic
# defects (model_export/validation.py, docs/pwae-experiments.md). PAPER is the
# recipe as the paper gives it: the prior matched on the whole latent, the raw
# pixel L2 error, tile means, with the latent size (which the paper does not
# give) of the first P-WAE version (docs/pwae-experiments.md). FEATURE_ERROR is
# the first feature-space experiment: the paper's recipe, the error at stride 8.
PAPER = PWAEConfig(
    latent_channels=8,
    swd_on="map",
    error_space="pixel",
    error_normalisation="none",
    tile_error="mean",
)
FEATURE_ERROR = PAPER.model_copy(
    update={
        "error_space": "feature",
        "error_feature_stride": 8,
        "error_backbone": "efficientnet_lite0",
    }
)
