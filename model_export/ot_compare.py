"""Side-by-side report of exported model versions: quality, speed, size.

    python -m model_export.ot_compare models/bottle-pwae/8 models/bottle-otproto/6 \\
        runs/export/mt-otproto/1 ... --out docs/model-comparison.md

Quality figures come from each artifact's metadata (``evaluation.metrics``,
computed on the category's test split by the family's evaluate stage); the
inference cost is measured here, through onnxruntime's CPU provider on
batch-1 inputs, so every model is timed the same way on the same machine.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from service.artifact import load_artifact, resolve_version_dir
from service.contract import MODEL_FILE, ModelMetadata

# Each family's evaluate stage may name a metric slightly differently.
METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "image AUROC": ("image_auroc",),
    "max balanced accuracy": ("max_balanced_accuracy", "balanced_accuracy_max"),
    "pixel AUROC": ("pixel_auroc",),
    "PRO (30% FPR)": ("pro_30", "pro", "pro_auc"),
}

PAPER_ROWS = """\
| Paper figure | image AUROC | max balanced accuracy | pixel AUROC | PRO |
|---|---|---|---|---|
| OT prototypes (Trombetta & Lartizien 2025), MVTec AD, mean of 15 | 0.973 | - | 0.976 | - |
| P-WAE (Zhang et al.), MVTec AD bottle | 0.99 | 0.99 | - | - |
"""


HOW = """
## How the figures are made

* image AUROC and max balanced accuracy: of the continuous score
  max_k(e_k / eps_k) over e0..e9, on the category's test split.
* pixel AUROC: of the 300x300 anomaly map against the ground-truth masks
  (every second pixel in each direction).
* PRO: MVTec AD's per-region overlap, averaged over connected ground-truth
  regions and integrated over pixel false-positive rates 0..0.3, divided by 0.3.
* calibrated rule: thresholds eps0..eps9 set on held-out train/good images
  (seed 0; `--holdout auto`: 20%, or the 99 a 1% promise needs where that is
  more, at most half; 20% for versions before it) for a 1% false-reject
  target (service/calibration.py);
  "good rejected" and "defective detected" are what the line would see of
  it on the test split, and "promised" is what the calibration promised for
  new good images: the expected false-reject rate, and the rate one
  calibration draw stays under with 90% probability. Versions calibrated
  before the conformal method (per-error quantiles) promised nothing.
  "calibrated for" is the codec the calibration and the test images were
  passed through.
* OT prototypes (`python -m model_export run --family ot_prototypes --data
  <category> --work runs/<name> --export <artifact>`): frozen EfficientNet-Lite2
  fed its own input normalisation (`model_export/backbones.py`), an ensemble
  of five (scale, alpha) members; the default config, the same for both
  categories; docs/ot-prototypes.md lists the members and says where the
  family departs from the authors' code.
* P-WAE (`python -m model_export run --family pwae --data <category> --work
  runs/<name> --export <artifact>`): the default recipe, chosen on held-out
  images with synthetic defects (docs/pwae-experiments.md), the same command
  for both categories; where the error is measured and whether it is
  z-scored are settled on each category's own validation (`model_info`'s
  `error_space` and `error_normalisation`).
* `models/` holds only the default versions the server ships; the others are
  local run outputs under `runs/` (gitignored) that the commands above make
  again.
