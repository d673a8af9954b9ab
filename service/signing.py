"""Optional signatures over model versions, for plants that want to know who
released a version, not only that nobody edited it since.

``artifact_sha256`` in metadata.json (:func:`service.artifact.artifact_digest`)
binds the thresholds, the calibration record and the graph's sha256 together,
so a hand edit of ``metadata.json`` is refused. But anyone who can write the
file can also recompute a sha256: the digest is evidence of an accidental or
careless edit, not a defence against a deliberate one. A signature is: it
cannot be made without the key. Where the server is given a key
(``INSPECTION_ARTIFACT_HMAC_KEY`` and/or ``INSPECTION_ARTIFACT_PUBLIC_KEY``,
service/settings.py), it serves only versions with a valid signature.

The signature lives in a file of its own, ``signature.json`` beside
metadata.json, rather than inside it: a file cannot carry a signature over
itself without a second exclusion rule, and a version can be signed (or
signed again with a new key) after it was written without changing its
content or its digest::

    {"algorithm": "ed25519", "key_id": "3f2a...", "artifact_sha256": "<hex>",
     "signature": "<base64>"}

What is signed is the ASCII bytes ``MESSAGE_PREFIX + artifact_sha256`` (the
prefix keeps a signature made here from meaning anything elsewhere a key is
used). ``artifact_sha256`` and ``key_id`` in the file are for the operator's
messages only; the loader checks the signature against the digest it
computed itself.

Two kinds of key:

* ``ed25519`` (recommended): the server holds only the public key, so whoever
  can read or change the server's settings still cannot sign; the private key
  stays with whoever releases versions. Needs the ``cryptography`` package.
* ``hmac-sha256``: one shared secret (at least 16 bytes) that signs and
  verifies alike; simplest, but every holder of it, the server included, can
  sign.

Signing is ``python -m service.sign_artifact`` (and ``--sign-*`` of
``inspection-recalibrate``). This module imports nothing from the rest of
the service but the contract; :mod:`service.artifact` turns its
:class:`SignatureError` into an ArtifactError.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

from service.contract import SIGNATURE_FILE

HMAC_SHA256 = "hmac-sha256"
ED25519 = "ed25519"
ALGORITHMS = (ED25519, HMAC_SHA256)
MESSAGE_PREFIX = b"inline-inspection artifact_sha256 v1:"
MIN_HMAC_KEY_BYTES = 16


class SignatureError(Exception):
    """A signature that is missing, malformed or does not verify, and why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def signed_message(artifact_sha256: str) -> bytes:
    """The bytes a version's signature is over."""
    return MESSAGE_PREFIX + artifact_sha256.encode("ascii")


class Signer(Protocol):
    algorithm: ClassVar[str]

    @property
    def key_id(self) -> str: ...

    def sign(self, message: bytes) -> bytes: ...


class VerifyKey(Protocol):
    algorithm: ClassVar[str]

    @property
    def key_id(self) -> str: ...

    def verify(self, message: bytes, signature: bytes) -> bool: ...


@dataclass(frozen=True)
class HmacKey:
    """A shared secret: signs and verifies."""

    secret: bytes = field(repr=False)
    algorithm: ClassVar[str] = HMAC_SHA256

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_HMAC_KEY_BYTES:
            raise ValueError(
                f"an HMAC key needs at least {MIN_HMAC_KEY_BYTES} bytes "
                f"(this one has {len(self.secret)}); make one with `openssl rand -hex 32`"
            )

    @classmethod
    def from_file(cls, path: Path | str) -> HmacKey:
        """The file's bytes, a trailing newline dropped (as `openssl rand -hex 32 >` writes)."""
        return cls(Path(path).read_bytes().rstrip(b"\r\n"))

    @property
    def key_id(self) -> str:
        # Derived through the HMAC itself, so naming the key reveals nothing of it.
        return hmac.new(self.secret, b"key-id", hashlib.sha256).hexdigest()[:16]

    def sign(self, message: bytes) -> bytes:
        return hmac.new(self.secret, message, hashlib.sha256).digest()

    def verify(self, message: bytes, signature: bytes) -> bool:
        return hmac.compare_digest(self.sign(message), signature)


def _raw_public(public_key: Any) -> bytes:
    from cryptography.hazmat.primitives import serialization

    raw: bytes = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return raw


def pem_bytes(pem_or_path: str | bytes | Path) -> bytes:
    """PEM text as it is, or the content of the file it names."""
    if isinstance(pem_or_path, bytes):
        return pem_or_path
    if isinstance(pem_or_path, str) and "-----BEGIN" in pem_or_path:
        # One line with literal \n for the line breaks, as an env file holds it.
        return pem_or_path.replace("\\n", "\n").encode("ascii")
    path = Path(pem_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"{path}: neither PEM text nor an existing PEM file")
    return path.read_bytes()


