"""The model artifact contract, defined once.

A model version is a directory ``models/<name>/<version>/`` holding

* ``model.onnx``: input ``image`` (float32, N x 3 x H x W, already normalised as
  the metadata says) and outputs ``image_error`` (N), ``tile_errors``
  (N x rows*cols) and ``anomaly_map`` (N x H x W). The errors are computed
  inside the graph, so a server only compares them with thresholds.
* ``metadata.json``: :class:`ModelMetadata`, below, with ``onnx_sha256`` (the
  graph) and ``artifact_sha256`` (its own content, which holds onnx_sha256:
  the version's integrity, graph and metadata alike; service/artifact.py).
* optionally ``signature.json``: a signature over ``artifact_sha256``, which a
  server given a key requires (service/signing.py).

The trainer writes artifacts through :func:`service.artifact.write_artifact` and
the server reads them through :func:`service.artifact.load_artifact`, both on
this one model, so the two sides cannot drift.

Tile indexing (see :mod:`service.tiler`): tile 0 is the whole image; tiles
1..rows*cols run row-major, tile 1 top-left to tile 9 bottom-right on 3x3.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

FORMAT_VERSION = 1
MODEL_FILE = "model.onnx"
METADATA_FILE = "metadata.json"
# Optional, beside metadata.json: a signature over artifact_sha256 (service/signing.py).
SIGNATURE_FILE = "signature.json"

INPUT_NAME = "image"
OUTPUT_IMAGE_ERROR = "image_error"
OUTPUT_TILE_ERRORS = "tile_errors"
OUTPUT_ANOMALY_MAP = "anomaly_map"
OUTPUT_NAMES: tuple[str, str, str] = (OUTPUT_IMAGE_ERROR, OUTPUT_TILE_ERRORS, OUTPUT_ANOMALY_MAP)

# The model families, named once: here, because the server checks an
# artifact's family and must not import torch; the trainer's family registry
# (model_export/families.py) is keyed by these names and refuses to import
# where the two differ (tests/unit/test_family_registry.py).
ModelFamily = Literal["pwae", "ot_prototypes"]

Sha256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class _Frozen(BaseModel):
    # extra="forbid": a typo in a hand-edited metadata.json must fail loudly,
    # not silently fall back to a default.
    model_config = ConfigDict(frozen=True, extra="forbid")


class Normalization(_Frozen):
    """x_model = (x / scale_max - mean) / std, per RGB channel, x in [0, scale_max]."""

    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)

    @field_validator("std")
    @classmethod
    def _std_positive(cls, v: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError(f"std must be positive and finite, got {v}")
        return v


class PretrainedCfg(_Frozen):
    """A pretrained backbone's own input, as timm's ``pretrained_cfg`` records
    it: the normalisation, interpolation and input size its weights were
    trained with, where the weights come from and their licence.

    A family trains on the backbone's own normalisation or on ImageNet's,
    whichever its validation figures chose (model_export/backbones.py,
    ``input_normalisation`` in each family's config); the one it trained on is
    :attr:`InputSpec.normalization`, which the server applies, and this
    record says what the backbone itself expects, so an operator can see both.
    ``interpolation`` and ``input_size`` are the backbone's ImageNet training
    pipeline, kept for the record: the server resizes a camera image to the
    model's own input with :attr:`InputSpec.interpolation`.
    """

    name: str = Field(min_length=1)
    weights: str = Field(min_length=1, description="where the weights come from")
    licence: str = Field(min_length=1, description="the weights' licence")
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    interpolation: Literal["bilinear", "bicubic"]
    input_size: tuple[int, int, int] = Field(description="C, H, W it was trained at")

    def normalization(self) -> Normalization:
        return Normalization(mean=self.mean, std=self.std)


class InputSpec(_Frozen):
    """What the graph's ``image`` input expects: three channels, NCHW, float32, normalised.

    ``color`` is what the model was trained on: "RGB" models refuse
    single-channel images; "grey" models (trained on single-channel images)
    take the luma of colour images, and a grey image is replicated to the
    three channels the graph expects (service.preprocessing).
    """

    height: int = Field(300, ge=8)
    width: int = Field(300, ge=8)
    color: Literal["RGB", "grey"] = "RGB"
    layout: Literal["NCHW"] = "NCHW"
    # Area averaging when shrinking keeps thin defects (scratches) visible
    # instead of aliasing them away; linear when enlarging.
    interpolation: Literal["area"] = "area"
    normalization: Normalization = Normalization()


class TileGrid(_Frozen):
    rows: int = Field(3, ge=1)
    cols: int = Field(3, ge=1)

    @property
    def count(self) -> int:
        return self.rows * self.cols


class Thresholds(_Frozen):
    """eps0 for the whole image and eps1..epsK for the tiles, row-major.

    An image is defect-free only if e0 <= eps0 and every ek <= epsk.
    """

    eps0: float
    tiles: tuple[float, ...]

    @field_validator("eps0")
    @classmethod
    def _eps0_positive(cls, v: float) -> float:
        if not (v > 0 and math.isfinite(v)):
            raise ValueError(f"eps0 must be positive and finite, got {v}")
        return v

    @field_validator("tiles")
    @classmethod
    def _tiles_positive(cls, v: tuple[float, ...]) -> tuple[float, ...]:
        if not v:
            raise ValueError("tile thresholds are missing")
        bad = [i + 1 for i, t in enumerate(v) if not (t > 0 and math.isfinite(t))]
        if bad:
            raise ValueError(f"tile thresholds must be positive and finite; eps{bad} are not")
        return v

    @property
    def all(self) -> tuple[float, ...]:
        """(eps0, eps1, ..., epsK)."""
        return (self.eps0, *self.tiles)


CodecFormat = Literal["png", "jpeg", "bmp", "tiff"]


class Codec(_Frozen):
    """How the line's camera encodes its images: calibration passes its good
    images through the same codec, since JPEG artefacts raise the errors of
    every image and thresholds fitted on PNG reject JPEG-encoded good parts."""

    format: CodecFormat = "png"
    quality: int | None = Field(None, ge=1, le=100, description="JPEG quality, 1..100")

    @model_validator(mode="after")
    def _quality_is_jpeg_only(self) -> Codec:
        if self.quality is not None and self.format != "jpeg":
            raise ValueError(f"a quality is only meaningful for JPEG, not {self.format}")
        return self

    @classmethod
    def parse(cls, text: str) -> Codec:
        """``png``, ``jpeg:90`` (format, then the JPEG quality)."""
        fmt, _, quality = text.strip().lower().partition(":")
        fmt = {"jpg": "jpeg", "tif": "tiff"}.get(fmt, fmt)
        return cls.model_validate({"format": fmt, "quality": int(quality) if quality else None})

    def __str__(self) -> str:
        return self.format if self.quality is None else f"{self.format}:{self.quality}"


class Calibration(_Frozen):
    """How the thresholds were set: always on defect-free images the model was
    not fitted on (held out from train/good, or confirmed good on the line).

    The conformal method (service.calibration) gives a finite-sample promise
    on *new* good images, recorded here with what it rests on: each error is
    divided by its scale, the rule's score is the largest of these, and its
    threshold is an order statistic of the calibration images' scores;
    eps_k = score_threshold * scales[k]. Older artifacts lack the optional
    fields; they load, and their thresholds promise nothing beyond the
    held-out set.
    """

    method: str = Field(description="e.g. 'conformal-max-normalised-error'")
    target_fpr: float = Field(ge=0.0, le=1.0)
    achieved_fpr: float = Field(
        ge=0.0, le=1.0, description="share of the calibration images the rule rejects"
    )
    holdout_images: int = Field(ge=1, description="calibration images (distinct)")
    holdout_fraction: float | None = Field(
        None, gt=0.0, lt=1.0, description="of train/good; None for images from the line"
    )
    split_seed: int | None = None
    promised_fpr: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="bound on the expected false-reject rate on new good images (conformal)",
    )
    fpr_upper_90: float | None = Field(
        None,
        ge=0.0,
        le=1.0,
        description="false-reject rate not exceeded with 90% probability over calibration draws",
    )
    images_for_target: int | None = Field(
        None, ge=1, description="calibration images the target needs for a guarantee"
    )
    scales: tuple[float, ...] | None = Field(
        None, description="scale of e0..eK the rule's score divides by (from other images)"
    )
    score_threshold: float | None = Field(None, gt=0.0)
    reference_score: float | None = Field(
        None, ge=0.0, description="median rule score of the calibration images: drift baseline"
    )
    codec: Codec = Field(Codec(), description="what the calibration images were encoded as")
    source: Literal["holdout", "line"] = "holdout"
    calibrated_at: datetime | None = None
    operator: str | None = Field(None, max_length=200)
    images_sha256: Sha256 | None = Field(
        None, description="sha256 over the sorted hashes of the calibration images"
    )
    parent_version: int | None = Field(
        None, ge=1, description="the version whose graph this recalibration reuses"
    )

    @field_validator("scales")
    @classmethod
    def _scales_positive(cls, v: tuple[float, ...] | None) -> tuple[float, ...] | None:
        if v is not None and any(not (s > 0 and math.isfinite(s)) for s in v):
            raise ValueError(f"scales must be positive and finite, got {v}")
        return v


class TrainingData(_Frozen):
    dataset: str
    category: str
    train_images: int = Field(ge=1)
    fingerprint: Sha256 = Field(description="sha256 over the sorted names and bytes of the images")


class Evaluation(_Frozen):
    """Figures on the category's test split, which is never used for fitting."""

    split: str = "test"
    good_images: int = Field(ge=0)
    defective_images: int = Field(ge=0)
    metrics: dict[str, float] = Field(default_factory=dict)


class ModelMetadata(_Frozen):
    format_version: Literal[1] = 1
    family: ModelFamily
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    version: int = Field(ge=1)
    created_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    input: InputSpec = InputSpec()
    grid: TileGrid = TileGrid()
    thresholds: Thresholds
    calibration: Calibration
    training_data: TrainingData
    evaluation: Evaluation | None = None
    # The pretrained backbone's own input config; None for versions exported
    # before it was recorded. The server normalises as ``input`` says.
    backbone: PretrainedCfg | None = None
    opset: int = Field(ge=7)
    onnx_sha256: Sha256
    # sha256 over this metadata's content (this field left out), which holds
    # onnx_sha256: the version's integrity, graph and thresholds alike.
    # Written by service.artifact.write_metadata, checked by the loader,
    # which refuses a metadata without it (service/artifact.py, artifact_digest).
    artifact_sha256: Sha256 | None = None
    # Free-form, family-specific facts worth showing an operator (backbone,
    # latent size, ensemble members...). Never read by the server.
    model_info: dict[str, str | int | float | bool] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _grid_fits(self) -> ModelMetadata:
        if len(self.thresholds.tiles) != self.grid.count:
            raise ValueError(
                f"{len(self.thresholds.tiles)} tile thresholds for a "
                f"{self.grid.rows}x{self.grid.cols} grid (needs {self.grid.count})"
            )
        if self.input.height % self.grid.rows or self.input.width % self.grid.cols:
            raise ValueError(
                f"input {self.input.height}x{self.input.width} does not divide into a "
                f"{self.grid.rows}x{self.grid.cols} grid"
            )
        scales = self.calibration.scales
        if scales is not None and len(scales) != 1 + self.grid.count:
            raise ValueError(
                f"{len(scales)} calibration scales for e0 and {self.grid.count} tiles "
                f"(needs {1 + self.grid.count})"
            )
        return self
