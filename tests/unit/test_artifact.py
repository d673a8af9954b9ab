"""The artifact loader refuses every broken model version with a message that
names the file and the problem; each case uses a real ONNX file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from service.artifact import (
    ArtifactError,
    load_artifact,
    next_version,
    read_metadata,
    resolve_version_dir,
    write_artifact,
)
from service.contract import METADATA_FILE, MODEL_FILE, ModelMetadata
from tests.helpers.onnx_models import colour_distance_model, metadata_for, write_toy_artifact


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return write_toy_artifact(tmp_path / "models")


def _edit_metadata(version_dir: Path, **changes: object) -> None:
    path = version_dir / METADATA_FILE
    raw = json.loads(path.read_text())
    for dotted, value in changes.items():
        node = raw
        *parents, leaf = dotted.split("__")
        for p in parents:
            node = node[p]
        node[leaf] = value
    path.write_text(json.dumps(raw))


def test_good_artifact_loads_and_runs(artifact: Path) -> None:
    loaded = load_artifact(artifact.parent)  # the model dir: newest version is chosen
    assert loaded.path == artifact
    assert loaded.provider == "CPUExecutionProvider"
    x = np.zeros((2, 3, 300, 300), np.float32)
    outs = dict(
        zip(
            [o.name for o in loaded.session.get_outputs()],
            loaded.session.run(None, {"image": x}),
            strict=True,
        )
    )
    assert outs["image_error"].shape == (2,)
    assert outs["tile_errors"].shape == (2, 9)
    assert outs["anomaly_map"].shape == (2, 300, 300)


@pytest.mark.parametrize(("spinning", "entry"), [(True, "1"), (False, "0")])
def test_intra_op_spinning_reaches_the_session(artifact: Path, spinning: bool, entry: str) -> None:
    loaded = load_artifact(artifact, intra_op_spinning=spinning)
    options = loaded.session.get_session_options()
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == entry


def test_metadata_round_trips_through_json(artifact: Path) -> None:
    meta = read_metadata(artifact)
    assert ModelMetadata.model_validate_json(meta.model_dump_json()) == meta


def test_missing_model_file(artifact: Path) -> None:
    (artifact / MODEL_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"model\.onnx: missing file"):
        load_artifact(artifact)


def test_missing_metadata_file(artifact: Path) -> None:
    (artifact / METADATA_FILE).unlink()
    with pytest.raises(ArtifactError, match=r"metadata\.json: missing file"):
        load_artifact(artifact)


def test_bad_json(artifact: Path) -> None:
    (artifact / METADATA_FILE).write_text("{not json")
    with pytest.raises(ArtifactError, match=r"metadata\.json: not valid JSON"):
        load_artifact(artifact)


def test_hash_mismatch(artifact: Path) -> None:
    model = artifact / MODEL_FILE
    model.write_bytes(model.read_bytes() + b"\0")
    with pytest.raises(ArtifactError, match=r"model\.onnx: sha256 mismatch"):
        load_artifact(artifact)


def test_wrong_output_names(tmp_path: Path) -> None:
    model = colour_distance_model(output_names=("score", "tile_errors", "anomaly_map"))
    version = write_artifact(tmp_path / "m" / "1", model, metadata_for(model))
    with pytest.raises(ArtifactError, match=r"model\.onnx: outputs are .*'score'"):
        load_artifact(version)


def test_wrong_input_size(tmp_path: Path) -> None:
    model = colour_distance_model(size=240)
    version = write_artifact(tmp_path / "m" / "1", model, metadata_for(model))
    with pytest.raises(
        ArtifactError, match=r"input 'image' has shape .*240.*expected \[N, 3, 300, 300\]"
    ):
        load_artifact(version)


def test_not_an_onnx_file(tmp_path: Path) -> None:
    junk = b"this is not a protobuf"
    version = write_artifact(tmp_path / "m" / "1", junk, metadata_for(junk))
    with pytest.raises(ArtifactError, match=r"model\.onnx: onnxruntime cannot load it"):
        load_artifact(version)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"thresholds__tiles": []}, "tile thresholds are missing"),
        ({"thresholds__eps0": 0.0}, "eps0 must be positive"),
        ({"thresholds__eps0": -1.0}, "eps0 must be positive"),
        ({"thresholds__tiles": [1.0] * 8 + [0.0]}, r"eps\[9\] are not"),
        ({"thresholds__tiles": [1.0] * 8}, "8 tile thresholds for a 3x3 grid"),
        ({"onnx_sha256": "xyz"}, "onnx_sha256"),
        ({"format_version": 2}, "format_version"),
        ({"unknown_field": 1}, "unknown_field"),
    ],
)
def test_invalid_metadata(artifact: Path, change: dict[str, object], message: str) -> None:
    _edit_metadata(artifact, **change)
    with pytest.raises(ArtifactError, match=r"metadata\.json: does not follow the contract") as err:
        load_artifact(artifact)
    assert err.match(message)


def test_thresholds_key_removed(artifact: Path) -> None:
    raw = json.loads((artifact / METADATA_FILE).read_text())
    del raw["thresholds"]
    (artifact / METADATA_FILE).write_text(json.dumps(raw))
    with pytest.raises(ArtifactError, match=r"thresholds: Field required"):
        load_artifact(artifact)


def test_resolve_picks_newest_numeric_version(tmp_path: Path) -> None:
    root = tmp_path / "models"
    for v in (1, 2, 10):
        write_toy_artifact(root, version=v)
    assert resolve_version_dir(root / "toy").name == "10"  # numeric, not lexical
    assert resolve_version_dir(root).name == "10"  # a repository with one model
    assert next_version(root / "toy") == 11
    assert next_version(root / "other") == 1


def test_resolve_refuses_ambiguous_repository(tmp_path: Path) -> None:
    write_toy_artifact(tmp_path, name="a")
    write_toy_artifact(tmp_path, name="b")
    with pytest.raises(ArtifactError, match="several models"):
        resolve_version_dir(tmp_path)


def test_resolve_missing_and_empty(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="does not exist"):
        resolve_version_dir(tmp_path / "nope")
    with pytest.raises(ArtifactError, match="no model version found"):
        resolve_version_dir(tmp_path)


def test_versions_are_immutable(artifact: Path) -> None:
    model = (artifact / MODEL_FILE).read_bytes()
    with pytest.raises(ArtifactError, match="already exists"):
        write_artifact(artifact, model, metadata_for(model))


def test_writer_fills_in_the_hash(tmp_path: Path) -> None:
    model = colour_distance_model()
    stale = metadata_for(model).model_copy(update={"onnx_sha256": "0" * 64})
    version = write_artifact(tmp_path / "m" / "1", model, stale)
    assert load_artifact(version).metadata.onnx_sha256 != "0" * 64
    assert not [p for p in version.parent.iterdir() if p.name.startswith(".")]  # no temp left
