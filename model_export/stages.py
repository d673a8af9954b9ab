"""The trainer's four stages, each reading what the previous one wrote
under the work directory: train (-> ``checkpoint.pt``), calibrate (->
``calibration.json``), evaluate (-> ``evaluation.json``, ``per_image.json``,
``summary.md``, plots; :func:`summarise_without_test` where there is no test
split) and export (-> ``models/<name>/<version>``). The command line that
runs them is model_export/cli.py.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.backbones import input_normalization, pretrained_cfg, weights_source
from model_export.data import (
    checkpoint_spec,
    checkpoint_split,
    fingerprint,
    labelled_images,
    load_tensor,
    split_paths,
)
from model_export.device import describe_device, describe_platform
from model_export.evaluation import evaluate_scores, masked_defectives, score, verdicts
from model_export.export import ExportMismatch, export_proven
from model_export.families import get_family, load_checkpoint
from model_export.report import write_plots, write_summary
from model_export.sources import (
    DataError,
    Source,
    check_images,
    check_test_split,
    good_images,
    mvtec_source,
    source_of,
)
from model_export.validation import synthetic_validation
from model_export.workdir import CHECKPOINT, TRAIN_STATE, identity, plan_training, write_training
from service.artifact import next_version, write_artifact
from service.calibration import conformal_thresholds, error_scales
from service.contract import (
    Calibration,
    Codec,
    Evaluation,
    InputSpec,
    ModelMetadata,
    Thresholds,
    TileGrid,
    TrainingData,
)
from service.recalibration import calibration_record, images_fingerprint


def _save(work: Path, name: str, obj: Any) -> None:
    (work / name).write_text(json.dumps(obj, indent=2) + "\n")


def _load(work: Path, name: str) -> Any:
    path = work / name
    if not path.is_file():
        raise DataError(f"{path} is missing: run the stage that writes it first")
    return json.loads(path.read_text())


def _checkpoint(
    work: Path, device: torch.device | str = "cpu"
) -> tuple[Any, Any, torch.nn.Module, dict[str, Any]]:
    if not (work / CHECKPOINT).is_file():
        raise DataError(
            f"{work / CHECKPOINT} is missing: train first "
            f"(inspection-train train ... --work {work})"
        )
    return load_checkpoint(work / CHECKPOINT, device)


def colour_spec(colour: str) -> InputSpec:
    """The default InputSpec with the images' colour ("RGB" or "grey"); the
    trainer sets the normalisation from the family's config."""
    return InputSpec.model_validate({**InputSpec().model_dump(), "color": colour})


