"""Recalibration on line images (service/recalibration.py, service/recalibrate.py)
on a real small ONNX graph: a new version with the parent's graph, new
thresholds and an honest record; the parent untouched."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import pytest

from service.artifact import load_artifact, read_metadata, write_artifact
from service.calibration import METHOD, conformal_thresholds, rule_flags
from service.contract import METADATA_FILE, MODEL_FILE, Codec, Evaluation, ModelMetadata
from service.recalibrate import main as cli_main
from service.recalibration import (
    MIN_IMAGES,
    ImageRefused,
    RecalibrationError,
    images_fingerprint,
    recalibrate,
    recalibrated_metadata,
    score_images,
)
from tests.helpers.onnx_models import colour_distance_model, metadata_for, write_toy_artifact
from tests.helpers.synthetic import encode, good_image, part_png

N = 24


@pytest.fixture(scope="module")
def parts() -> list[bytes]:
    return [part_png(seed) for seed in range(N)]


@pytest.fixture
def parent(tmp_path: Path) -> Path:
    return write_toy_artifact(tmp_path / "models", name="toy", version=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_writes_next_version_with_same_graph_and_new_record(
    parent: Path, parts: list[bytes]
) -> None:
    parent_meta_bytes = (parent / METADATA_FILE).read_bytes()
    parent_onnx = _sha(parent / MODEL_FILE)
    result = recalibrate(parent, parts, target_fpr=0.05, operator="J. Smith")

    assert result.version_dir == parent.parent / "2"
    # The graph is shared exactly; the new version loads and verifies.
    assert _sha(result.version_dir / MODEL_FILE) == parent_onnx
    new = load_artifact(result.version_dir).metadata
    old = read_metadata(parent)
    assert new.onnx_sha256 == old.onnx_sha256 == parent_onnx
    assert new.version == 2 and new.name == old.name
    assert new.thresholds.all != old.thresholds.all
    assert new.training_data == old.training_data and new.model_info == old.model_info
    assert new.created_at > old.created_at
    cal = new.calibration
    assert cal.method == METHOD
    assert cal.source == "line" and cal.operator == "J. Smith" and cal.parent_version == 1
    assert cal.holdout_images == N and cal.holdout_fraction is None and cal.split_seed is None
    assert cal.images_sha256 == images_fingerprint(parts)
    assert cal.target_fpr == 0.05
    assert cal.promised_fpr == pytest.approx(1 - 24 / 25)  # k = ceil(25 * 0.95) = 24
    assert cal.promised_fpr is not None and cal.fpr_upper_90 is not None
    assert cal.fpr_upper_90 > cal.promised_fpr
    assert cal.images_for_target == 19
    assert cal.score_threshold is not None and cal.reference_score is not None
    assert cal.codec == Codec(format="png")
    assert cal.calibrated_at is not None and cal.calibrated_at.tzinfo is not None
    # eps_k = t * scale_k, the rule's threshold on the normalised score.
    assert cal.scales is not None
    np.testing.assert_allclose(
        new.thresholds.all, np.asarray(cal.scales) * cal.score_threshold, rtol=1e-9
    )
    assert new.evaluation is None  # the parent's figures were for other thresholds
    assert result.images == N and result.duplicates == 0 and result.warning is None
    # The parent is untouched, byte for byte.
    assert (parent / METADATA_FILE).read_bytes() == parent_meta_bytes
    assert _sha(parent / MODEL_FILE) == parent_onnx


def test_thresholds_keep_the_conformal_rank(parent: Path, parts: list[bytes]) -> None:
    result = recalibrate(parent, parts, target_fpr=0.1, operator="op")
    errors = score_images(load_artifact(parent), parts)
    rejected = rule_flags(errors, np.asarray(result.metadata.thresholds.all)).sum()
    # k = ceil(25 * 0.9) = 23 of 24 accepted: one calibration image is over.
    assert rejected == N - result.calibration.rank == 1


def test_scales_come_from_the_parent_never_the_images(tmp_path: Path, parts: list[bytes]) -> None:
    # Older artifacts: the parent's thresholds are the scales.
    old = write_toy_artifact(tmp_path / "a", eps0=2.0, tiles=tuple(float(k) for k in range(1, 10)))
    got = recalibrate(old, parts, target_fpr=0.05, operator="op").metadata.calibration.scales
    assert got == (2.0, *map(float, range(1, 10)))
    # Newer ones record their scales: those are taken, not the thresholds.
    model = colour_distance_model()
    meta = metadata_for(model, "toy", 1)
    scales = tuple(0.5 + 0.1 * k for k in range(10))
    meta = meta.model_copy(
        update={"calibration": meta.calibration.model_copy(update={"scales": scales})}
    )
    new_style = write_artifact(tmp_path / "b" / "toy" / "1", model, meta)
    result = recalibrate(new_style, parts, target_fpr=0.05, operator="op")
    assert result.metadata.calibration.scales == scales
    errors = score_images(load_artifact(new_style), parts)
    expected = conformal_thresholds(errors, np.asarray(scales), 0.05)
    np.testing.assert_allclose(result.metadata.thresholds.all, expected.eps, rtol=1e-9)


def test_duplicates_dropped_and_counted(parent: Path, parts: list[bytes]) -> None:
    images = [*parts[:12], parts[0], parts[3], parts[3]]
    result = recalibrate(parent, images, target_fpr=0.05, operator="op")
    assert result.images == 12 and result.duplicates == 3
    assert result.metadata.calibration.holdout_images == 12
    assert result.metadata.calibration.images_sha256 == images_fingerprint(parts[:12])
    assert result.warning is not None and "19 good images would be needed" in result.warning


def test_too_few_images_refused_and_nothing_written(parent: Path, parts: list[bytes]) -> None:
    few = parts[: MIN_IMAGES - 1] * 3  # enough files, too few distinct ones
    with pytest.raises(RecalibrationError) as info:
        recalibrate(parent, few, target_fpr=0.01, operator="op")
    assert info.value.reason == "too_few_images"
    assert f"{MIN_IMAGES - 1} distinct images" in info.value.message
    assert sorted(p.name for p in parent.parent.iterdir()) == ["1"]


def test_corrupt_image_is_named(parent: Path, parts: list[bytes]) -> None:
    images = [*parts[:12], parts[12][:500]]
    names = [f"part-{i}.png" for i in range(13)]
    with pytest.raises(ImageRefused) as info:
        recalibrate(parent, images, target_fpr=0.05, operator="op", names=names)
    assert info.value.index == 12 and info.value.name == "part-12.png"
    assert "part-12.png" in info.value.message and info.value.reason == "invalid_image"
    assert sorted(p.name for p in parent.parent.iterdir()) == ["1"]


def test_bad_target_refused(parent: Path, parts: list[bytes]) -> None:
    for bad in (0.0, 1.0, -0.1, float("nan")):
        with pytest.raises(RecalibrationError, match="target_fpr"):
            recalibrate(parent, parts, target_fpr=bad, operator="op")


def test_codec_given_reencodes_detected_codec_is_recorded(parent: Path, parts: list[bytes]) -> None:
    art = load_artifact(parent)
    # Given: the PNGs pass through JPEG q30, whose artefacts change the errors.
    as_png = score_images(art, parts[:4])
    as_jpeg = score_images(art, parts[:4], Codec(format="jpeg", quality=30))
    assert as_png.shape == as_jpeg.shape == (4, 10)
    assert not np.allclose(as_png, as_jpeg)
    given = recalibrate(art, parts, target_fpr=0.05, operator="op", codec=Codec.parse("jpeg:30"))
    assert given.metadata.calibration.codec == Codec(format="jpeg", quality=30)
    # Not given: detected from the images, the most common one, and the mix reported.
    rng = np.random.default_rng(7)
    jpegs = [
        encode(".jpg", cv2.cvtColor(good_image(rng), cv2.COLOR_RGB2BGR)) for _ in range(14)
    ]  # OpenCV's default quality, 95
    detected = recalibrate(art, [*jpegs, *parts[:6]], target_fpr=0.05, operator="op")
    assert detected.metadata.calibration.codec == Codec(format="jpeg", quality=95)
    assert detected.codec_mix == {"jpeg:95": 14, "png": 6}
    assert detected.codec_note is not None and "14 jpeg:95" in detected.codec_note
    assert detected.version_dir.name == "3"


def test_score_images_equals_the_graph(parent: Path, parts: list[bytes]) -> None:
    art = load_artifact(parent)
    errors = score_images(art, parts[:5], batch=2)
    from service.preprocessing import prepare

    x = np.stack([prepare(p).tensor for p in parts[:5]])
    e0, ek = art.session.run(["image_error", "tile_errors"], {"image": x})
    np.testing.assert_allclose(errors[:, 0], e0, rtol=1e-6)
    np.testing.assert_allclose(errors[:, 1:], ek, rtol=1e-6)


def test_metadata_for_holdout_keeps_evaluation(parent: Path, parts: list[bytes]) -> None:
    meta = read_metadata(parent).model_copy(
        update={"evaluation": Evaluation(good_images=1, defective_images=1)}
    )
    cal = conformal_thresholds(score_images(load_artifact(parent), parts), np.ones(10), 0.05)

    def make(source: Literal["holdout", "line"], fraction: float | None) -> ModelMetadata:
        return recalibrated_metadata(
            meta, cal, version=2, source=source, codec=Codec(), operator=None,
            images_sha256="a" * 64, holdout_fraction=fraction,
        )  # fmt: skip

    held = make("holdout", 0.2)
    assert held.evaluation == meta.evaluation and held.calibration.source == "holdout"
    assert held.calibration.holdout_fraction == 0.2
    assert make("line", None).evaluation is None
    with pytest.raises(ValueError, match="hold-out"):
        make("line", 0.2)


def test_fingerprint_is_order_free() -> None:
    a, b = b"one", b"two"
    assert images_fingerprint([a, b]) == images_fingerprint([b, a])
    assert images_fingerprint([a, b]) != images_fingerprint([a])


def test_cli(
    parent: Path, parts: list[bytes], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "good"
    folder.mkdir()
    for i, data in enumerate(parts):
        (folder / f"{i:03d}.png").write_bytes(data)
    model_dir = parent.parent
    args = ["--model-dir", str(model_dir), "--images", str(folder), "--operator", "J. Smith"]
    assert cli_main([*args, "--target-fpr", "0.05"]) == 0
    out = capsys.readouterr().out
    assert "version 2" in out and "old:" in out and "new:" in out and "24 distinct" in out
    assert read_metadata(model_dir / "2").calibration.operator == "J. Smith"
    # --version picks the parent explicitly; the next free number is 3.
    assert cli_main([*args, "--version", "1", "--codec", "jpeg:90"]) == 0
    out = capsys.readouterr().out
    assert "warning: 24 good images" in out  # 1% needs 99
    assert read_metadata(model_dir / "3").calibration.parent_version == 1
    # Bad input: exit code 2 and a message, nothing written.
    for bad, why in [
        (["--codec", "gif"], "codec"),
        (["--target-fpr", "2"], "target_fpr"),
        (["--version", "9"], "no such version"),
        (["--operator", " "], "operator"),
    ]:
        assert cli_main([*args, *bad]) == 2
        assert why in capsys.readouterr().err
    few = tmp_path / "few"
    few.mkdir()
    (few / "a.png").write_bytes(parts[0])
    assert cli_main([*args[:2], "--images", str(few), "--operator", "x"]) == 2
    assert "at least" in capsys.readouterr().err
    assert sorted(p.name for p in model_dir.iterdir()) == ["1", "2", "3"]
