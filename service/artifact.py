"""Reading and writing model versions that follow :mod:`service.contract`.

A model repository is laid out like Triton's::

    models/<name>/<version>/model.onnx
    models/<name>/<version>/metadata.json

with integer versions; the newest is the largest number. Every check here
fails with an :class:`ArtifactError` that names the file and what is wrong,
because the person reading it is an operator at a plant, not the author.

A version's integrity covers its graph and its metadata alike: metadata.json
records the sha256 of model.onnx (``onnx_sha256``) and a digest of its own
content (``artifact_sha256``, :func:`artifact_digest`), written by the one
writer, :func:`write_metadata`. The loader refuses a version whose graph or
metadata changed after it was written, whose metadata lacks the digest, or
whose folder is not its version's number; given a
:class:`service.signing.SignatureVerifier`, also one without a valid signature.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from service.contract import (
    INPUT_NAME,
    METADATA_FILE,
    MODEL_FILE,
    OUTPUT_ANOMALY_MAP,
    OUTPUT_IMAGE_ERROR,
    OUTPUT_NAMES,
    OUTPUT_TILE_ERRORS,
    ModelMetadata,
)
from service.signing import SignatureError, SignatureVerifier, Signer, write_signature

DEFAULT_PROVIDERS: tuple[str, ...] = ("CUDAExecutionProvider", "CPUExecutionProvider")


class ArtifactError(Exception):
    """A model version that cannot be served, and why."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _version_dirs(parent: Path) -> list[Path]:
    return sorted(
        (p for p in parent.iterdir() if p.is_dir() and p.name.isdigit()),
        key=lambda p: int(p.name),
    )


def resolve_version_dir(path: Path | str) -> Path:
    """The newest version under ``path``.

    ``path`` may be a version directory itself, a model directory holding
    integer versions, or a repository holding exactly one model.
    """
    path = Path(path)
    if not path.is_dir():
        raise ArtifactError(path, "model directory does not exist")
    if (path / METADATA_FILE).exists() or (path / MODEL_FILE).exists():
        return path
    versions = _version_dirs(path)
    if versions:
        return versions[-1]
    models = [p for p in sorted(path.iterdir()) if p.is_dir() and _version_dirs(p)]
    if len(models) == 1:
        return _version_dirs(models[0])[-1]
    if not models:
        raise ArtifactError(path, "no model version found (expected <name>/<version>/model.onnx)")
    names = ", ".join(p.name for p in models)
    raise ArtifactError(path, f"holds several models ({names}); point at one of them")


DIGEST_FIELD = "artifact_sha256"


def artifact_digest(content: Mapping[str, Any]) -> str:
    """A version's integrity: sha256 over its metadata's content, the digest field left out.

    ``content`` is metadata.json's JSON object as parsed from the file (or as
    :func:`write_metadata` is about to write it). Canonical form: the object
    without ``artifact_sha256``, serialised by ``json.dumps(..., sort_keys=True,
    separators=(",", ":"), ensure_ascii=True)``, hashed as bytes (a NaN, which
    the writer never writes, hashes as Python writes it, and so mismatches).
    The content holds ``onnx_sha256``, which the loader checks against
    model.onnx, so this one digest covers the graph and every field of the
    metadata: thresholds, calibration record, name, version, everything.

    The digest is over the file's own content, not over
    ``ModelMetadata.model_dump()``: a later contract that adds an optional
    field, or a pydantic release that writes a datetime differently, would
    change the dump of every version already on disk, and with it its digest,
    while the file itself did not change. Key order and whitespace are not
    content, so a reformatted metadata.json still loads; any changed value
    (``2`` for ``2.0`` too) does not.

    It is stored in metadata.json itself (not a sidecar) because it describes
    that file's content, travels with it when a version is copied, and shows in
    ``GET /v1/models``. A sha256 anyone can recompute catches an edit, not a
    forger; plants that need the latter sign the digest (service/signing.py).
    """
    body = {k: v for k, v in content.items() if k != DIGEST_FIELD}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(canonical.encode("ascii")).hexdigest()


