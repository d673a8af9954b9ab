"""The trainer: train, calibrate, validate, evaluate and export a model of either family.

One command, from a plain folder of defect-free images (any size; PNG, JPEG,
BMP, TIFF; subfolders too):

    inspection-train run --good path/to/good_images [--test path/to/test]

holds out a seeded fifth of the images, trains on the rest, calibrates the
thresholds on the held-out ones, validates on them with synthetic defects
pasted in, and exports the next version of ``models/<name>-<family>``; with
``--test`` (``good/`` and a folder per defect kind, masks optional) it adds
the test-split figures. ``inspection-train predict MODEL_DIR IMAGES...``
then gives the server's verdicts on any images, offline. A category in MVTec
AD layout trains with ``--data`` instead of ``--good`` (``--export`` then says
where to export: nothing is exported without it):

    inspection-train run --family pwae --data ../shared/datasets/mvtec_ad/bottle \\
        --work runs/bottle-pwae --export models/bottle-pwae

Stages (each reads what the previous one wrote under --work; ``<stage> --help``
says more):

* ``train``: a seeded fraction of the good images is held out (never test
  images); the family is fitted on the rest by the shared trainer
  (model_export/trainer.py) -> ``checkpoint.pt``. It also keeps
  ``train_state.pt`` after every epoch; an interrupted run resumes from it, a
  finished one is reused (model_export/workdir.py), and the trainer says which.
* ``calibrate``: e0..e9 on the held-out defect-free images -> eps0..eps9 for a
  target false-positive rate of the whole rule, and, from the same images
  with synthetic defects pasted in, the validation AUROC that configurations
  are chosen by (model_export/validation.py) -> ``calibration.json``.
* ``evaluate``: the test split -> image AUROC and max balanced accuracy of
  max_k(ek/epsk), AUROC of e0, confusion matrix of the rule, pixel AUROC, PRO
  (where there are masks) -> ``evaluation.json``, ``per_image.json``,
  ``summary.md`` and PNG plots.
* ``export``: the graph (model_export/export.py), proven first: onnxruntime's
  outputs against torch's on held-out images, a mismatch stopping the
  command with a sentence and nothing written; then models/<name>/<version>/
  per the contract (service.artifact; given models/<name>, the next free version).
* ``run``: all four (evaluate where there is a test split).

Everything a run needs is checked before any work: the flags and settings,
every image (read by the server's own code, service.preprocessing), the
number of held-out images against the calibration target, the work
directory, and the export version.

``--device auto|cpu|cuda`` (model_export/device.py) says where torch trains,
calibrates and evaluates: ``auto``, the default, takes the GPU where torch
sees one; ``cpu`` is the path every figure in docs/ was measured on and is
unchanged. The trainer logs the device at start and each epoch's images/s,
and the artifact records both (``model_info``: ``train_device``,
``train_images_per_s``). Export always runs on the CPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import textwrap
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
import torch

from model_export import predict
from model_export.backbones import input_normalization, pretrained_cfg, weights_source
from model_export.config_args import ConfigError, build_config
from model_export.data import (
    checkpoint_spec,
    checkpoint_split,
    fingerprint,
    holdout_count,
    labelled_images,
    load_tensor,
    split_paths,
)
from model_export.device import (
    DEVICE_HELP,
    DEVICE_NAMES,
    DeviceUnavailable,
    describe_device,
    resolve_device,
)
from model_export.evaluation import evaluate_scores, masked_defectives, score, verdicts
from model_export.export import ExportMismatch, export_proven
from model_export.families import FAMILIES, get_family, load_checkpoint
from model_export.report import write_plots, write_summary
from model_export.sources import (
    DataError,
    Source,
    check_images,
    check_test_split,
    folder_source,
    good_images,
    mvtec_source,
    source_of,
)
from model_export.validation import synthetic_validation
from model_export.workdir import (
    CHECKPOINT,
    TRAIN_STATE,
    WorkDirConflict,
    identity,
    plan_training,
    write_training,
)
from service.artifact import next_version, write_artifact
from service.calibration import (
    conformal_thresholds,
    error_scales,
    images_for_target,
    promised_fpr,
)
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
from service.rejection import InputRejected

DEFAULT_TARGET_FPR = 0.01
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # service.contract's ModelMetadata.name


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


def _spec(colour: str) -> InputSpec:
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
        checked = paths, _spec(check_images(paths))
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
    print(f"training {family.name} on {device_name} (torch {torch.__version__})")
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
    this_run = time.perf_counter() - t0
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
            "images_per_s": images_per_s,
            "log": log,
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
            "train_seconds": round(float(ckpt["train_seconds"]), 1),
            # Where and how fast it was trained (checkpoints from before
            # --device record neither: they were trained on the CPU).
            **({"train_device": ckpt["device"]} if ckpt.get("device") else {}),
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


# --- the command line -----------------------------------------------------------------


STAGES = {
    "run": (
        "all stages: train, calibrate (with validation), evaluate where there is a test "
        "split, export",
        """\
