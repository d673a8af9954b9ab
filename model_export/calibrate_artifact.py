"""Calibrate an exported model version anew on its own training hold-out.

    python -m model_export.calibrate_artifact models/bottle-pwae/8 \\
        --data ../shared/datasets/mvtec_ad/bottle [--codec jpeg:90] --out models/bottle-pwae

An artifact records the split it was trained on (hold-out fraction, seed and
the fingerprint of the fit images), so its held-out images can be found
again without the training checkpoint. This writes the next version with the
same graph and thresholds from service.calibration: the errors are
normalised by their medians over the fit images, thresholded at the
conformal order statistic of the held-out images, optionally all passed
through the line camera's codec first. Like ``calibrate`` and ``evaluate``,
it then scores the held-out images with synthetic defects (validation) and
the test split (evaluation, with the same codec); the test split only
measures. The model runs on onnxruntime, as the server runs it.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_export.data import fingerprint, split_train, test_set
from model_export.evaluation import evaluate_scores, verdicts
from model_export.validation import synthetic_defectives, validation_figures
from service.artifact import LoadedArtifact, load_artifact, next_version, write_artifact
from service.calibration import (
    ConformalThresholds,
    conformal_thresholds,
    error_scales,
)
from service.codec import apply_codec
from service.contract import (
    INPUT_NAME,
    MODEL_FILE,
    OUTPUT_NAMES,
    Codec,
    Evaluation,
    ModelMetadata,
)
from service.preprocessing import prepare
from service.recalibration import images_fingerprint, recalibrated_metadata, score_images


def _run(art: LoadedArtifact, tensors: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(N, 1+K) errors and (N, H, W) anomaly maps of prepared inputs."""
    errs, maps = [], []
    for i in range(0, len(tensors), 8):
        e0, ek, amap = art.session.run(
            list(OUTPUT_NAMES), {INPUT_NAME: np.stack(tensors[i : i + 8])}
        )
        errs.append(np.c_[e0, ek])
        maps.append(amap)
    return np.concatenate(errs).astype(np.float64), np.concatenate(maps)


def validation(
    art: LoadedArtifact,
    hold: Sequence[Path],
    hold_errors: np.ndarray,
    eps: np.ndarray,
    seed: int,
    codec: Codec,
) -> dict[str, float]:
    """As model_export.validation.synthetic_validation, scored by the graph."""
    meta = art.metadata
    bad, _ = _run(art, [t.numpy() for t in synthetic_defectives(hold, seed, 2, meta.input, codec)])
    return validation_figures(hold_errors, bad, eps)


def evaluation(
    art: LoadedArtifact, data: Path, eps: np.ndarray, codec: Codec
) -> tuple[dict[str, float], list[dict[str, object]]]:
    """Test-split figures and per-image verdicts, the images sent as ``codec``."""
    meta = art.metadata
    items = test_set(data, meta.input.height)
    tensors = [prepare(apply_codec(p.read_bytes(), codec), meta.input, meta.grid).tensor
               for p, _, _ in items]  # fmt: skip
    errors, maps = _run(art, tensors)
    labels = np.array([y for _, y, _ in items])
    metrics = evaluate_scores(errors, maps, labels, np.stack([m for _, _, m in items]), eps)
    per_image = verdicts(items, errors, eps, data)
    return metrics, per_image


def calibrate_artifact(
    version_dir: Path, data: Path, target_fpr: float, codec: Codec, out: Path | None
) -> tuple[Path, ConformalThresholds, dict[str, float]]:
    art = load_artifact(version_dir, providers=("CPUExecutionProvider",))
    parent: ModelMetadata = art.metadata
    pc = parent.calibration
    if pc.holdout_fraction is None or pc.split_seed is None:
        raise SystemExit(
            f"{version_dir} was calibrated on line images: it records no training split"
        )
    fit, hold = split_train(data, pc.holdout_fraction, pc.split_seed)
    if fingerprint(fit) != parent.training_data.fingerprint:
        raise SystemExit(
            f"{data} with hold-out {pc.holdout_fraction} and seed {pc.split_seed} does not give "
            f"the images {version_dir} was fitted on (fingerprint differs)"
        )
    hold_bytes = [p.read_bytes() for p in hold]
    fit_errors = score_images(art, [p.read_bytes() for p in fit], codec)
    hold_errors = score_images(art, hold_bytes, codec)
    cal = conformal_thresholds(hold_errors, error_scales(fit_errors), target_fpr)
    val = validation(art, hold, hold_errors, cal.eps, pc.split_seed, codec)
    metrics, per_image = evaluation(art, data, cal.eps, codec)
    good, bad = metrics["tn"] + metrics["fp"], metrics["tp"] + metrics["fn"]
    model_dir = out or art.path.parent
    version = next_version(model_dir)
    meta = recalibrated_metadata(
        parent, cal, version=version, source="holdout", codec=codec, operator=None,
        images_sha256=images_fingerprint(hold_bytes), holdout_fraction=pc.holdout_fraction,
        split_seed=pc.split_seed,
        evaluation=Evaluation(good_images=int(good), defective_images=int(bad), metrics=metrics),
    )  # fmt: skip
    info = {k: v for k, v in parent.model_info.items() if not k.startswith("validation_")}
    meta = meta.model_copy(
        update={
            # Named after its directory, as export names a model: a copy
            # calibrated for another line may live under another name.
            "name": model_dir.name,
            "model_info": {**info, **{f"validation_{k}": round(v, 4) for k, v in val.items()}},
        }
    )
    new = write_artifact(model_dir / str(version), (art.path / MODEL_FILE).read_bytes(), meta)
    (new / "evaluation.json").write_text(json.dumps(per_image, indent=2) + "\n")
    return new, cal, {**metrics, **{f"validation_{k}": v for k, v in val.items()}}


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("version_dir", type=Path, help="models/<name>/<version> to calibrate anew")
    ap.add_argument("--data", type=Path, required=True, help="the category it was trained on")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument(
        "--codec", type=Codec.parse, default=Codec(), help="png (default), jpeg:90, ..."
    )
    ap.add_argument(
        "--out", type=Path, help="model directory for the new version (default: the parent's)"
    )
    args = ap.parse_args(argv)
    new, cal, m = calibrate_artifact(
        args.version_dir, args.data, args.target_fpr, args.codec, args.out
    )
    print(f"wrote {new}, calibrated for {args.codec}: {cal.report()}")
    if (warning := cal.warning()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"validation AUROC {m['validation_synthetic_auroc']:.3f}; test: image AUROC "
        f"{m['image_auroc']:.3f}, false rejects {m['false_reject_rate']:.2%}, "
        f"detected {m['detection_rate']:.2%}"
    )


if __name__ == "__main__":
    main()