def _read_metadata(version_dir: Path | str) -> tuple[dict[str, Any], ModelMetadata]:
    """metadata.json's parsed JSON object and the validated model."""
    meta_path = Path(version_dir) / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(meta_path, "missing file")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(meta_path, f"not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ArtifactError(meta_path, "does not follow the contract: not a JSON object")
    try:
        return raw, ModelMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ArtifactError(meta_path, f"does not follow the contract: {problems}") from exc


def read_metadata(version_dir: Path | str) -> ModelMetadata:
    """Parse and validate ``metadata.json``; no hash check (:func:`verify_files` checks)."""
    return _read_metadata(version_dir)[1]


def _check_digest(meta_path: Path, raw: Mapping[str, Any], metadata: ModelMetadata) -> str:
    recorded = metadata.artifact_sha256
    if recorded is None:
        raise ArtifactError(
            meta_path,
            f"carries no {DIGEST_FIELD}, so nothing shows it unchanged since export (it was "
            "written before the digest covered the metadata, or by hand); re-export or "
            "recalibrate with the tools, or re-stamp a version you trust as it is with "
            f"`python -m service.sign_artifact --restamp {meta_path.parent}`",
        )
    actual = artifact_digest(raw)
    if actual != recorded:
        raise ArtifactError(
            meta_path,
            "metadata.json was changed after export; re-export or recalibrate with the tools "
            "(model_export, python -m service.recalibrate, python -m "
            "model_export.calibrate_artifact) instead of editing it (its content hashes to "
            f"{actual[:12]}..., its {DIGEST_FIELD} says {recorded[:12]}...)",
        )
    return recorded


def check_version_folder(version_dir: Path | str, metadata: ModelMetadata) -> None:
    """An integer folder holds the version of its number (a copied or renamed
    version would otherwise be served as another)."""
    meta_path = Path(version_dir) / METADATA_FILE
    folder = meta_path.parent.name
    if folder.isdigit() and int(folder) != metadata.version:
        raise ArtifactError(
            meta_path,
            f"says version {metadata.version}, but lies in the folder of version {folder}; "
            "a version is served from the folder of its own number: move it back, or "
            "re-export or recalibrate with the tools instead of copying a version",
        )


def check_graph(version_dir: Path, metadata: ModelMetadata) -> None:
    """``model.onnx`` is present and has the sha256 the metadata records."""
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(model_path, "missing file")
    actual = sha256_file(model_path)
    if actual != metadata.onnx_sha256:
        raise ArtifactError(
            model_path,
            f"sha256 mismatch: metadata says {metadata.onnx_sha256}, file has {actual}",
        )


def verify_files(
    version_dir: Path | str, verifier: SignatureVerifier | None = None
) -> ModelMetadata:
    """Metadata valid and unchanged since it was written (``artifact_sha256``),
    in the folder of its version, ``model.onnx`` present with the recorded
    sha256, and, given a verifier, a valid ``signature.json``."""
    version_dir = Path(version_dir)
    meta_path = version_dir / METADATA_FILE
    raw, metadata = _read_metadata(version_dir)
    digest = _check_digest(meta_path, raw, metadata)
    check_version_folder(version_dir, metadata)
    check_graph(version_dir, metadata)
    if verifier is not None:
        try:
            verifier.verify(version_dir, digest)
        except SignatureError as exc:
            raise ArtifactError(exc.path, exc.problem) from exc
    return metadata


def _dims(shape: Sequence[Any]) -> list[int | None]:
    # onnxruntime reports symbolic dimensions as strings and unknown ones as None.
    return [d if isinstance(d, int) else None for d in shape]


def _fits(actual: list[int | None], expected: list[int | None]) -> bool:
    if len(actual) != len(expected):
        return False
    return all(e is None or a is None or a == e for a, e in zip(actual, expected, strict=True))


def check_session_io(session: Any, metadata: ModelMetadata, model_path: Path) -> None:
    """The graph's inputs and outputs are the contract's, with fitting shapes."""
    h, w, k = metadata.input.height, metadata.input.width, metadata.grid.count
    inputs = session.get_inputs()
    if [i.name for i in inputs] != [INPUT_NAME]:
        raise ArtifactError(
            model_path,
            f"inputs are {[i.name for i in inputs]}, the contract wants ['{INPUT_NAME}']",
        )
    (inp,) = inputs
    if inp.type != "tensor(float)":
        raise ArtifactError(model_path, f"input '{INPUT_NAME}' is {inp.type}, not tensor(float)")
    if not _fits(_dims(inp.shape), [None, 3, h, w]):
        raise ArtifactError(
            model_path, f"input '{INPUT_NAME}' has shape {inp.shape}, expected [N, 3, {h}, {w}]"
        )

    outputs = {o.name: o for o in session.get_outputs()}
    if sorted(outputs) != sorted(OUTPUT_NAMES):
        raise ArtifactError(
            model_path,
            f"outputs are {sorted(outputs)}, the contract wants {sorted(OUTPUT_NAMES)}",
        )
    expected: dict[str, list[int | None]] = {
        OUTPUT_IMAGE_ERROR: [None],
        OUTPUT_TILE_ERRORS: [None, k],
        OUTPUT_ANOMALY_MAP: [None, h, w],
    }
    for name, shape in expected.items():
        out = outputs[name]
        if out.type != "tensor(float)":
            raise ArtifactError(model_path, f"output '{name}' is {out.type}, not tensor(float)")
        if not _fits(_dims(out.shape), shape):
            raise ArtifactError(
                model_path, f"output '{name}' has shape {out.shape}, expected {shape} (N first)"
            )


@dataclass(frozen=True)
class LoadedArtifact:
    """A verified model version with its onnxruntime session."""

    path: Path
    metadata: ModelMetadata
    session: Any  # onnxruntime.InferenceSession; Any keeps mypy off ORT's untyped API
    provider: str


def available_providers(requested: Sequence[str]) -> list[str]:
    """The requested execution providers this onnxruntime build has, in order."""
    import onnxruntime as ort

    have = set(ort.get_available_providers())
    chosen = [p for p in requested if p in have]
    return chosen or ["CPUExecutionProvider"]


def open_session(
    model_path: Path,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    intra_op_spinning: bool = True,
    fixed_dims: Mapping[str, int] | None = None,
) -> Any:
    """An onnxruntime session on ``model_path`` with the server's options.

    Providers are tried in order (CUDA first by default) and silently skipped
    where this onnxruntime build lacks them. ``fixed_dims`` pins symbolic
    dimensions (the batch ``N``) to a size: onnxruntime then folds the
    graph's shape computations away (P-WAE: 178 nodes to 100), nodes that
    the CUDA provider would otherwise run on the CPU between GPU kernels.
    """
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Spinning keeps onnxruntime's idle threads busy-waiting for the next op:
    # the fastest for a process that does nothing else, and CPU stolen from
    # decoding and HTTP in a server that shares its cores with them.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if intra_op_spinning else "0"
    )
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    for name, size in (fixed_dims or {}).items():
        options.add_free_dimension_override_by_name(name, size)
    try:
        return ort.InferenceSession(
            str(model_path), sess_options=options, providers=available_providers(providers)
        )
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ArtifactError(model_path, f"onnxruntime cannot load it: {exc}") from exc