Train, calibrate, validate, evaluate and export in one go:

  1. train      a seeded --holdout fraction (default 0.2) of the good images is held
                out; the family (--family, default pwae) is fitted on the rest
                -> <work>/checkpoint.pt. A work directory holding this same
                training is reused (finished) or resumed (interrupted), and the
                trainer says so; one holding another training is refused unless
                --force.
  2. calibrate  thresholds eps0..eps9 on the held-out images for --target-fpr
                (default 1% false rejects on new good parts), and validation:
                the same images with synthetic defects pasted in (no test image)
                -> <work>/calibration.json
  3. evaluate   only where there is a test split (--test DIR, or test/ of a --data
                category) -> <work>/evaluation.json, per_image.json, plots;
                <work>/summary.md either way
  4. export     the next version of the model directory, checked against torch
                with onnxruntime

Where things go: with --good DIR the name is DIR's (or its parent's where DIR is
called good or train; --name sets it), <work> defaults to runs/<name>-pwae and
the export to models/<name>-pwae (-otproto for ot_prototypes; --no-export: none).
With --data the export happens only where --export is given.

Everything is checked before any work: flags and --set values, every image
(read as the server reads it), the held-out images against the calibration
target, the work directory and the export version.

Examples:
  inspection-train run --good photos/good
  inspection-train run --good photos/good --test photos/test --set epochs=10
  inspection-train run --family ot_prototypes --data mvtec_ad/bottle \\
      --work runs/bottle-ot --export models/bottle-otproto
