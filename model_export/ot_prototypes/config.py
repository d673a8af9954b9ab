"""OT prototypes' hyper-parameters: one pydantic model, as every family's
config (model_export/pwae/config.py), written to checkpoints and metadata by
``to_dict`` and read back by ``from_dict``, which also takes what the
earlier dataclass config wrote."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from model_export.backbones import InputNormalisation, LiteName

IMAGE_SIZE = 300
OPSET = 18  # the lowest torch's exporter writes (model_export/export.py)

# Each scale taps the ends of EfficientNet-Lite stages (1-based, as in
# model_export.backbones.LITE_STAGES): stage 3 ends at stride 8, stage 5 at
# stride 16, stage 6 at stride 32 (on Lite0, blocks 4, 10 and 14: 40, 112 and
# 192 channels on 38x38, 19x19 and 10x10 grids for a 300x300 input). A
# scale's grid is its first tap's; the deeper taps are resized onto it and
# concatenated.
Scale = Literal["s8", "s16", "s32"]
SCALES: dict[str, tuple[int, ...]] = {
    "s8": (3, 5),  # Lite0: 152-d features on a 38x38 grid
    "s16": (5, 6),  # Lite0: 304-d features on a 19x19 grid
    "s32": (6,),  # Lite0: 192-d features on a 10x10 grid, each seeing about a third of the image
}


class MemberConfig(BaseModel):
    """One member of the ensemble: a feature scale and the weight of the spatial cost."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    scale: Scale = "s8"
    alpha: float = Field(0.0, ge=0.0, le=1.0)
    prototypes_per_position: int = Field(16, ge=1)

    def __init__(
        self, scale: str = "s8", alpha: float = 0.0, prototypes_per_position: int = 16
    ) -> None:
        # Positional too, as a member reads best: MemberConfig("s8", 0.5, 4).
        super().__init__(scale=scale, alpha=alpha, prototypes_per_position=prototypes_per_position)


# The first default (until 2026-12): two scales, global and local members.
# The fine scale keeps 4 prototypes per cell: 38*38*4 = 5776 prototypes, as
# many as the coarse scale's 19*19*16. Kept for configs that name no members
# (the earlier dataclass's way of asking for the default) and as a candidate.
FIRST_ENSEMBLE = (
    MemberConfig("s8", 0.0, 4),
    MemberConfig("s8", 0.5, 4),
    MemberConfig("s16", 0.0, 16),
    MemberConfig("s16", 0.5, 16),
)


def _default_members() -> tuple[MemberConfig, ...]:
    # The first ensemble and one global member on the deepest block, 256
    # prototypes per cell of its 10x10 grid (25,600): chosen on validation
    # among 16 candidates on the bottle and the magnetic tiles
    # (python -m model_export.ot_candidates; docs/ot-prototypes.md, "How the
    # settings were chosen"). A patch of the coarse grid sees about a third of
    # the image, which a part that does not sit at the same place in every
    # image (the tiles) needs.
    return (*FIRST_ENSEMBLE, MemberConfig("s32", 0.0, 256))


class OTPrototypesConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    members: tuple[MemberConfig, ...] = Field(default_factory=_default_members, min_length=1)
    # The frozen encoder, one of model_export.backbones' EfficientNet-Lites.
    # Lite2, not Lite0 (every version before bottle-otproto/5): chosen on
    # validation (held-out good images with synthetic defects; AUROC bottle
    # 0.892 against 0.878, magnetic tiles 0.780 against 0.764;
    # docs/ot-prototypes.md, "The backbone").
    backbone: LiteName = "efficientnet_lite2"
    # The backbone's own input, (x - 127) / 128 for every EfficientNet-Lite,
    # not ImageNet's mean/std: chosen on validation on Lite0 (held-out good
    # images with synthetic defects; AUROC bottle 0.992 against 0.979,
    # magnetic tiles 0.820 against 0.810 with ImageNet's; docs/ot-prototypes.md).
    input_normalisation: InputNormalisation = "backbone"
    # Entropic regularisation, in cost units (costs lie in [0, 1]), and the
    # iterations: the authors' 0.01 and 100, chosen with the members (the
    # first default had 0.05 and 30).
    epsilon: float = Field(0.01, gt=0)
    sinkhorn_iterations: int = Field(100, ge=1)
    # prototype <- ema * prototype + (1 - ema) * barycentre
    ema: float = Field(0.95, ge=0.0, lt=1.0)
    epochs: int = Field(1, ge=1)
    # 64 images' patches per batch (the authors' batch), not 4: with 256
    # prototypes per cell a problem of 4 images gives each prototype a
    # sixteenth of a patch, and its barycentre is an average of unrelated
    # patches (validation AUROC on the tiles 0.656 against 0.739 for that
    # member alone; docs/ot-prototypes.md).
    images_per_batch: int = Field(64, ge=1)
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
    smoothing_sigma: float = Field(4.0, ge=0)  # Gaussian blur of the 300x300 map, in pixels
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> OTPrototypesConfig:
        """The config ``to_dict`` wrote, or the earlier dataclass's ``asdict``
        (the same fields, members as a tuple of dicts). An empty list of
        members (the dataclass's way of asking for its default) is the
        ensemble that was the default then (FIRST_ENSEMBLE); no ``members``
        key at all, as the command line's defaults, is today's default. A
        whole config without ``backbone`` was written before it was a
        setting, on EfficientNet-Lite0."""
        raw = dict(raw)
        if "members" in raw and not raw["members"]:
            raw["members"] = FIRST_ENSEMBLE
        # A whole config from before the backbone was a setting (every field
        # but that one and, from the dataclass, input_normalisation, which
        # families.load_checkpoint settles) was fitted on EfficientNet-Lite0,
        # the only one then.
        missing = set(cls.model_fields) - set(raw)
        if "backbone" in missing and missing <= {"backbone", "input_normalisation"}:
            raw["backbone"] = "efficientnet_lite0"
        return cls.model_validate(raw)