def train(
    family_name: str,
    data: Path | Source,
    work: Path,
    config: dict[str, Any],
    holdout: float,
    seed: int,
    augment_codec: Codec | None = None,
    device: torch.device | None = None,
    force: bool = False,
    checked: tuple[list[Path], InputSpec] | None = None,
) -> None:
    """Fit the family on the good images of ``data`` (a Source, or an MVTec
    AD category) less a seeded hold-out -> ``work/checkpoint.pt``.

    A work directory that holds this same training finished is reused, one
    that holds it interrupted is resumed, one that holds another training is
    refused unless ``force`` (model_export/workdir.py). ``checked``: the good
    images and their InputSpec, where the caller has checked them already.
    """
    from tqdm import tqdm

    device = device or torch.device("cpu")
    family = get_family(family_name)
    cfg = family.config_from_dict(config)
    source = data if isinstance(data, Source) else mvtec_source(data)
    if checked is None:
        paths = good_images(source)
        checked = paths, colour_spec(check_images(paths))
    paths, spec = checked
    backbone_name, weights = family.backbone(cfg)
    backbone = pretrained_cfg(backbone_name)
    norm = input_normalization(backbone_name, cfg.input_normalisation)
    spec = spec.model_copy(update={"normalization": norm})
    fit_paths, hold = split_paths(paths, holdout, seed, str(source.good))
    codec_name = None if augment_codec is None else str(augment_codec)
    wanted = identity(
        family.name, cfg.to_dict(), source.good, fit_paths, hold, holdout, seed, codec_name,
        spec.model_dump(mode="json"),
    )  # fmt: skip
    plan = plan_training(work, wanted, force)
    if plan.action == "reuse":
        print(plan.message)
        return
    device_name = describe_device(device)
    platform_name = describe_platform(device)
    print(f"training {family.name} on {device_name} ({platform_name})")
    print(f"encoder: {weights_source(backbone_name, weights)}")
    mean, std = (tuple(round(v, 4) for v in t) for t in (norm.mean, norm.std))
    print(
        f"input: normalised with mean {mean}, std {std} "
        f"(input_normalisation={cfg.input_normalisation})"
    )
    if plan.message is not None:
        print(plan.message)
    write_training(work, wanted)
    t0 = time.perf_counter()
    images = [load_tensor(p, spec) for p in fit_paths]
    if augment_codec is not None:
        # Each fit image also as the line camera encodes it: the model learns
        # its artefacts as normal (P-WAE's per-pixel error statistics too).
        images += [load_tensor(p, spec, augment_codec) for p in fit_paths]
    if family.progress_total is not None:
        total = family.progress_total(cfg, len(images))
    else:
        total = len(images) * int(getattr(cfg, "epochs", 1))

    def on_epoch(record: dict[str, Any]) -> None:
        tqdm.write(_epoch_line(family.name, record))

    def on_stage(what: str) -> None:
        tqdm.write(f"{family.name} {what}")

    with tqdm(total=total, desc=family.name, unit="img", file=sys.stderr) as bar:
        model, log = family.fit(
            cfg, images, progress=bar.update, device=device, on_epoch=on_epoch,
            on_stage=on_stage, checkpoint=work / TRAIN_STATE, started=t0,
        )  # fmt: skip
    # Training's own time: settling, after it, reports its seconds apart.
    this_run = time.perf_counter() - t0
    settled: dict[str, Any] = {}
    if family.settle is not None:
        t_settle = time.perf_counter()
        with tqdm(desc=f"{family.name} settling", unit="img", file=sys.stderr) as bar:
            model, settled = family.settle(
                model, images, hold, spec, seed=seed, codec=augment_codec, progress=bar.update
            )
        if settled:
            chosen = ", ".join(f"{k}={v}" for k, v in settled["settings"].items())
            figures = ", ".join(f"{k} {v:.3f}" for k, v in settled["figures"].items())
            settled["seconds"] = round(time.perf_counter() - t_settle, 1)
            tqdm.write(
                f"{family.name} settled {chosen} on validation ({figures}) "
                f"in {settled['seconds']:.0f} s"
            )
    # The true training time: this run's, and the earlier runs' a resumed one continues.
    before = float(log.get("seconds_before", 0.0))
    seconds = before + this_run
    # Images/s over every epoch of the model (a resumed run's earlier ones too).
    steps = log["history"]
    images_per_s = (
        sum(r["images"] for r in steps) / sum(r["seconds"] for r in steps) if steps else None
    )
    torch.save(
        {
            **wanted,
            "state_dict": model.cpu().state_dict(),
            "data": str(source.data.resolve()),
            "layout": source.layout,
            "test": None if source.test is None else str(source.test.resolve()),
            "masks": None if source.masks is None else str(source.masks.resolve()),
            "dataset": source.dataset,
            "category": source.category,
            "backbone": backbone.model_dump(mode="json"),
            "train_seconds": seconds,
            "device": device_name,
            "platform": platform_name,
            "images_per_s": images_per_s,
            "log": log,
            "settled": settled,
        },
        work / CHECKPOINT,
    )
    speed = "" if images_per_s is None else f", {images_per_s:.2f} images/s over the epochs"
    resumed = (
        f" ({this_run:.0f} s in this run, {before:.0f} s in the earlier runs it resumed)"
        if plan.action == "resume"
        else ""
    )
    print(
        f"trained {family.name} on {len(fit_paths)} images in {seconds:.0f} s{resumed} on "
        f"{device_name}{speed}; {len(hold)} held out"
    )


def _epoch_line(family: str, record: dict[str, Any]) -> str:
    """One log line per epoch (and one for the frozen encoder's feature pass)."""
    what = (
        "features (frozen encoder, once)"
        if record["epoch"] == 0
        else f"epoch {record['epoch']}/{record['epochs']}"
    )
    loss = f", loss {record['loss']:.4f}" if "loss" in record else ""
    return (
        f"{family} {what}: {record['images']} images in {record['seconds']:.1f} s, "
        f"{record['images_per_s']:.2f} images/s{loss}"
    )


def calibrate(
    work: Path, target_fpr: float, codec: Codec | None = None, device: torch.device | None = None
) -> None:
    """Conformal thresholds (service.calibration) on the held-out images.

    The errors are normalised by their medians over the fit images, never the
    held-out ones, so the promise on new good images is exact. Every image
    first goes through the line camera's ``codec``. The model runs on ``device``.
    An evaluation of other thresholds left in ``work`` is removed: it no
    longer says what this model does.
    """
    _, _, model, ckpt = _checkpoint(work, device or "cpu")
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
    previous = work / "calibration.json"
    if previous.is_file() and json.loads(previous.read_text()).get("eps") != cal.eps.tolist():
        stale = [n for n in ("evaluation.json", "per_image.json") if (work / n).is_file()]
        for name in stale:
            (work / name).unlink()
        if stale:
            print(f"removed {', '.join(stale)}: they evaluated the earlier thresholds")
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


