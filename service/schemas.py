"""Request and response bodies of the HTTP API (one model per role)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from service.codec import same_codec
from service.contract import Codec

Verdict = Literal["defect_free", "defective"]


class ModelRef(BaseModel):
    name: str = Field(examples=["bottle-pwae"])
    version: int = Field(examples=[1])
    family: str = Field(examples=["pwae"])


class ImageResult(BaseModel):
    error: float = Field(description="e0, the whole image's error", examples=[0.21])
    threshold: float = Field(description="eps0", examples=[0.35])
    score: float = Field(description="error / threshold; above 1 is defective", examples=[0.6])


class TileResult(BaseModel):
    tile: int = Field(ge=1, description="1..9, row-major from the top-left", examples=[5])
    error: float = Field(examples=[0.52])
    threshold: float = Field(examples=[0.4])
    score: float = Field(examples=[1.3])
    defective: bool = Field(examples=[True])


class Timings(BaseModel):
    decode: float = Field(description="decode, resize, normalise (ms)", examples=[3.1])
    queue: float = Field(description="waiting for a batch (ms)", examples=[0.4])
    inference: float = Field(description="onnxruntime time of the batch (ms)", examples=[28.0])
    total: float = Field(description="request received to answer ready (ms)", examples=[33.0])


class InputInfo(BaseModel):
    """How the posted image was encoded, against what the thresholds were calibrated for."""

    format: str = Field(description="png, jpeg, bmp or tiff", examples=["jpeg"])
    jpeg_quality: int | None = Field(
        None,
        description="libjpeg quality read from the JPEG's tables (None: unknown)",
        examples=[85],
    )
    calibrated_for: str = Field(
        description="the codec the thresholds were calibrated on", examples=["jpeg:90"]
    )
    matches_calibration: bool = Field(
        description="same format (and, for JPEG, a quality within 5): the thresholds apply as "
        "calibrated",
        examples=[True],
    )

    @classmethod
    def judge(cls, seen: Codec | None, calibrated: Codec) -> InputInfo:
        return cls(
            format=seen.format if seen is not None else "unknown",
            jpeg_quality=seen.quality if seen is not None else None,
            calibrated_for=str(calibrated),
            matches_calibration=same_codec(seen, calibrated),
        )


class InspectResponse(BaseModel):
    request_id: str = Field(examples=["5f0c0a3e9b7d4c1e8a2b6d4f1c3e5a7b"])
    model: ModelRef
    verdict: Verdict = Field(examples=["defective"])
    image: ImageResult
    tiles: list[TileResult]
    defective_tiles: list[int] = Field(description="tiles over threshold", examples=[[5]])
    batch_size: int = Field(description="images in the onnxruntime run", examples=[1])
    timings_ms: Timings
    input: InputInfo
    heatmap_png_base64: str | None = Field(
        None, description="with ?heatmap=true: the overlay PNG, base64-encoded"
    )


class ErrorDetail(BaseModel):
    reason: str = Field(description="machine-readable", examples=["truncated"])
    message: str = Field(examples=["the PNG has no end chunk (file cut off?)"])


class ErrorResponse(BaseModel):
    error: ErrorDetail
    request_id: str | None = None


class BatchItem(BaseModel):
    index: int = Field(description="position in the request, from 0")
    filename: str | None = None
    result: InspectResponse | None = None
    error: ErrorDetail | None = None


class BatchResponse(BaseModel):
    request_id: str
    results: list[BatchItem]


class ModelInfo(BaseModel):
    name: str
    version: int
    family: str
    provider: str = Field(description="onnxruntime execution provider in use")
    path: str
    metadata: dict[str, object] = Field(description="the artifact's metadata.json")


class Health(BaseModel):
    status: str = Field(examples=["ok"])


class RecalibrationSummary(BaseModel):
    images: int = Field(description="distinct good images calibrated on", examples=[200])
    duplicates_dropped: int = Field(description="exact duplicates among the files", examples=[0])
    parent_version: int = Field(description="the version whose graph was reused", examples=[3])
    codec: str = Field(description="recorded codec of the line's images", examples=["jpeg:90"])
    codec_mix: dict[str, int] = Field(
        default_factory=dict, description="detected codec -> images, when no codec was given"
    )
    target_fpr: float = Field(examples=[0.01])
    promised_fpr: float = Field(
        description="bound on the expected false-reject rate on new good parts", examples=[0.005]
    )
    fpr_upper_90: float = Field(
        description="false-reject rate not exceeded with 90% probability", examples=[0.019]
    )
    images_for_target: int = Field(description="images the target needs", examples=[99])
    warning: str | None = Field(None, description="why the target cannot be promised")
    old_thresholds: list[float] = Field(description="eps0..epsK of the parent")
    new_thresholds: list[float] = Field(description="eps0..epsK of the new version")


class RecalibrationResponse(BaseModel):
    model: ModelInfo = Field(description="the model in service after the reload")
    calibration: RecalibrationSummary
