"""Reading and writing model versions that follow :mod:`service.contract`.

A model repository is laid out like Triton's::

    models/<name>/<version>/model.onnx
    models/<name>/<version>/metadata.json

with integer versions; the newest is the largest number. Every check here
fails with an :class:`ArtifactError` that names the file and what is wrong,
because the person reading it is an operator at a plant, not the author.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
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


def read_metadata(version_dir: Path | str) -> ModelMetadata:
    """Parse and validate ``metadata.json``; no hash check."""
    meta_path = Path(version_dir) / METADATA_FILE
    if not meta_path.is_file():
        raise ArtifactError(meta_path, "missing file")
    try:
        raw = json.loads(meta_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(meta_path, f"not valid JSON: {exc}") from exc
    try:
        return ModelMetadata.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(x) for x in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ArtifactError(meta_path, f"does not follow the contract: {problems}") from exc


def verify_files(version_dir: Path | str) -> ModelMetadata:
    """Metadata valid and ``model.onnx`` present with the recorded sha256."""
    version_dir = Path(version_dir)
    metadata = read_metadata(version_dir)
    model_path = version_dir / MODEL_FILE
    if not model_path.is_file():
        raise ArtifactError(model_path, "missing file")
    actual = sha256_file(model_path)
    if actual != metadata.onnx_sha256:
        raise ArtifactError(
            model_path,
            f"sha256 mismatch: metadata says {metadata.onnx_sha256}, file has {actual}",
        )
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


def load_artifact(
    path: Path | str,
    providers: Sequence[str] = DEFAULT_PROVIDERS,
    intra_op_threads: int = 0,
    intra_op_spinning: bool = True,
) -> LoadedArtifact:
    """Resolve, verify and open the newest model version under ``path``.

    Providers are tried in order (CUDA first by default) and silently skipped
    where this onnxruntime build lacks them; the one really in use is returned.
    """
    import onnxruntime as ort

    version_dir = resolve_version_dir(path)
    metadata = verify_files(version_dir)
    model_path = version_dir / MODEL_FILE
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    # Spinning keeps onnxruntime's idle threads busy-waiting for the next op:
    # the fastest for a process that does nothing else, and CPU stolen from
    # decoding and HTTP in a server that shares its cores with them.
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if intra_op_spinning else "0"
    )
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    try:
        session = ort.InferenceSession(
            str(model_path), sess_options=options, providers=available_providers(providers)
        )
    except Exception as exc:  # onnxruntime raises several private exception types
        raise ArtifactError(model_path, f"onnxruntime cannot load it: {exc}") from exc
    check_session_io(session, metadata, model_path)
    return LoadedArtifact(
        path=version_dir, metadata=metadata, session=session, provider=session.get_providers()[0]
    )


def write_artifact(version_dir: Path | str, model_onnx: bytes, metadata: ModelMetadata) -> Path:
    """Write a model version, filling in the hash, atomically.

    The files go to a temporary sibling first and are renamed into place, so a
    server scanning the repository for the newest version never sees half of one.
    """
    version_dir = Path(version_dir)
    if version_dir.exists():
        raise ArtifactError(version_dir, "already exists; versions are immutable")
    version_dir.parent.mkdir(parents=True, exist_ok=True)
    metadata = metadata.model_copy(update={"onnx_sha256": hashlib.sha256(model_onnx).hexdigest()})
    ModelMetadata.model_validate(metadata.model_dump())  # re-check after the update
    tmp = Path(tempfile.mkdtemp(prefix=f".{version_dir.name}-", dir=version_dir.parent))
    tmp.chmod(0o755)  # mkdtemp's 0700 would hide the version from a server running as another user
    try:
        (tmp / MODEL_FILE).write_bytes(model_onnx)
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2) + "\n", "utf-8")
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
