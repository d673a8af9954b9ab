"""Train, calibrate, evaluate and export the OT-prototype family end to end.

    python -m model_export.ot_run all --data ../shared/datasets/mvtec_ad/bottle \\
        --work runs/bottle-otproto --export models/bottle-otproto/1

Stages (each reads what the previous one wrote under --work):

* ``train``: seeded hold-out of train/good (never test/), fit, ``checkpoint.pt``.
* ``calibrate``: e0..e9 on the held-out normal images; one common quantile
  level for all eleven thresholds, bisected so the rule "defect-free only if
  e0 <= eps0 and every ek <= epsk" has at most the target false-positive
  rate on the hold-out as a whole -> ``calibration.json``.
* ``evaluate``: test/ -> image AUROC, max balanced accuracy, pixel AUROC,
  PRO (30% FPR), confusion matrix of the calibrated rule -> ``evaluation.json``.
* ``export``: one ONNX graph + metadata through service.artifact.write_artifact,
  then onnxruntime vs torch on held-out images (max abs difference printed).

This file is the OT family's own runner, written while the shared pipeline
(model_export/data.py, calibration.py, evaluation.py, export.py, cli.py) did
not exist yet; the model itself is in :mod:`model_export.ot_prototypes`.
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

from model_export.calibration import calibrate_thresholds
from model_export.data import fingerprint, load_tensor, split_train, test_set
from model_export.evaluation import evaluate_scores, score
from model_export.ot_prototypes import OPSET, OTPrototypesConfig, OTPrototypesModel, fit, to_onnx
from service.contract import (
    Calibration,
    Evaluation,
    InputSpec,
    ModelMetadata,
    Thresholds,
    TileGrid,
    TrainingData,
)

# --- stages -----------------------------------------------------------------------


def _save(work: Path, name: str, obj: dict[str, Any]) -> None:
    (work / name).write_text(json.dumps(obj, indent=2) + "\n")


def _load_model(work: Path) -> tuple[OTPrototypesModel, dict[str, Any]]:
    ckpt = torch.load(work / "checkpoint.pt", weights_only=False)
    config = OTPrototypesConfig.from_dict(ckpt["config"])
    model = OTPrototypesModel(config)
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    return model, ckpt


def train(data: Path, work: Path, config: OTPrototypesConfig, holdout: float, seed: int) -> None:
    work.mkdir(parents=True, exist_ok=True)
    fit_paths, hold = split_train(data, holdout, seed)
    t0 = time.perf_counter()
    from tqdm import tqdm

    images = [load_tensor(p) for p in fit_paths]
    total = len(images) * len(config.members) * config.epochs
    with tqdm(total=total, desc="OT prototypes", unit="img", file=sys.stderr) as bar:
        model, log = fit(config, images, progress=bar.update)
    seconds = time.perf_counter() - t0
    torch.save(
        {
            "config": config.to_dict(),
            "state_dict": model.state_dict(),
            "data": str(data),
            "fit": [p.name for p in fit_paths],
            "holdout": [p.name for p in hold],
            "holdout_fraction": holdout,
            "split_seed": seed,
            "train_seconds": seconds,
            "max_marginal_error": max(log.marginal_errors),
            "prototype_shift": log.prototype_shift,
        },
        work / "checkpoint.pt",
    )
    print(f"trained on {len(fit_paths)} images in {seconds:.0f} s; {len(hold)} held out")


def calibrate(work: Path, target_fpr: float) -> None:
    model, ckpt = _load_model(work)
    data = Path(ckpt["data"])
    hold = [data / "train" / "good" / n for n in ckpt["holdout"]]
    errors, _ = score(model, hold)
    eps, achieved = calibrate_thresholds(errors, target_fpr)
    _save(
        work,
        "calibration.json",
        {
            "method": "holdout-common-quantile-bisection",
            "target_fpr": target_fpr,
            "achieved_fpr": achieved,
            "holdout_images": len(hold),
            "eps": eps.tolist(),
        },
    )
    print(f"eps0={eps[0]:.4g}, tiles {np.round(eps[1:], 4).tolist()}, held-out FPR {achieved:.3f}")


def evaluate(work: Path) -> dict[str, float]:
    model, ckpt = _load_model(work)
    cal = json.loads((work / "calibration.json").read_text())
    items = test_set(Path(ckpt["data"]))
    errors, maps = score(model, [p for p, _, _ in items])
    labels = np.array([y for _, y, _ in items])
    masks = np.stack([m for _, _, m in items])
    metrics = evaluate_scores(errors, maps, labels, masks, np.asarray(cal["eps"]))
    metrics["good_images"] = float((labels == 0).sum())
    metrics["defective_images"] = float((labels == 1).sum())
    _save(work, "evaluation.json", metrics)
    print(json.dumps(metrics, indent=2))
    return metrics


def export(work: Path, out: Path, name: str | None = None) -> float:
    import onnxruntime as ort

    from service.artifact import write_artifact

    model, ckpt = _load_model(work)
    cal = json.loads((work / "calibration.json").read_text())
    ev_path = work / "evaluation.json"
    ev = json.loads(ev_path.read_text()) if ev_path.is_file() else None
    data = Path(ckpt["data"])
    fit_paths = [data / "train" / "good" / n for n in ckpt["fit"]]
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    onnx_bytes = to_onnx(model)
    eps = cal["eps"]
    config = OTPrototypesConfig.from_dict(ckpt["config"])
    metadata = ModelMetadata(
        family="ot_prototypes",
        name=name or out.parent.name,
        version=int(out.name),
        input=InputSpec(),
        grid=TileGrid(),
        thresholds=Thresholds(eps0=eps[0], tiles=tuple(eps[1:])),
        calibration=Calibration(
            method=cal["method"],
            target_fpr=cal["target_fpr"],
            achieved_fpr=cal["achieved_fpr"],
            holdout_images=cal["holdout_images"],
            holdout_fraction=ckpt["holdout_fraction"],
            split_seed=ckpt["split_seed"],
        ),
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
        opset=OPSET,
        onnx_sha256="0" * 64,
        model_info={
            "backbone": "efficientnet-lite0 (frozen, ImageNet)",
            "members": ", ".join(
                f"{m.scale}/alpha={m.alpha}/k={m.prototypes_per_position}" for m in config.members
            ),
            "epsilon": config.epsilon,
            "sinkhorn_iterations": config.sinkhorn_iterations,
            "ema": config.ema,
            "train_seconds": round(float(ckpt["train_seconds"]), 1),
        },
    )
    write_artifact(out, onnx_bytes, metadata)
    # The proof: onnxruntime and torch agree on held-out normal images.
    hold = [data / "train" / "good" / n for n in ckpt["holdout"][:4]]
    x = torch.stack([load_tensor(p) for p in hold])
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    got = sess.run(None, {"image": x.numpy()})
    with torch.no_grad():
        want = model(x)
    diff = max(float(np.abs(g - w.numpy()).max()) for g, w in zip(got, want, strict=True))
    print(
        f"wrote {out} ({len(onnx_bytes) / 1e6:.1f} MB); onnxruntime vs torch max |diff| {diff:.2e}"
    )
    return diff


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m model_export.ot_run", description=__doc__.split("\n")[0]
    )
    ap.add_argument("stage", choices=["train", "calibrate", "evaluate", "export", "all"])
    ap.add_argument("--data", type=Path, help="category directory in MVTec AD layout")
    ap.add_argument("--work", type=Path, required=True, help="checkpoint and reports")
    ap.add_argument("--export", dest="out", type=Path, help="models/<name>/<version>")
    ap.add_argument("--config", type=Path, help="JSON of OTPrototypesConfig fields")
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target-fpr", type=float, default=0.01)
    args = ap.parse_args(argv)
    if args.stage in ("train", "all"):
        if args.data is None:
            ap.error("--data is needed to train")
        raw = json.loads(args.config.read_text()) if args.config else {}
        train(args.data, args.work, OTPrototypesConfig.from_dict(raw), args.holdout, args.seed)
    if args.stage in ("calibrate", "all"):
        calibrate(args.work, args.target_fpr)
    if args.stage in ("evaluate", "all"):
        evaluate(args.work)
    if args.stage in ("export", "all"):
        if args.out is None:
            ap.error("--export models/<name>/<version> is needed to export")
        export(args.work, args.out)


if __name__ == "__main__":
    main()