"""


def _metric(meta: ModelMetadata, names: tuple[str, ...]) -> str:
    metrics = meta.evaluation.metrics if meta.evaluation else {}
    for n in names:
        if n in metrics:
            return f"{metrics[n]:.3f}"
    return "-"


def _rule(meta: ModelMetadata) -> list[str]:
    """The calibrated rule as the line sees it: good parts rejected, defective
    ones detected, and what the calibration promised for the good ones."""
    m = meta.evaluation.metrics if meta.evaluation else {}
    cal = meta.calibration
    promise = (
        f"{cal.promised_fpr:.1%} / {cal.fpr_upper_90:.1%}"
        if cal.promised_fpr is not None and cal.fpr_upper_90 is not None
        else "none (per-error quantiles)"
    )
    if not all(k in m for k in ("fp", "tn", "fn", "tp")):
        return ["-", "-", promise, str(cal.codec)]
    good, bad = m["fp"] + m["tn"], m["tp"] + m["fn"]
    return [
        f"{m['fp']:.0f}/{good:.0f} ({m['fp'] / good:.1%})",
        f"{m['tp']:.0f}/{bad:.0f} ({m['tp'] / bad:.1%})",
        promise,
        str(cal.codec),
    ]


def time_model(path: Path, runs: int = 20, threads: int = 0) -> tuple[float, float]:
    """(median ms per image at batch 1, size in MB) through onnxruntime CPU."""
    art = load_artifact(path, providers=["CPUExecutionProvider"], intra_op_threads=threads)
    h, w = art.metadata.input.height, art.metadata.input.width
    x = np.random.default_rng(0).normal(size=(1, 3, h, w)).astype(np.float32)
    for _ in range(3):  # warm-up: allocations and kernel selection
        art.session.run(None, {"image": x})
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        art.session.run(None, {"image": x})
        times.append(time.perf_counter() - t0)
    size = (art.path / MODEL_FILE).stat().st_size / 1e6
    return statistics.median(times) * 1e3, size


def report(paths: Sequence[Path], runs: int) -> str:
    rows: list[str] = []
    details: list[str] = []
    for p in paths:
        version_dir = resolve_version_dir(p)
        ms, mb = time_model(version_dir, runs)
        art_meta = load_artifact(version_dir, providers=["CPUExecutionProvider"]).metadata
        cells = [_metric(art_meta, keys) for keys in METRIC_KEYS.values()]
        ev = art_meta.evaluation
        n_test = f"{ev.good_images}+{ev.defective_images}" if ev else "-"
        rows.append(
            f"| {art_meta.family} | {art_meta.training_data.category} | {' | '.join(cells)} "
            f"| {n_test} | {' | '.join(_rule(art_meta))} | {ms:.0f} | {mb:.1f} "
            f"| `{version_dir}` |"
        )
        info = ", ".join(f"{k}: {v}" for k, v in art_meta.model_info.items())
        details.append(
            f"* `{version_dir}` ({art_meta.family}, {art_meta.training_data.category}, "
            f"{art_meta.training_data.train_images} training images): {info}"
        )
    head = "| family | category | " + " | ".join(METRIC_KEYS) + " | test good+defective "
    head += "| good rejected | defective detected | promised false rejects (expected / 90%) "
    head += "| calibrated for "
    head += "| ms/image (ORT CPU, batch 1) | model.onnx MB | artifact |"
    sep = "|" + "---|" * (head.count("|") - 1)
    now = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return "\n".join(
        [
            "# Model comparison: P-WAE and OT prototypes",
            "",
            f"Generated {now} by `python -m model_export.ot_compare` on "
            f"{platform.machine()} with {_cpus()} CPU cores (onnxruntime CPU provider; "
            f"median of {runs} batch-1 runs after warm-up; 1-minute load average "
            f"{_load():.1f} when timing started). Quality figures are the "
            "artifacts' own evaluation on each category's test split; thresholds and "
            "hyper-parameters were never fitted on test images.",
            "",
            head,
            sep,
            *rows,
            "",
            "## The models in the table",
            "",
            *details,
            "",
            "## Published figures, for reference",
            "",
            PAPER_ROWS,
            HOW,
        ]
    )


def _load() -> float:
    import os

    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def _cpus() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(
        prog="python -m model_export.ot_compare",
        description="Quality, latency and size of exported model versions in one Markdown table.",
    )
    ap.add_argument("artifacts", nargs="+", type=Path, help="models/<name>/<version> directories")
    ap.add_argument("--out", type=Path, required=True, help="Markdown file to write")
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--notes", type=Path, help="Markdown appended after the tables")
    ap.add_argument(
        "--missing",
        action="append",
        default=[],
        metavar="TEXT",
        help="a model the table should have but does not (yet), and why; repeatable",
    )
    args = ap.parse_args(argv)
    text = report(args.artifacts, args.runs)
    if args.missing:
        text += "\n## Not in the table\n\n" + "".join(f"* {m}\n" for m in args.missing)
    if args.notes:
        text += "\n" + args.notes.read_text()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
