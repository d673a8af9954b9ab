"""Request and response bodies of the HTTP API (one model per role)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

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


class InspectResponse(BaseModel):
    request_id: str = Field(examples=["5f0c0a3e9b7d4c1e8a2b6d4f1c3e5a7b"])
    model: ModelRef
    verdict: Verdict = Field(examples=["defective"])
    image: ImageResult
    tiles: list[TileResult]
    defective_tiles: list[int] = Field(description="tiles over threshold", examples=[[5]])
    batch_size: int = Field(description="images in the onnxruntime run", examples=[1])
    timings_ms: Timings
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
