"""``python -m service.recalibrate`` / ``inspection-recalibrate``: new thresholds
from good parts collected on the line, written as the model's next version.

    python -m service.recalibrate --model-dir models/bottle-pwae \\
        --images /data/line3/good-2026-12-01/ --operator "J. Smith" --codec jpeg:90

The new version shares the parent's graph (same model.onnx bytes and sha256);
only its thresholds and calibration record differ. A running server picks it
up on SIGHUP or ``POST /v1/models/reload``; the parent stays on disk, so a
rollback is moving the new version directory away and reloading again.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.artifact import ArtifactError, resolve_version_dir
from service.contract import Codec
from service.recalibration import (
    DEFAULT_TARGET_FPR,
    RecalibrationError,
    RecalibrationResult,
    parse_codec,
    parse_operator,
    parse_target,
    recalibrate,
)
from service.sign_artifact import add_signer_arguments, signer_from_args

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}


def image_files(paths: list[Path]) -> list[Path]:
    """The image files named, and those directly in the directories named, sorted."""
    files: list[Path] = []
    for p in paths:
        if p.is_dir():
            files += sorted(
                f for f in p.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
            )
        elif p.is_file():
            files.append(p)
        else:
            raise RecalibrationError("missing_images", f"{p}: no such file or directory")
    return files


def _thresholds(values: tuple[float, ...]) -> str:
    return ", ".join(f"{v:.4g}" for v in values)


def report(result: RecalibrationResult) -> str:
    old, new = result.parent, result.metadata
    cal = new.calibration
    lines = [
        f"wrote {result.version_dir} ({new.name} version {new.version}, "
        f"recalibrated from version {old.version}; graph sha256 {new.onnx_sha256[:12]}... kept)",
        f"images: {result.images} distinct good images, "
        f"{result.duplicates} exact duplicates dropped, codec {cal.codec}",
        f"thresholds eps0..eps{len(new.thresholds.all) - 1}:",
        f"  old: {_thresholds(old.thresholds.all)}",
        f"  new: {_thresholds(new.thresholds.all)}",
        f"promise: expected false-reject rate on new good parts <= {cal.promised_fpr:.2%} "
        f"(target {cal.target_fpr:.2%}); below {cal.fpr_upper_90:.2%} with 90% confidence",
    ]
    if result.codec_note:
        lines.append(f"note: {result.codec_note}")
    if result.warning:
        lines.append(f"warning: {result.warning}")
    lines.append("a running server serves it after SIGHUP or POST /v1/models/reload")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="inspection-recalibrate",
        description="Recalibrate a model's thresholds on good parts from the line and "
        "write them as its next version (same graph, new thresholds).",
    )
    ap.add_argument("--model-dir", type=Path, required=True, help="e.g. models/bottle-pwae")
    ap.add_argument("--version", type=int, help="the version to recalibrate (default: newest)")
    ap.add_argument(
        "--images", type=Path, nargs="+", required=True,
        help="image files and/or directories of good parts (PNG, JPEG, BMP, TIFF)",
    )  # fmt: skip
    ap.add_argument("--operator", required=True, help="who confirmed the parts good")
    ap.add_argument(
        "--target-fpr", default=str(DEFAULT_TARGET_FPR),
        help=f"target false-reject rate on good parts (default {DEFAULT_TARGET_FPR})",
    )  # fmt: skip
    ap.add_argument(
        "--codec",
        help="how the line's camera encodes images (png, jpeg:90, ...); the images are "
        "re-encoded so; default: detected from the images, which are used as they are",
    )
    # Where the servers only serve signed versions (INSPECTION_ARTIFACT_*_KEY):
    # the new version is signed as it is written, so none ever sees it unsigned.
    add_signer_arguments(ap)
    args = ap.parse_args(argv)
    try:
        operator = parse_operator(args.operator)
        target = parse_target(args.target_fpr)
        codec: Codec | None = parse_codec(args.codec) if args.codec else None
        if args.version is not None:
            version_dir = args.model_dir / str(args.version)
            if not version_dir.is_dir():
                raise ArtifactError(version_dir, "no such version")
        else:
            version_dir = resolve_version_dir(args.model_dir)
        try:
            signer = signer_from_args(args)
        except ValueError as exc:  # a key file that is not a usable key
            raise RecalibrationError("invalid_key", str(exc)) from exc
        files = image_files(args.images)
        images = [f.read_bytes() for f in files]
        result = recalibrate(
            version_dir, images, target_fpr=target, operator=operator, codec=codec,
            names=[str(f) for f in files], signer=signer,
        )  # fmt: skip
    except (RecalibrationError, ArtifactError, OSError) as exc:
        print(f"inspection-recalibrate: error: {exc}", file=sys.stderr)
        return 2
    print(report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
