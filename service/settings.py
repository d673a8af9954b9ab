"""Server settings: environment variables (prefix INSPECTION_) and an optional .env.

Built by the app factory or ``get_settings()``, never at import time, so a test
makes an app with exactly the settings it wants.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from service.artifact import DEFAULT_PROVIDERS
from service.preprocessing import DEFAULT_MAX_PIXELS

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = REPO_ROOT / "models" / "bottle-pwae"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="INSPECTION_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    model_dir: Path = Field(DEFAULT_MODEL_DIR, description="newest version under it is served")
    # Comma-separated in the environment. Execution providers in order of preference;
    # those this onnxruntime build lacks are skipped.
    providers: Annotated[tuple[str, ...], NoDecode] = DEFAULT_PROVIDERS
    intra_op_threads: int = Field(0, ge=0, description="0: onnxruntime's default")
    # Off: onnxruntime's threads sleep between ops instead of spinning, and
    # leave the cores to decoding and HTTP, which share them; on a 2-core CPU
    # that answered as many images per second for less CPU per image
    # (docs/performance.md).
    intra_op_spinning: bool = False
    # Dynamic batching, like Triton's: a batch closes when it is full or when
    # its first request has waited max_queue_delay_ms.
    # Unset: 8 where the model runs on a GPU provider, 1 on the CPU, where a
    # batch takes as long as its images one by one (service/batcher.py).
    max_batch_size: int | None = Field(None, ge=1)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue: int = Field(64, ge=1, description="images waiting; beyond it 503")
    max_batch_files: int = Field(32, ge=1, description="images in one /v1/inspect/batch")
    max_recalibration_files: int = Field(
        1000, ge=1, description="images in one POST /v1/models/recalibrate"
    )
    max_body_bytes: int = Field(50 * 2**20, ge=1024)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # Comma-separated; several keys at once allow rotation. Empty: no auth on /v1/*.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    admin_key: SecretStr | None = None
    log_level: str = "info"
    # Seconds a connection may sit idle between requests, and a request body
    # may take to arrive: a client sending one byte a second is cut off.
    keep_alive_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_s: float = Field(20.0, gt=0)
    # Seconds between looks for a newer version under model_dir (a
    # recalibration, a new training); 0: only SIGHUP or POST /v1/models/reload
    # swap models, as before.
    model_poll_s: float = Field(0.0, ge=0)
    # A good part whose rule score is at or above this fraction of the threshold
    # (1.0) counts as near it: a growing share of them is drift (docs/deployment.md).
    near_threshold: float = Field(0.8, gt=0, lt=1)

    @field_validator("providers", "api_keys", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(s.strip() for s in v.split(",") if s.strip())
        return v


def get_settings() -> Settings:
    return Settings()