def load_artifact(
    path: Path | str,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    intra_op_spinning: bool = True,
    verifier: SignatureVerifier | None = None,
) -> LoadedArtifact:
    """Resolve, verify and open the newest model version under ``path``.

    The provider really in use (the first of ``providers`` this build has) is
    returned with the session. Given a ``verifier`` (the server's, from
    ``Settings.artifact_verifier()``), only a signed version loads.
    """
    version_dir = resolve_version_dir(path)
    metadata = verify_files(version_dir, verifier)
    model_path = version_dir / MODEL_FILE
    session = open_session(model_path, providers, intra_op_threads, intra_op_spinning)
    check_session_io(session, metadata, model_path)
    return LoadedArtifact(
        path=version_dir, metadata=metadata, session=session, provider=session.get_providers()[0]
    )


def write_metadata(
    version_dir: Path | str, metadata: ModelMetadata, signer: Signer | None = None
) -> ModelMetadata:
    """Write ``metadata.json`` with its ``artifact_sha256``: the one way metadata is written.

    Export, recalibration and calibrate_artifact all write through
    :func:`write_artifact`, which writes through here, so every version carries
    its digest; re-stamping a version written before the digest existed is
    re-writing its metadata through here (``python -m service.sign_artifact
    --restamp``). With a ``signer``, ``signature.json`` is written too. The
    file is replaced atomically; the metadata as written is returned.
    """
    version_dir = Path(version_dir)
    digest = artifact_digest(json.loads(metadata.model_dump_json()))
    stamped = metadata.model_copy(update={DIGEST_FIELD: digest})
    text = stamped.model_dump_json(indent=2) + "\n"
    if artifact_digest(json.loads(text)) != digest:  # what the loader will compute
        raise ArtifactError(version_dir / METADATA_FILE, "does not read back as written")
    fd, tmp = tempfile.mkstemp(prefix=f".{METADATA_FILE}-", dir=version_dir)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
        os.replace(tmp, version_dir / METADATA_FILE)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if signer is not None:
        write_signature(version_dir, digest, signer)
    return stamped


def write_artifact(
    version_dir: Path | str,
    model_onnx: bytes,
    metadata: ModelMetadata,
    signer: Signer | None = None,
) -> Path:
    """Write a model version, filling in the hashes, atomically.

    The files go to a temporary sibling first and are renamed into place, so a
    server scanning the repository for the newest version never sees half of
    one, nor one whose signature (given a ``signer``) is still to come.
    """
    version_dir = Path(version_dir)
    if version_dir.exists():
        raise ArtifactError(version_dir, "already exists; versions are immutable")
    if version_dir.name.isdigit() and int(version_dir.name) != metadata.version:
        raise ArtifactError(
            version_dir, f"is the folder of version {version_dir.name}, not {metadata.version}"
        )
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata.model_copy(update={"onnx_sha256": hashlib.sha256(model_onnx).hexdigest()})
    ModelMetadata.model_validate(metadata.model_dump())  # re-check after the update
    tmp = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}-", dir=version_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    try:
        (tmp / MODEL_FILE).write_bytes(model_onnx)
        write_metadata(tmp, metadata, signer)
        os.replace(tmp, version_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return version_dir


def next_version(model_dir: Path | str) -> int:
    """1 + the largest version under ``models/<name>/``, 1 for a new model."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return 1
    versions = _version_dirs(model_dir)
    return int(versions[-1].name) + 1 if versions else 1