def evaluate(
    work: Path, device: torch.device | None = None, test: Path | None = None
) -> dict[str, float]:
    """The test split's figures: the one the checkpoint recorded, or ``test``."""
    _, _, model, ckpt = _checkpoint(work, device or "cpu")
    cal = _load(work, "calibration.json")
    eps = np.asarray(cal["eps"])
    source = source_of(ckpt, test)
    if source.test is None:
        raise DataError(
            "no test split to evaluate on: give --test DIR (good/ and a folder per defect kind)"
        )
    spec = checkpoint_spec(ckpt)
    check_test_split(source, spec)
    items = labelled_images(source.test, source.masks)
    record = Calibration.model_validate(cal["record"])
    codec = record.codec  # the test images as the calibrated camera would send them
    errors, maps = score(model, [p for p, _, _ in items], codec=codec, spec=spec)
    labels = np.array([y for _, y, _ in items])
    masks = np.stack([m for _, _, m in items])
    metrics = evaluate_scores(errors, maps, labels, masks, eps)
    metrics["good_images"] = float((labels == 0).sum())
    metrics["defective_images"] = float((labels == 1).sum())
    masked = masked_defectives(labels, masks)
    print(
        f"false rejects on test good images {metrics['false_reject_rate']:.2%} "
        f"(promised at most {record.promised_fpr:.2%} expected, "
        f"{record.fpr_upper_90:.2%} with 90% probability); "
        f"detected {metrics['detection_rate']:.2%} of defective ones ({codec})"
    )
    defective = int(metrics["defective_images"])
    if masked == 0:
        print(
            "pixel AUROC and PRO: not computed, no defective test image has a mask "
            "(ground_truth/<kind>/<name>_mask.png inside or beside the test folder)"
        )
    elif masked < defective:
        print(f"pixel AUROC and PRO over the {masked} of {defective} defective images with a mask")
    per_image = verdicts(items, errors, eps, source.test.parent)
    _save(work, "evaluation.json", metrics)
    _save(work, "per_image.json", per_image)
    write_plots(work, items, errors, maps, eps, labels)
    write_summary(work, ckpt, metrics, cal.get("validation"), masked, cal["record"])
    print(json.dumps(metrics, indent=2))
    return metrics


def summarise_without_test(work: Path) -> None:
    """summary.md for a model without a test split: training and validation."""
    ckpt = torch.load(work / CHECKPOINT, map_location="cpu", weights_only=False)
    cal = _load(work, "calibration.json")
    write_summary(work, ckpt, None, cal.get("validation"), None, cal["record"])


def export(work: Path, out: Path, name: str | None = None) -> float:
    """The graph, proven against torch on held-out images before anything is
    written (model_export/export.py; ExportMismatch where it differs), then
    the artifact ``out``; the largest onnxruntime-torch difference."""
    family, cfg, model, ckpt = _checkpoint(work)
    cal = _load(work, "calibration.json")
    ev = _load(work, "evaluation.json") if (work / "evaluation.json").is_file() else None
    data = Path(ckpt["data"])
    fit_paths = checkpoint_split(ckpt, "fit")
    manifest_path = data / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    # The proof: onnxruntime and torch agree on held-out defect-free images.
    hold = checkpoint_split(ckpt, "holdout")[:4]
    x = torch.stack([load_tensor(p, checkpoint_spec(ckpt)) for p in hold])
    try:
        onnx_bytes, diff = export_proven(family.to_onnx, model, x)
    except ExportMismatch as exc:
        raise ExportMismatch(f"{exc}; nothing was written to {out}") from None
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
            dataset=str(ckpt.get("dataset") or manifest.get("dataset", data.parent.name)),
            category=str(ckpt.get("category") or manifest.get("category", data.name)),
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
        # Checkpoints from before it was recorded were fitted on ImageNet
        # normalisation whatever the backbone: they say nothing.
        backbone=ckpt.get("backbone"),
        opset=family.opset,
        onnx_sha256="0" * 64,
        model_info={
            **family.describe(cfg),
            **{f"validation_{k}": round(v, 4) for k, v in cal.get("validation", {}).items()},
            **ckpt.get("settled", {}).get("figures", {}),
            # Training alone; settling after it apart (before 2026-12-02
            # train_seconds counted both).
            "train_seconds": round(float(ckpt["train_seconds"]), 1),
            **(
                {"settle_seconds": ckpt["settled"]["seconds"]}
                if "seconds" in ckpt.get("settled", {})
                else {}
            ),
            # Where and how fast it was trained (checkpoints from before
            # --device record neither: they were trained on the CPU).
            **({"train_device": ckpt["device"]} if ckpt.get("device") else {}),
            # Checkpoints from before 2026-12-03 do not record it.
            **({"train_platform": ckpt["platform"]} if ckpt.get("platform") else {}),
            **(
                {"train_images_per_s": round(float(ckpt["images_per_s"]), 2)}
                if ckpt.get("images_per_s")
                else {}
            ),
            **({"augment_codec": ckpt["augment_codec"]} if ckpt.get("augment_codec") else {}),
        },
    )
    write_artifact(out, onnx_bytes, metadata)
    if (work / "per_image.json").is_file():
        # The offline verdict of every test image, for checking a deployment
        # against (the server's integration test does).
        (out / "evaluation.json").write_text((work / "per_image.json").read_text())
    print(
        f"wrote {out} ({len(onnx_bytes) / 1e6:.1f} MB); onnxruntime vs torch max |diff| {diff:.2e}"
    )
    return diff


def version_dir(out: Path) -> Path:
    """``out`` if it names a version, else the next free version under it."""
    return out if out.name.isdigit() else out / str(next_version(out))