""",
    ),
    "train": (
        "fit the family on the good images less a held-out fraction -> checkpoint.pt",
        "Fit the family on the good images (--good DIR or --data CATEGORY) less a seeded "
        "--holdout fraction -> <work>/checkpoint.pt. A finished training of the same "
        "images and settings in <work> is reused, an interrupted one resumed, "
        "another refused unless --force.",
    ),
    "calibrate": (
        "thresholds on the held-out images, and validation on synthetic defects",
        "Thresholds eps0..eps9 on the held-out images for --target-fpr, the images sent "
        "as --codec; validation: the same images with synthetic defects pasted in "
        "-> <work>/calibration.json.",
    ),
    "evaluate": (
        "figures on a test split (good/ and a folder per defect kind)",
        "Image AUROC, balanced accuracy, the calibrated rule's false rejects and "
        "detections, pixel AUROC and PRO where there are masks, on the test split the "
        "training recorded or --test DIR -> <work>/evaluation.json, per_image.json, "
        "summary.md, plots.",
    ),
    "export": (
        "write models/<name>/<version> and check it against torch",
        "Write the model version (--export models/<name> for its next free version, or "
        "models/<name>/<version>) from <work>, and compare onnxruntime's outputs with "
        "torch's on held-out images.",
    ),
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text:
            return text
        if action.default is None or action.default is False or action.default == []:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _common() -> argparse.ArgumentParser:
    """The flags every stage takes (each stage reads those it needs)."""
    ap = argparse.ArgumentParser(add_help=False)
    data = ap.add_argument_group("images")
    data.add_argument(
        "--good", type=Path, help="a folder of defect-free images, subfolders too (any size)"
    )
    data.add_argument(
        "--test",
        type=Path,
        help="a test folder: good/ and one folder per defect kind; masks optional, as "
        "ground_truth/<kind>/<name>_mask.png inside or beside it",
    )
    data.add_argument(
        "--data", type=Path, help="instead of --good: a category directory in MVTec AD layout"
    )
    where = ap.add_argument_group("where")
    where.add_argument(
        "--work", type=Path, help="checkpoint and reports (default with --good or --data: "
        "runs/<name>-pwae or runs/<name>-otproto)",
    )  # fmt: skip
    where.add_argument(
        "--export",
        dest="out",
        type=Path,
        help="models/<name>/<version>, or models/<name> for its next free version "
        "(default with --good: models/<name>-pwae or models/<name>-otproto)",
    )
    where.add_argument("--no-export", action="store_true", help="run: do not export")
    where.add_argument("--name", help="the model's name for the default --work and --export")
    where.add_argument(
        "--force",
        action="store_true",
        help="train afresh, deleting what the trainer wrote in --work",
    )
    training = ap.add_argument_group("training")
    training.add_argument(
        "--family",
        default="pwae",
        choices=sorted(FAMILIES),
        help=", ".join(f"{name} ({entry.summary})" for name, entry in FAMILIES.items()),
    )
    training.add_argument(
        "--preset", help="a named config of the family to start from, e.g. pwae's 'paper'"
    )
    training.add_argument("--config", type=Path, help="JSON of the family's config fields")
    training.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set epochs=5 or --set backbone=resnet50 "
        "(JSON, or a bare word); repeatable",
    )
    training.add_argument(
        "--holdout", type=float, default=0.2, help="fraction of the good images held out"
    )
    training.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    training.add_argument(
        "--augment-codec",
        type=Codec.parse,
        help="train: add each fit image also passed through this codec, e.g. jpeg:90",
    )
    training.add_argument("--device", default="auto", choices=DEVICE_NAMES, help=DEVICE_HELP)
    cal = ap.add_argument_group("calibration")
    cal.add_argument(
        "--target-fpr",
        type=float,
        help=f"false-reject rate to promise on new good parts (default {DEFAULT_TARGET_FPR}); "
        "an explicit target the held-out images cannot keep stops the run before training",
    )
    cal.add_argument(
        "--codec",
        type=Codec.parse,
        default=Codec(),
        help="what the line's camera sends, e.g. png or jpeg:90; calibration "
        "and evaluation pass their images through it",
    )
    return ap


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="inspection-train",
        description=__doc__.split("\n\n")[0]
        + "\n\n"
        + __doc__.split("\n\n")[1]
        + "\n\n    inspection-train run --good path/to/good_images [--test path/to/test]",
        formatter_class=_Help,
        epilog="`inspection-train <stage> --help` says what a stage reads, writes and defaults to.",
    )
    subs = ap.add_subparsers(dest="stage", required=True, metavar="stage")
    common = _common()
    for name, (short, long) in STAGES.items():
        text = long if "\n" in long else textwrap.fill(long, 80)
        subs.add_parser(name, parents=[common], help=short, description=text, formatter_class=_Help)
    pred = subs.add_parser(
        "predict",
        help="the server's verdicts on images, offline: a CSV and an overlay per image",
        description=predict.__doc__,
        formatter_class=_Help,
    )
    pred.add_argument(
        "model_dir", type=Path, help="models/<name> (its newest version) or models/<name>/<v>"
    )
    pred.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    pred.add_argument(
        "--out", type=Path, default=Path("predictions"), help="where the CSV and overlays go"
    )
    return ap


@dataclass(frozen=True)
class Job:
    """What a stage will do, resolved and checked before any work."""

    source: Source | None
    config: Any
    work: Path
    out: Path | None
    target_fpr: float
    checked: tuple[list[Path], InputSpec] | None


def _fail(stage: str, message: str) -> NoReturn:
    print(f"inspection-train {stage}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def _images_needed(need: int, holdout: float) -> int:
    """The fewest good images whose hold-out has ``need`` images."""
    n = max(2, math.ceil(need / holdout))
    while holdout_count(n, holdout) < need:
        n += 1
    return n


def _check_target(n: int, holdout: float, target: float, explicit: bool) -> None:
    """The held-out images against the calibration target, before any work."""
    need = images_for_target(target)  # a valid target: _resolve checked it
    n_hold = holdout_count(n, holdout)
    if n_hold >= need:
        return
    best = promised_fpr(n_hold, target)
    what = (
        f"{n} good images, {n_hold} of them held out to calibrate (--holdout {holdout}), can "
        f"promise a false-reject rate of at best {best:.2%} on new good parts; {target:.2%} "
        f"needs {need} held-out images, about {_images_needed(need, holdout)} good images"
    )
    if explicit:
        raise DataError(
            f"--target-fpr {target} cannot be kept: {what}. Add good images, raise --holdout, "
            f"or ask for --target-fpr {math.ceil(best * 1e4) / 1e4:g}"
        )
    print(
        f"note: {what}; the thresholds will promise {best:.2%} (metadata and summary say so)",
        file=sys.stderr,
    )


def _resolve(args: argparse.Namespace) -> Job:
    """Every check that needs no training, in the order a user would fix them."""
    stage = args.stage
    training = stage in ("train", "run")
    if args.good is not None and args.data is not None:
        raise DataError("--good and --data: give one (--good for a plain folder of good images)")
    if args.test is not None and args.data is not None:
        raise DataError("--test goes with --good; a --data category's test split is its test/")
    if not 0 < args.holdout < 1:
        raise ConfigError(f"--holdout {args.holdout}: a fraction between 0 and 1, e.g. 0.2")
    family = get_family(args.family)
    config = build_config(family, args.preset, args.config, args.set) if training else None
    source: Source | None = None
    if args.good is not None:
        source = folder_source(args.good, args.test)
    elif args.data is not None and training:
        source = mvtec_source(args.data)
    elif training:
        raise DataError(
            "no images: give --good DIR (a folder of defect-free images) or --data CATEGORY "
            "(MVTec AD layout)"
        )
    if args.name is not None and not MODEL_NAME.match(args.name):
        raise ConfigError(f"--name {args.name}: letters, digits and _ . - only")
    name = args.name
    if name is None and source is not None:  # made fit for a directory name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.category).strip("-.") or "model"
    suffix = FAMILIES[family.name].suffix
    work = args.work
    if work is None:
        if name is None:
            raise ConfigError("--work is needed: the folder the train stage wrote to")
        work = Path("runs") / f"{name}-{suffix}"
    out = args.out
    folder = source is not None and source.layout == "folder"
    if out is None and folder and not args.no_export and stage in ("run", "export"):
        out = Path("models") / f"{name}-{suffix}"
    if stage == "export" and out is None:
        raise ConfigError("--export models/<name>[/<version>] is needed to export")
    if stage in ("run", "export") and out is not None and not args.no_export:
        _check_export(out)
    else:
        out = None
    target = DEFAULT_TARGET_FPR if args.target_fpr is None else args.target_fpr
    try:
        images_for_target(target)
    except ValueError as exc:
        raise ConfigError(f"--target-fpr {target}: {exc}") from None
    checked = None
    if training:
        assert source is not None
        paths = good_images(source)
        if len(paths) < 2:
            raise DataError(
                f"{source.good} holds 1 image; training needs at least 2: images to fit on, "
                "and images held out to calibrate the thresholds on"
            )
        spec = _spec(check_images(paths))
        checked = paths, spec
        if stage == "run":
            _check_target(len(paths), args.holdout, target, args.target_fpr is not None)
            check_test_split(source, spec)
    elif stage in ("calibrate", "evaluate", "export") and not (work / CHECKPOINT).is_file():
        raise DataError(f"{work / CHECKPOINT} is missing: train first (--work {work})")
    return Job(source, config, work, out, target, checked)


def _check_export(out: Path) -> None:
    """The export target, before any work: a new version of a valid name."""
    name = out.parent.name if out.name.isdigit() else out.name
    if not MODEL_NAME.match(name):
        raise ConfigError(
            f"--export {out}: the model directory's name {name!r} may hold letters, digits "
            "and _ . - only"
        )
    if out.name.isdigit() and out.exists():
        raise ConfigError(
            f"--export {out} already exists and versions are immutable: give the model "
            f"directory ({out.parent}) to write its next free version, or another version"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--export {out} is a file, not a model directory")


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    stage = args.stage
    if stage == "predict":
        code = predict.main(args.model_dir, args.images, args.out)
        if code:
            raise SystemExit(code)
        return
    device = torch.device("cpu")
    if stage != "export":  # export runs on the CPU
        try:
            device = resolve_device(args.device)
        except DeviceUnavailable as e:
            _fail(stage, str(e))
    try:
        job = _resolve(args)
        _run(args, job, device)
    except (DataError, ConfigError, WorkDirConflict, InputRejected, ExportMismatch) as exc:
        _fail(stage, str(exc))


def _run(args: argparse.Namespace, job: Job, device: torch.device) -> None:
    stage = args.stage
    if stage == "run":
        assert job.source is not None and job.checked is not None
        n = len(job.checked[0])
        test = "no test split" if job.source.test is None else f"test split {job.source.test}"
        where = "no export" if job.out is None else f"exports the next version of {job.out}"
        print(
            f"inspection-train run: {args.family} on {n} good images from {job.source.good} "
            f"({holdout_count(n, args.holdout)} held out), {test}; work in {job.work}; {where}"
        )
    if stage in ("train", "run"):
        assert job.source is not None
        train(
            args.family, job.source, job.work, job.config.to_dict(), args.holdout, args.seed,
            args.augment_codec, device, args.force, job.checked,
        )  # fmt: skip
    if stage in ("calibrate", "run"):
        calibrate(job.work, job.target_fpr, args.codec, device)
    if stage == "evaluate":
        evaluate(job.work, device, args.test)
    elif stage == "run":
        if job.source is not None and job.source.test is not None:
            evaluate(job.work, device)
        else:
            summarise_without_test(job.work)
            print("no test split (--test DIR adds its figures): validation is the quality figure")
    if job.out is not None:
        version = version_dir(job.out)
        export(job.work, version)
        if stage == "run":
            print(
                f"done: {version}; {job.work / 'summary.md'} says how it did. Serve it with "
                f"`python -m service --model-dir {job.out}`; try it on images with "
                f"`inspection-train predict {job.out} IMAGES...`"
            )
    elif stage == "run":
        why = "--no-export" if args.no_export else "no --export given"
        print(f"not exported ({why}); {job.work / 'summary.md'} says how it did")


if __name__ == "__main__":
    main()
