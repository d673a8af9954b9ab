"""Training throughput: images/s per epoch of both model families on one device.

    python -m bench.train_speed --device cpu
    python -m bench.train_speed --device cuda --steps 20 --epochs 3

Trains each family with its default config (model_export.families, as
``inspection-train`` does) for ``--epochs`` epochs of ``--steps`` steps on
the first images of the real bottle category's fit split
(``$INSPECTION_DATASETS/mvtec_ad/bottle``, the dataset the tests use;
``--data`` for another), on ``--device`` (model_export.device: auto, cpu or
cuda), and prints and writes the images/s of every epoch. A step is one batch:
P-WAE's optimizer step on ``--batch-size`` images (default 8, its config's),
OT prototypes' transport update of every ensemble member on
``images_per_batch`` (64) images; an OT epoch runs every member over its images,
so its figure counts an image once per member. Both families first pass every
image once through their frozen encoder and cache the features; that pass is
timed on a line of its own (epoch 0), outside the epochs. The first epoch also
pays for warm-up (allocations; cuDNN's algorithm search on a GPU), so
``steady`` is the mean of the later ones.

Nothing is written under runs/ or models/; the results go to
bench/results/train_speed.json (``--out``) with the device's name (the GPU's,
from torch.cuda.get_device_name), torch's version, the thread count and the
platform (model_export.device.describe_platform).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import OUT_HELP, print_table, write_json
from model_export.data import category_spec, load_tensor, split_train
from model_export.device import (
    DEVICE_HELP,
    DEVICE_NAMES,
    DeviceUnavailable,
    describe_device,
    describe_platform,
    resolve_device,
)
from model_export.families import FAMILIES, get_family
from model_export.ot_prototypes import OTPrototypesConfig

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLE = DATASETS / "mvtec_ad" / "bottle"


def measure(
    family_name: str,
    images: list[torch.Tensor],
    device: torch.device,
    steps: int,
    epochs: int,
    batch_size: int,
) -> dict[str, Any]:
    """Fit ``family_name`` for ``epochs`` of ``steps`` steps on the first of
    ``images`` and return its epoch records and images/s."""
    family = get_family(family_name)
    overrides: dict[str, Any] = {"epochs": epochs}
    if family_name == "pwae":
        overrides["batch_size"] = batch_size
    cfg = family.config_from_dict(overrides)
    per_step = int(getattr(cfg, "batch_size", 0) or cfg.images_per_batch)
    images = images[: steps * per_step]
    records: list[dict[str, Any]] = []

    def on_epoch(record: dict[str, Any]) -> None:
        r = {k: round(v, 4) if isinstance(v, float) else v for k, v in record.items()}
        records.append({k: v for k, v in r.items() if k != "epochs"})
        what = "features" if r["epoch"] == 0 else f"epoch {r['epoch']}"
        member = f" {r['member']}" if "member" in r else ""
        print(
            f"  {family_name}{member} {what}: {r['images']} images "
            f"in {r['seconds']:.2f} s, {r['images_per_s']:.2f} images/s",
            flush=True,
        )

    t0 = time.perf_counter()
    family.fit(cfg, images, device=device, on_epoch=on_epoch)
    total = time.perf_counter() - t0
    epochs_only = [r for r in records if r["epoch"] >= 1]
    per_epoch: dict[int, dict[str, float]] = {}
    for r in epochs_only:  # one record per epoch (older OT runs: one per member, summed)
        e = per_epoch.setdefault(r["epoch"], {"images": 0.0, "seconds": 0.0})
        e["images"] += r["images"]
        e["seconds"] += r["seconds"]
    figures = [e["images"] / e["seconds"] for _, e in sorted(per_epoch.items())]
    return {
        "family": family_name,
        "images": len(images),
        "steps_per_epoch": max(1, len(images) // per_step),
        "images_per_step": per_step,
        "records": records,
        "images_per_s_per_epoch": [round(f, 3) for f in figures],
        "images_per_s_steady": round(statistics.fmean(figures[1:] or figures), 3),
        "wall_seconds": round(total, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="auto", choices=DEVICE_NAMES, help=DEVICE_HELP)
    ap.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated (default: both)"
    )
    ap.add_argument(
        "--steps", type=int, default=4, help="steps (batches) per epoch, each family (default 4)"
    )
    ap.add_argument("--batch-size", type=int, default=8, help="P-WAE's batch (its default 8)")
    ap.add_argument("--epochs", type=int, default=2, help="epochs per family (the first warms up)")
    ap.add_argument("--data", type=Path, default=BOTTLE, help="category in MVTec AD layout")
    ap.add_argument("--out", default="train_speed", help=OUT_HELP)
    args = ap.parse_args(argv)
    try:
        device = resolve_device(args.device)
    except DeviceUnavailable as e:
        ap.error(str(e))
    if not (args.data / "train" / "good").is_dir():
        ap.error(f"{args.data}/train/good not found (set INSPECTION_DATASETS or --data)")
    if args.steps < 1 or args.epochs < 1 or args.batch_size < 2:
        ap.error("--steps and --epochs must be >= 1, --batch-size >= 2")
    families = [f for f in args.families.split(",") if f]
    for f in families:
        if f not in FAMILIES:
            ap.error(f"unknown family {f!r}; choose from {sorted(FAMILIES)}")

    load = round(os.getloadavg()[0], 2)
    fit_paths, _ = split_train(args.data, 0.2, 0)  # the trainer's fit split, default seed
    n = min(
        len(fit_paths), args.steps * max(args.batch_size, OTPrototypesConfig().images_per_batch)
    )
    spec = category_spec(args.data)
    images = [load_tensor(p, spec) for p in fit_paths[:n]]
    name, platform = describe_device(device), describe_platform(device)
    print(
        f"{args.data}: {args.epochs} epochs of {args.steps} steps on {name} "
        f"({platform}); load average {load}"
    )
    results = [
        measure(f, images, device, args.steps, args.epochs, args.batch_size) for f in families
    ]
    epoch_heads = [f"epoch {i + 1} img/s" for i in range(args.epochs)]
    rows = []
    for r in results:
        features = next((x["images_per_s"] for x in r["records"] if x["epoch"] == 0), "-")
        per_epoch, steady = r["images_per_s_per_epoch"], r["images_per_s_steady"]
        rows.append([r["family"], name, r["images"], *per_epoch, steady, features])
    print_table(
        ["family", "device", "images", *epoch_heads, "steady img/s", "features img/s"], rows
    )
    payload = {
        # The machine is shared: a load above its cores slows every figure.
        "load_average_1min_at_start": load,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "threads": torch.get_num_threads(),
        "platform": platform,
        "data": str(args.data),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "epochs": args.epochs,
        "results": results,
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
