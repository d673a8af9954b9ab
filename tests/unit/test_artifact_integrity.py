"""A version's integrity covers its graph and its metadata: an edited
metadata.json, a metadata without its digest, a version in another version's
folder are refused; a version re-written through the writer loads; and where
keys are configured, only versions with a valid signature load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from service.artifact import (
    ArtifactError,
    artifact_digest,
    load_artifact,
    read_metadata,
    verify_files,
    write_artifact,
    write_metadata,
)
from service.contract import METADATA_FILE, SIGNATURE_FILE
from service.recalibrate import main as recalibrate_main
from service.recalibration import recalibrate
from service.settings import Settings
from service.sign_artifact import main as sign_main
from service.signing import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
    HmacKey,
    SignatureVerifier,
    write_signature,
)
from tests.helpers.onnx_models import colour_distance_model, metadata_for, write_toy_artifact
from tests.helpers.synthetic import part_png

CHANGED = "metadata.json was changed after export; re-export or recalibrate with the tools"
HMAC_SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def artifact(tmp_path: Path) -> Path:
    return write_toy_artifact(tmp_path / "models")


def _raw(version_dir: Path) -> dict[str, Any]:
    raw: dict[str, Any] = json.loads((version_dir / METADATA_FILE).read_text())
    return raw


def _write_raw(version_dir: Path, raw: dict[str, Any], **dumps: Any) -> None:
    (version_dir / METADATA_FILE).write_text(json.dumps(raw, **dumps))


def _edit(version_dir: Path, path: tuple[str | int, ...], value: Any) -> None:
    raw = _raw(version_dir)
    node: Any = raw
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    _write_raw(version_dir, raw, indent=2)


# --- the digest -----------------------------------------------------------------------


def test_writer_stamps_the_digest_of_what_it_wrote(artifact: Path) -> None:
    raw = _raw(artifact)
    assert raw["artifact_sha256"] == artifact_digest(raw)
    assert load_artifact(artifact).metadata.artifact_sha256 == raw["artifact_sha256"]


def test_digest_is_over_content_without_itself() -> None:
    content = {"b": 1.5, "a": [1, 2], "artifact_sha256": "x"}
    same = {"a": [1, 2], "b": 1.5}
    assert artifact_digest(content) == artifact_digest(same)
    assert artifact_digest(content) != artifact_digest({"a": [1, 2], "b": 1.25})


def test_edited_eps0_is_refused(artifact: Path) -> None:
    _edit(artifact, ("thresholds", "eps0"), 99.0)
    with pytest.raises(ArtifactError, match=r"metadata\.json: " + CHANGED):
        load_artifact(artifact)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("thresholds", "tiles", 4), 99.0),
        (("calibration", "target_fpr"), 0.5),
        (("calibration", "operator"), "someone else"),
        (("calibration", "method"), "by eye"),
        (("input", "normalization", "mean", 0), 0.5),
        (("input", "color"), "grey"),
        (("name",), "other"),
        (("created_at",), "2020-01-01T00:00:00Z"),
        (("training_data", "fingerprint"), "1" * 64),
        (("evaluation",), {"good_images": 1, "defective_images": 1, "metrics": {}}),
        (("model_info", "note"), "added"),
        (("onnx_sha256",), "2" * 64),
        (("thresholds", "eps0"), 1),  # the same number written differently is still an edit
    ],
)
def test_any_other_edit_is_refused(artifact: Path, path: tuple[str | int, ...], value: Any) -> None:
    _edit(artifact, path, value)
    with pytest.raises(ArtifactError, match=CHANGED):
        load_artifact(artifact)


def test_removed_optional_key_is_refused(artifact: Path) -> None:
    raw = _raw(artifact)
    del raw["calibration"]["reference_score"]  # parses to its default, but it is an edit
    _write_raw(artifact, raw)
    with pytest.raises(ArtifactError, match=CHANGED):
        load_artifact(artifact)


def test_reformatting_is_not_an_edit(artifact: Path) -> None:
    raw = _raw(artifact)
    _write_raw(artifact, dict(reversed(list(raw.items()))), indent=None, separators=(",", ":"))
    assert load_artifact(artifact).metadata == read_metadata(artifact)


def test_missing_digest_is_refused_and_restamp_repairs_it(
    artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(artifact)
    del raw["artifact_sha256"]
    _write_raw(artifact, raw, indent=2)
    with pytest.raises(ArtifactError, match=r"json: carries no artifact_sha256.*--restamp"):
        load_artifact(artifact)
    assert sign_main(["--restamp", str(artifact)]) == 0
    assert "stamped artifact_sha256" in capsys.readouterr().out
    load_artifact(artifact)
    assert sign_main(["--restamp", str(artifact)]) == 0  # stamped already: nothing to do
    assert "already stamped" in capsys.readouterr().out


def test_restamp_does_not_launder_an_edit(
    artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(artifact, ("thresholds", "eps0"), 99.0)
    before = (artifact / METADATA_FILE).read_bytes()
    assert sign_main(["--restamp", str(artifact)]) == 2
    assert CHANGED in capsys.readouterr().err
    assert (artifact / METADATA_FILE).read_bytes() == before


def test_restamp_refuses_a_graph_that_does_not_match(
    artifact: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    raw = _raw(artifact)
    del raw["artifact_sha256"]
    raw["onnx_sha256"] = "3" * 64
    _write_raw(artifact, raw, indent=2)
    assert sign_main(["--restamp", str(artifact)]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    assert "artifact_sha256" not in _raw(artifact)


def test_rewritten_through_the_writer_is_accepted(artifact: Path) -> None:
    meta = read_metadata(artifact)
    new = meta.model_copy(update={"thresholds": meta.thresholds.model_copy(update={"eps0": 99.0})})
    written = write_metadata(artifact, new)
    loaded = load_artifact(artifact).metadata
    assert loaded.thresholds.eps0 == 99.0
    assert loaded.artifact_sha256 == written.artifact_sha256 != meta.artifact_sha256
    assert not [p for p in artifact.iterdir() if p.name.startswith(".")]  # no temp file left


# --- the folder -------------------------------------------------------------------------


def test_version_in_another_versions_folder_is_refused(artifact: Path) -> None:
    copy = artifact.parent / "2"
    shutil.copytree(artifact, copy)  # version 1 copied as "version 2", content untouched
    with pytest.raises(ArtifactError, match=r"2/metadata\.json: says version 1, but lies in .* 2"):
        load_artifact(artifact.parent)  # the newest folder is chosen and refused
    load_artifact(artifact)  # the original is fine


def test_writer_refuses_the_wrong_folder(tmp_path: Path) -> None:
    model = colour_distance_model()
    with pytest.raises(ArtifactError, match="folder of version 2, not 1"):
        write_artifact(tmp_path / "m" / "2", model, metadata_for(model, version=1))
    assert not (tmp_path / "m" / "2").exists()


def test_non_integer_folders_are_not_checked(tmp_path: Path) -> None:
    model = colour_distance_model()
    version = write_artifact(tmp_path / "staging", model, metadata_for(model, version=7))
    assert load_artifact(version).metadata.version == 7


# --- signatures -------------------------------------------------------------------------


@pytest.fixture
def hmac_key_file(tmp_path: Path) -> Path:
    path = tmp_path / "hmac.key"
    path.write_bytes(HMAC_SECRET + b"\n")  # as `openssl rand -hex 16 > hmac.key` writes it
    return path


@pytest.fixture
def ed25519_keys(tmp_path: Path) -> tuple[Path, Path]:
    key = Ed25519PrivateKey.generate()
    private, public = tmp_path / "release.pem", tmp_path / "release.pub.pem"
    private.write_bytes(key.private_pem())
    public.write_bytes(key.public_pem())
    return private, public


def _hmac(secret: bytes = HMAC_SECRET) -> SignatureVerifier:
    return SignatureVerifier((HmacKey(secret),))


def test_no_verifier_ignores_signatures(artifact: Path) -> None:
    (artifact / SIGNATURE_FILE).write_text("not even json")
    load_artifact(artifact)


def test_hmac_valid_signature_is_accepted(artifact: Path, hmac_key_file: Path) -> None:
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0
    record = json.loads((artifact / SIGNATURE_FILE).read_text())
    assert record["algorithm"] == "hmac-sha256"
    assert record["artifact_sha256"] == read_metadata(artifact).artifact_sha256
    assert load_artifact(artifact, verifier=_hmac()).path == artifact
    assert sign_main(["--check", str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0


def test_hmac_wrong_key_is_refused(artifact: Path, hmac_key_file: Path) -> None:
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0
    with pytest.raises(ArtifactError, match=r"signature\.json: the hmac-sha256 .* does not verify"):
        load_artifact(artifact, verifier=_hmac(b"another key, 16 bytes or more"))


def test_missing_signature_is_refused_when_a_key_is_configured(artifact: Path) -> None:
    with pytest.raises(ArtifactError, match=r"signature\.json: missing file.*sign_artifact"):
        load_artifact(artifact, verifier=_hmac())


def test_signature_of_an_earlier_content_is_refused(artifact: Path) -> None:
    meta = read_metadata(artifact)
    assert meta.artifact_sha256 is not None
    write_signature(artifact, meta.artifact_sha256, HmacKey(HMAC_SECRET))
    # Re-written through the writer (a valid digest), but not signed again.
    write_metadata(artifact, meta.model_copy(update={"model_info": {"note": "changed"}}))
    with pytest.raises(ArtifactError, match="changed after it was signed"):
        load_artifact(artifact, verifier=_hmac())


def test_edited_signed_metadata_is_refused_before_the_signature(
    artifact: Path, hmac_key_file: Path
) -> None:
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0
    _edit(artifact, ("thresholds", "eps0"), 99.0)
    with pytest.raises(ArtifactError, match=CHANGED):
        load_artifact(artifact, verifier=_hmac())


def test_tampered_signature_is_refused(artifact: Path, hmac_key_file: Path) -> None:
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0
    record = json.loads((artifact / SIGNATURE_FILE).read_text())
    record["signature"] = "AAAA" + record["signature"][4:]
    (artifact / SIGNATURE_FILE).write_text(json.dumps(record))
    with pytest.raises(ArtifactError, match="does not verify"):
        load_artifact(artifact, verifier=_hmac())
    (artifact / SIGNATURE_FILE).write_text("{")
    with pytest.raises(ArtifactError, match=r"signature\.json: not valid JSON"):
        load_artifact(artifact, verifier=_hmac())


def test_ed25519_valid_signature_is_accepted(
    artifact: Path, ed25519_keys: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    private, public = ed25519_keys
    assert sign_main([str(artifact), "--ed25519-private-key", str(private)]) == 0
    assert "ed25519 signature" in capsys.readouterr().out
    verifier = SignatureVerifier((Ed25519PublicKey.load(public),))
    assert load_artifact(artifact, verifier=verifier).path == artifact
    assert sign_main(["--check", str(artifact), "--ed25519-public-key", str(public)]) == 0


def test_ed25519_wrong_key_is_refused(artifact: Path, ed25519_keys: tuple[Path, Path]) -> None:
    private, _ = ed25519_keys
    assert sign_main([str(artifact), "--ed25519-private-key", str(private)]) == 0
    other = Ed25519PrivateKey.generate().public_key()
    with pytest.raises(ArtifactError, match=r"ed25519 signature .* does not verify"):
        load_artifact(artifact, verifier=SignatureVerifier((other,)))


def test_ed25519_missing_signature_is_refused(
    artifact: Path, ed25519_keys: tuple[Path, Path]
) -> None:
    _, public = ed25519_keys
    with pytest.raises(ArtifactError, match="missing file: this server serves only signed"):
        load_artifact(artifact, verifier=SignatureVerifier((Ed25519PublicKey.load(public),)))


def test_signature_of_the_other_kind_is_refused(
    artifact: Path, hmac_key_file: Path, ed25519_keys: tuple[Path, Path]
) -> None:
    _, public = ed25519_keys
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 0
    ed_only = SignatureVerifier((Ed25519PublicKey.load(public),))
    with pytest.raises(ArtifactError, match="signed with 'hmac-sha256', but this server checks"):
        load_artifact(artifact, verifier=ed_only)
    both = SignatureVerifier((Ed25519PublicKey.load(public), HmacKey(HMAC_SECRET)))
    load_artifact(artifact, verifier=both)  # either trusted key will do


def test_sign_refuses_an_edited_version(
    artifact: Path, hmac_key_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _edit(artifact, ("thresholds", "eps0"), 99.0)
    assert sign_main([str(artifact), "--hmac-key-file", str(hmac_key_file)]) == 2
    assert CHANGED in capsys.readouterr().err
    assert not (artifact / SIGNATURE_FILE).exists()


def test_short_hmac_key_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 16 bytes"):
        HmacKey(b"short")


def test_writer_and_recalibration_sign_as_they_write(tmp_path: Path) -> None:
    model = colour_distance_model()
    version = write_artifact(
        tmp_path / "toy" / "1", model, metadata_for(model), signer=HmacKey(HMAC_SECRET)
    )
    load_artifact(version, verifier=_hmac())
    parts = [part_png(seed) for seed in range(12)]
    result = recalibrate(version, parts, target_fpr=0.1, operator="op", signer=HmacKey(HMAC_SECRET))
    assert result.metadata.artifact_sha256 == _raw(result.version_dir)["artifact_sha256"]
    assert result.metadata.artifact_sha256 != read_metadata(version).artifact_sha256
    assert load_artifact(result.version_dir, verifier=_hmac()).metadata.version == 2


# --- settings ---------------------------------------------------------------------------


def test_settings_without_keys_check_no_signature() -> None:
    settings = Settings(artifact_hmac_key="", artifact_public_key="")
    assert settings.artifact_verifier() is None
    assert settings.artifact_signer() is None


def test_settings_build_the_verifier(
    artifact: Path, hmac_key_file: Path, ed25519_keys: tuple[Path, Path]
) -> None:
    private, public = ed25519_keys
    assert sign_main([str(artifact), "--ed25519-private-key", str(private)]) == 0
    pem = public.read_text()
    one_line = pem.strip().replace("\n", "\\n")  # as an env file holds it
    for key in (str(public), pem, one_line):  # a path or the PEM itself
        settings = Settings(artifact_public_key=key)
        verifier = settings.artifact_verifier()
        assert verifier is not None and verifier.algorithms == ["ed25519"]
        verify_files(artifact, verifier)
    hmac_only = Settings(artifact_hmac_key=HMAC_SECRET.decode())
    with pytest.raises(ArtifactError, match="signed with 'ed25519'"):
        verify_files(artifact, hmac_only.artifact_verifier())
    signer = hmac_only.artifact_signer()
    assert signer is not None and signer.key_id == HmacKey.from_file(hmac_key_file).key_id


def test_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch, ed25519_keys: tuple[Path, Path]
) -> None:
    _, public = ed25519_keys
    monkeypatch.setenv("INSPECTION_ARTIFACT_HMAC_KEY", HMAC_SECRET.decode())
    monkeypatch.setenv("INSPECTION_ARTIFACT_PUBLIC_KEY", str(public))
    verifier = Settings().artifact_verifier()
    assert verifier is not None and verifier.algorithms == ["ed25519", "hmac-sha256"]


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("artifact_hmac_key", "short", "at least 16 bytes"),
        ("artifact_public_key", "/no/such/key.pem", "neither PEM text nor an existing PEM file"),
        ("artifact_public_key", "-----BEGIN PUBLIC KEY-----\nxx\n-----END PUBLIC KEY-----\n",
         "not a PEM public key"),
    ],
)  # fmt: skip
def test_settings_refuse_bad_keys(field: str, value: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(**{field: value})  # type: ignore[arg-type]


def test_recalibrate_cli_signs_the_new_version(
    artifact: Path, hmac_key_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "good"
    images.mkdir()
    for seed in range(12):
        (images / f"part-{seed:02d}.png").write_bytes(part_png(seed))
    argv = ["--model-dir", str(artifact.parent), "--images", str(images), "--operator", "op"]
    assert recalibrate_main([*argv, "--hmac-key-file", str(hmac_key_file)]) == 0, (
        capsys.readouterr().err
    )
    assert load_artifact(artifact.parent, verifier=_hmac()).metadata.version == 2
    short = tmp_path / "short.key"
    short.write_text("short\n")
    assert recalibrate_main([*argv, "--hmac-key-file", str(short)]) == 2
    assert "at least 16 bytes" in capsys.readouterr().err
