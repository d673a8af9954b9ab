"""The trainer: train, calibrate, evaluate and export a model of either family.

    inspection-train run --family pwae --data ../shared/datasets/mvtec_ad/bottle \\
        --work runs/bottle-pwae --export models/bottle-pwae/1

Stages (each reads what the previous one wrote under --work):

* ``train``: a seeded fraction of train/good is held out (never test/); the
  family is fitted on the rest -> ``checkpoint.pt``. P-WAE also keeps
  ``train_state.pt`` after every epoch and resumes from it.
* ``calibrate``: e0..e9 on the held-out defect-free images -> eps0..eps9 for a
  target false-positive rate of the whole rule, and, from the same images
  with synthetic defects pasted in, the validation AUROC that configurations
  are chosen by (model_export/validation.py) -> ``calibration.json``.
* ``evaluate``: test/ -> image AUROC and max balanced accuracy of
  max_k(ek/epsk), AUROC of e0, confusion matrix of the rule, pixel AUROC, PRO
  -> ``evaluation.json``, ``per_image.json``, ``summary.md`` and PNG plots.
* ``export``: models/<name>/<version>/ per the contract (service.artifact;
  given models/<name>, the next free version),
  then onnxruntime's outputs are compared with torch's on held-out images.
* ``run``: all four (export only where ``--export`` is given).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.data import (
    category_spec,
    checkpoint_spec,
    checkpoint_split,
    fingerprint,
    load_tensor,
    split_train,
    test_set,
)
from model_export.evaluation import evaluate_scores, score, verdicts
from model_export.families import get_family, load_checkpoint
from model_export.report import write_plots, write_summary
from model_export.validation import synthetic_validation
from service.artifact import next_version, write_artifact
from service.calibration import conformal_thresholds, error_scales
from service.contract import (
    Calibration,
    Codec,
    Evaluation,
    ModelMetadata,
    Thresholds,
    TileGrid,
    TrainingData,
)
from service.recalibration import calibration_record, images_fingerprint

CHECKPOINT = "checkpoint.pt"


def _save(work: Path, name: str, obj: Any) -> None:
    (work / name).write_text(json.dumps(obj, indent=2) + "\n")


def _load(work: Path, name: str) -> Any:
    path = work / name
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


def train(
    family_name: str,
    data: Path,
    work: Path,
    config: dict[str, Any],
    holdout: float,
    seed: int,
    augment_codec: Codec | None = None,
) -> None:
    from tqdm import tqdm

    family = get_family(family_name)
    cfg = family.config_from_dict(config)
    work.mkdir(parents=True, exist_ok=True)
    fit_paths, hold = split_train(data, holdout, seed)
    t0 = time.perf_counter()
    spec = category_spec(data)  # grey where every train/good image is single-channel
    images = [load_tensor(p, spec) for p in fit_paths]
    if augment_codec is not None:
        # Each fit image also as the line camera encodes it: the model learns
        # its artefacts as normal (P-WAE's per-pixel error statistics too).
        images += [load_tensor(p, spec, augment_codec) for p in fit_paths]
    extra = {"checkpoint": work / "train_state.pt"} if family.resumable else {}
    epochs = int(getattr(cfg, "epochs", 1)) * max(1, len(getattr(cfg, "members", (0,))))
    with tqdm(total=len(images) * epochs, desc=family.name, unit="img", file=sys.stderr) as bar:
        model, log = family.fit(cfg, images, progress=bar.update, **extra)
    seconds = time.perf_counter() - t0
    torch.save(
        {
            "family": family.name,
            "config": cfg.to_dict(),
            "state_dict": model.state_dict(),
            "data": str(data.resolve()),
            "fit": [p.name for p in fit_paths],
            "holdout": [p.name for p in hold],
            "holdout_fraction": holdout,
            "split_seed": seed,
            "input": spec.model_dump(mode="json"),
            "augment_codec": None if augment_codec is None else str(augment_codec),
            "train_seconds": seconds,
            "log": log if isinstance(log, dict) else {},
        },
        work / CHECKPOINT,
    )
    print(
        f"trained {family.name} on {len(fit_paths)} images in {seconds:.0f} s; {len(hold)} held out"
    )


def calibrate(work: Path, target_fpr: float, codec: Codec | None = None) -> None:
    """Conformal thresholds (service.calibration) on the held-out images.

    The errors are normalised by their medians over the fit images, never the
    held-out ones, so the promise on new good images is exact. Every image
    first goes through the line camera's ``codec``.
    """
    _, _, model, ckpt = load_checkpoint(work / CHECKPOINT)
    codec = codec or Codec()
    spec = checkpoint_spec(ckpt)
    hold = checkpoint_split(ckpt, "holdout")
    errors, _ = score(model, hold, codec=codec, spec=spec)
    fit_errors, _ = score(model, checkpoint_split(ckpt, "fit"), codec=codec, spec=spec)
    cal = conformal_thresholds(errors, error_scales(fit_errors), target_fpr)
    validation = synthetic_validation(
        model, hold, errors, cal.eps, seed=ckpt["split_seed"], spec=spec, codec=codec
    )
    record = calibration_record(
        cal, source="holdout", codec=codec, operator=None,
        images_sha256=images_fingerprint([p.read_bytes() for p in hold]),
        holdout_fraction=ckpt["holdout_fraction"], split_seed=ckpt["split_seed"],
    )  # fmt: skip
    _save(
        work,
        "calibration.json",
        {
            "record": record.model_dump(mode="json"),
            "eps": cal.eps.tolist(),
            "validation": validation,
        },
    )
    print(f"calibrated for {codec}: {cal.report()}")
    if (warning := cal.warning()) is not None:
        print(f"warning: {warning}", file=sys.stderr)
    print(
        f"validation (held-out images with synthetic defects, no test image): "
        f"AUROC {validation['synthetic_auroc']:.3f}, "
        f"detected {validation['synthetic_detected']:.2f}"
    )


def evaluate(work: Path) -> dict[str, float]:
    _, _, model, ckpt = load_checkpoint(work / CHECKPOINT)
    cal = _load(work, "calibration.json")
    eps = np.asarray(cal["eps"])
    data = Path(ckpt["data"])
    items = test_set(data)
    record = Calibration.model_validate(cal["record"])
    codec = record.codec  # the test images as the calibrated camera would send them
    errors, maps = score(model, [p for p, _, _ in items], codec=codec, spec=checkpoint_spec(ckpt))
    labels = np.array([y for _, y, _ in items])
    masks = np.stack([m for _, _, m in items])
    metrics = evaluate_scores(errors, maps, labels, masks, eps)
    metrics["good_images"] = float((labels == 0).sum())
    metrics["defective_images"] = float((labels == 1).sum())
    print(
        f"false rejects on test good images {metrics['false_reject_rate']:.2%} "
        f"(promised at most {record.promised_fpr:.2%} expected, "
        f"{record.fpr_upper_90:.2%} with 90% probability); "
        f"detected {metrics['detection_rate']:.2%} of defective ones ({codec})"
    )
    per_image = verdicts(items, errors, eps, data)
    _save(work, "evaluation.json", metrics)
    _save(work, "per_image.json", per_image)
    write_plots(work, items, errors, maps, eps, labels)
    write_summary(work, ckpt, metrics, cal.get("validation"))
    print(json.dumps(metrics, indent=2))
    return metrics


def export(work: Path, out: Path, name: str | None = None) -> float:
    import onnxruntime as ort

    family, cfg, model, ckpt = load_checkpoint(work / CHECKPOINT)
    cal = _load(work, "calibration.json")
    ev = _load(work, "evaluation.json") if (work / "evaluation.json").is_file() else None
    data = Path(ckpt["data"])
    fit_paths = checkpoint_split(ckpt, "fit")
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    onnx_bytes = family.to_onnx(model)
    eps = cal["eps"]
    metadata = ModelMetadata(
        family=family.name,
        name=name or out.parent.name,
        version=int(out.name),
        input=checkpoint_spec(ckpt),
        grid=TileGrid(),
        thresholds=Thresholds(eps0=eps[0], tiles=tuple(eps[1:])),
        calibration=Calibration.model_validate(cal["record"]),
        training_data=TrainingData(
            dataset=str(manifest.get("dataset", data.parent.name)),
            category=str(manifest.get("category", data.name)),
            train_images=len(fit_paths),
            fingerprint=fingerprint(fit_paths),
        ),
        evaluation=None
        if ev is None
        else Evaluation(
            good_images=int(ev.pop("good_images")),
            defective_images=int(ev.pop("defective_images")),
            metrics=ev,
        ),
        opset=family.opset,
        onnx_sha256="0" * 64,
        model_info={
            **family.describe(cfg),
            **{f"validation_{k}": round(v, 4) for k, v in cal.get("validation", {}).items()},
            "train_seconds": round(float(ckpt["train_seconds"]), 1),
            **({"augment_codec": ckpt["augment_codec"]} if ckpt.get("augment_codec") else {}),
        },
    )
    write_artifact(out, onnx_bytes, metadata)
    if (work / "per_image.json").is_file():
        # The offline verdict of every test image, for checking a deployment
        # against (the server's integration test does).
        (out / "evaluation.json").write_text((work / "per_image.json").read_text())
    # The proof: onnxruntime and torch agree on held-out defect-free images.
    hold = checkpoint_split(ckpt, "holdout")[:4]
    x = torch.stack([load_tensor(p, metadata.input) for p in hold])
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    print(
        f"wrote {out} ({len(onnx_bytes) / 1e6:.1f} MB); onnxruntime vs torch max |diff| {diff:.2e}"
    )
    return diff


def version_dir(out: Path) -> Path:
    """``out`` if it names a version, else the next free version under it."""
    return out if out.name.isdigit() else out / str(next_version(out))


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="inspection-train", description=__doc__.split("\n")[0])
    ap.add_argument("stage", choices=["train", "calibrate", "evaluate", "export", "run"])
    ap.add_argument("--family", default="pwae", choices=["pwae", "ot_prototypes"])
    ap.add_argument("--data", type=Path, help="category directory in MVTec AD layout")
    ap.add_argument("--work", type=Path, required=True, help="checkpoint and reports go here")
    ap.add_argument(
        "--export",
        dest="out",
        type=Path,
        help="models/<name>/<version>, or models/<name> for its next free version",
    )
    ap.add_argument(
        "--preset", help="a named config of the family to start from, e.g. pwae's 'paper'"
    )
    ap.add_argument("--config", type=Path, help="JSON of the family's config fields")
    ap.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=JSON",
        help="override one config field, e.g. --set epochs=5",
    )
    ap.add_argument("--holdout", type=float, default=0.2, help="fraction of train/good held out")
    ap.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    ap.add_argument(
        "--target-fpr",
        type=float,
        default=0.01,
        help="false-reject rate to promise on new good images (calibrate)",
    )
    ap.add_argument(
        "--augment-codec",
        type=Codec.parse,
        help="train: add each fit image also passed through this codec, e.g. jpeg:90",
    )
    ap.add_argument(
        "--codec",
        type=Codec.parse,
        default=Codec(),
        help="what the line's camera sends, e.g. png or jpeg:90; calibration "
        "and evaluation pass their images through it (default png)",
    )
    return ap


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    if args.stage in ("train", "run"):
        if args.data is None:
            ap.error("--data is needed to train")
        config: dict[str, Any] = {}
        if args.preset is not None:
            presets = get_family(args.family).presets
            if args.preset not in presets:
                ap.error(f"--preset: {args.family} has {sorted(presets) or 'none'}")
            config.update(presets[args.preset])
        if args.config is not None:
            config.update(json.loads(args.config.read_text()))
        for item in args.set:
            key, _, value = item.partition("=")
            config[key] = json.loads(value)
        train(
            args.family, args.data, args.work, config, args.holdout, args.seed, args.augment_codec
        )
    if args.stage in ("calibrate", "run"):
        calibrate(args.work, args.target_fpr, args.codec)
    if args.stage in ("evaluate", "run"):
        evaluate(args.work)
    if args.stage == "export" and args.out is None:
        ap.error("--export models/<name>[/<version>] is needed to export")
    if args.out is not None and args.stage in ("export", "run"):
        export(args.work, version_dir(args.out))
    elif args.stage == "run":
        print("no --export given: trained, calibrated and evaluated; nothing exported")


if __name__ == "__main__":
    main()