class Ed25519PublicKey:
    """Verifies; what a server holds."""

    algorithm: ClassVar[str] = ED25519

    def __init__(self, key: Any) -> None:
        self._key = key

    @classmethod
    def load(cls, pem_or_path: str | bytes | Path) -> Ed25519PublicKey:
        """From PEM text (``-----BEGIN PUBLIC KEY-----``) or a PEM file's path."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PublicKey as _Public,
        )
        from cryptography.hazmat.primitives.serialization import load_pem_public_key

        data = pem_bytes(pem_or_path)
        try:
            key = load_pem_public_key(data)
        except ValueError as exc:
            raise ValueError(f"not a PEM public key: {exc}") from exc
        if not isinstance(key, _Public):
            raise ValueError(f"an ed25519 public key is needed, this is {type(key).__name__}")
        return cls(key)

    @property
    def key_id(self) -> str:
        return hashlib.sha256(_raw_public(self._key)).hexdigest()[:16]

    def verify(self, message: bytes, signature: bytes) -> bool:
        from cryptography.exceptions import InvalidSignature

        try:
            self._key.verify(signature, message)
        except InvalidSignature:
            return False
        return True


class Ed25519PrivateKey:
    """Signs; stays with whoever releases versions, never on the server."""

    algorithm: ClassVar[str] = ED25519

    def __init__(self, key: Any) -> None:
        self._key = key

    @classmethod
    def load(cls, path: Path | str, password: bytes | None = None) -> Ed25519PrivateKey:
        """From a PEM file (``openssl genpkey -algorithm ed25519 -out key.pem``)."""
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey as _Private,
        )
        from cryptography.hazmat.primitives.serialization import load_pem_private_key

        try:
            key = load_pem_private_key(Path(path).read_bytes(), password=password)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{path}: not a usable PEM private key: {exc}") from exc
        if not isinstance(key, _Private):
            raise ValueError(f"{path}: an ed25519 private key is needed, not {type(key).__name__}")
        return cls(key)

    @classmethod
    def generate(cls) -> Ed25519PrivateKey:
        from cryptography.hazmat.primitives.asymmetric.ed25519 import (
            Ed25519PrivateKey as _Private,
        )

        return cls(_Private.generate())

    def private_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        pem: bytes = self._key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        return pem

    def public_pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        pem: bytes = self._key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        return pem

    def public_key(self) -> Ed25519PublicKey:
        return Ed25519PublicKey(self._key.public_key())

    @property
    def key_id(self) -> str:
        return self.public_key().key_id

    def sign(self, message: bytes) -> bytes:
        signature: bytes = self._key.sign(message)
        return signature


def write_signature(version_dir: Path | str, artifact_sha256: str, signer: Signer) -> Path:
    """Sign ``artifact_sha256`` and write ``signature.json`` into ``version_dir``,
    atomically (a reader sees the old file or the new one). The caller has
    checked that ``artifact_sha256`` is the version's (service.artifact)."""
    version_dir = Path(version_dir)
    signature = signer.sign(signed_message(artifact_sha256))
    record = {
        "algorithm": signer.algorithm,
        "key_id": signer.key_id,
        "artifact_sha256": artifact_sha256,
        "signature": base64.b64encode(signature).decode("ascii"),
    }
    path = version_dir / SIGNATURE_FILE
    fd, tmp = tempfile.mkstemp(prefix=f".{SIGNATURE_FILE}-", dir=version_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(json.dumps(record, indent=2) + "\n")
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _read_signature(path: Path) -> tuple[str, str, str, bytes]:
    """(algorithm, key_id, artifact_sha256, signature) from ``signature.json``."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SignatureError(path, f"not valid JSON: {exc}") from exc
    if not isinstance(record, dict) or not all(
        isinstance(record.get(k), str) for k in ("algorithm", "artifact_sha256", "signature")
    ):
        raise SignatureError(
            path, "not a signature file: needs the strings algorithm, artifact_sha256, signature"
        )
    try:
        signature = base64.b64decode(record["signature"], validate=True)
    except (binascii.Error, ValueError) as exc:
        raise SignatureError(path, f"signature is not base64: {exc}") from exc
    key_id = record.get("key_id")
    return (
        record["algorithm"],
        key_id if isinstance(key_id, str) else "?",
        record["artifact_sha256"],
        signature,
    )


@dataclass(frozen=True)
class SignatureVerifier:
    """The keys a server trusts; a version must carry a signature one of them verifies."""

    keys: Sequence[VerifyKey]

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("a signature verifier needs at least one key")

    @property
    def algorithms(self) -> list[str]:
        return sorted({k.algorithm for k in self.keys})

    def verify(self, version_dir: Path | str, artifact_sha256: str) -> None:
        """Raise :class:`SignatureError` unless ``version_dir`` carries a valid
        signature over ``artifact_sha256`` (the digest the loader computed)."""
        version_dir = Path(version_dir)
        path = version_dir / SIGNATURE_FILE
        how = " or ".join(self.algorithms)
        if not path.is_file():
            raise SignatureError(
                path,
                f"missing file: this server serves only signed versions ({how}); sign this one "
                f"with `python -m service.sign_artifact {version_dir} ...` (docs/deployment.md)",
            )
        algorithm, key_id, signed_sha, signature = _read_signature(path)
        keys = [k for k in self.keys if k.algorithm == algorithm]
        if not keys:
            raise SignatureError(
                path, f"signed with {algorithm!r}, but this server checks {how} signatures"
            )
        if signed_sha != artifact_sha256:
            raise SignatureError(
                path,
                f"signs artifact_sha256 {signed_sha[:12]}..., but the version's is "
                f"{artifact_sha256[:12]}...: it changed after it was signed; "
                "check the change, then sign it again",
            )
        message = signed_message(artifact_sha256)
        if not any(k.verify(message, signature) for k in keys):
            trusted = ", ".join(k.key_id for k in keys)
            raise SignatureError(
                path,
                f"the {algorithm} signature (key id {key_id}) does not verify with the key "
                f"this server trusts (key id {trusted}): signed with another key, or altered",
            )
