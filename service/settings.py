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
from service.image_header import DEFAULT_MAX_PIXELS  # no OpenCV: see service/__main__.py
from service.signing import Ed25519PublicKey, HmacKey, SignatureVerifier, VerifyKey, pem_bytes

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
    # batch takes as long as its images one by one (service/batch_shapes.py).
    max_batch_size: int | None = Field(None, ge=1)
    # The batch sizes run, comma-separated (e.g. 1,2,4,8); a batch is padded
    # up to the next. Empty: powers of two up to max_batch_size on a GPU
    # provider, every size up to it on the CPU.
    batch_sizes: Annotated[tuple[Annotated[int, Field(ge=1)], ...], NoDecode] = ()
    # One onnxruntime session per batch size, each seeing one input shape only
    # (a shape change costs the CUDA provider up to a second). Unset: on GPU
    # providers only.
    session_per_size: bool | None = None
    # Batches run at once, each on its own thread. More than one can raise a
    # GPU's throughput where one batch leaves it idle between runs (measure:
    # bench/http_load.py); on the CPU one already uses every core.
    inference_streams: int = Field(1, ge=1, le=8)
    max_queue_delay_ms: float = Field(2.0, ge=0)
    max_queue: int = Field(64, ge=1, description="images waiting; beyond it 503")
    # Threads that decode and resize images (OpenCV releases the GIL while it
    # works); 0: one per core this process may use.
    decode_threads: int = Field(0, ge=0)
    max_batch_files: int = Field(32, ge=1, description="images in one /v1/inspect/batch")
    max_recalibration_files: int = Field(
        1000, ge=1, description="images in one POST /v1/models/recalibrate"
    )
    max_body_bytes: int = Field(50 * 2**20, ge=1024)
    max_pixels: int = Field(DEFAULT_MAX_PIXELS, ge=1)
    # Bytes of memory the decodes in flight may hold together, each as its
    # header says it will (service/decode_budget.py): beyond it a request
    # waits up to decode_wait_s, then is answered 503 decode_busy; an image
    # needing more than all of it, 413 decode_too_large. Unset: 16 bytes a
    # pixel of max_pixels (640 MB at the default).
    decode_memory_bytes: int | None = Field(None, ge=1)
    decode_wait_s: float = Field(2.0, ge=0)
    # Comma-separated; several keys at once allow rotation. Empty: no auth on /v1/*.
    api_keys: Annotated[tuple[SecretStr, ...], NoDecode] = ()
    admin_key: SecretStr | None = None
    log_level: str = "info"
    # One JSON line per request (logger service.access): method, route, status,
    # duration, model version, request id, client address and key_id, the
    # first 8 hex digits of the key's SHA-256 (never the key itself).
    access_log: bool = True
    # Seconds a connection may sit idle between requests, and a request body
    # may take to arrive: a client sending one byte a second is cut off.
    keep_alive_s: float = Field(5.0, gt=0)
    read_timeout_s: float = Field(30.0, gt=0)
    graceful_shutdown_s: float = Field(20.0, gt=0)
    # Seconds from a connection's start, or the end of its last answer, in
    # which a request's headers must arrive; later, the connection is closed
    # (408 if part of a request came). 0: no deadline (uvicorn's default).
    header_timeout_s: float = Field(10.0, ge=0)
    # Open connections at most; beyond, a new one closes the connection that
    # has waited longest for its headers, or is answered 503 if every one is
    # busy with a request. 0: no cap.
    max_connections: int = Field(1000, ge=0)
    # On SIGTERM: seconds to go on serving, /readyz answering 503 draining,
    # before the listener closes and the requests in flight finish (up to
    # graceful_shutdown_s). 0: close at once, as before.
    drain_s: float = Field(5.0, ge=0)
    # Seconds between looks for a newer version under model_dir (a
    # recalibration, a new training); 0: only SIGHUP or POST /v1/models/reload
    # swap models, as before.
    model_poll_s: float = Field(0.0, ge=0)
    # A good part whose rule score is at or above this fraction of the threshold
    # (1.0) counts as near it: a growing share of them is drift (docs/deployment.md).
    near_threshold: float = Field(0.8, gt=0, lt=1)
    # Signed model versions (service/signing.py, docs/deployment.md): with a key
    # set, a version without a valid signature.json beside its metadata.json is
    # refused; with both, a signature by either is accepted. Empty: unset.
    artifact_hmac_key: SecretStr | None = Field(None, description="shared secret, >= 16 bytes")
    # An ed25519 public key: PEM text, or the path of a PEM file (read once, here).
    artifact_public_key: str | None = None

    @field_validator("providers", "api_keys", "batch_sizes", mode="before")
    @classmethod
    def _comma_separated(cls, v: object) -> object:
        if isinstance(v, str):
            return tuple(s.strip() for s in v.split(",") if s.strip())
        return v

    @field_validator("artifact_hmac_key")
    @classmethod
    def _hmac_key(cls, v: SecretStr | None) -> SecretStr | None:
        if v is None or not v.get_secret_value():
            return None
        HmacKey(v.get_secret_value().encode())  # too short: ValueError, with the reason
        return v

    @field_validator("artifact_public_key")
    @classmethod
    def _public_key(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        pem = pem_bytes(v.strip())
        Ed25519PublicKey.load(pem)  # not an ed25519 public key: ValueError, with the reason
        return pem.decode("ascii")

    def artifact_verifier(self) -> SignatureVerifier | None:
        """The keys a version must be signed with; None: signatures are not checked."""
        keys: list[VerifyKey] = []
        if self.artifact_public_key:
            keys.append(Ed25519PublicKey.load(self.artifact_public_key))
        if self.artifact_hmac_key:
            keys.append(HmacKey(self.artifact_hmac_key.get_secret_value().encode()))
        return SignatureVerifier(tuple(keys)) if keys else None

    def artifact_signer(self) -> HmacKey | None:
        """What versions the server writes itself (recalibration) are signed
        with: the HMAC key, which signs as well as verifies. A server trusting
        an ed25519 key holds no private key, so its versions need signing."""
        if self.artifact_hmac_key:
            return HmacKey(self.artifact_hmac_key.get_secret_value().encode())
        return None


def get_settings() -> Settings:
    return Settings()
