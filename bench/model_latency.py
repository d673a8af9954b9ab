"""Raw model cost: onnxruntime latency and throughput per batch size.

    python -m bench.model_latency models/bottle-pwae models/bottle-otproto

For every model version given (the newest under each directory), runs the
graph on batches of 1, 2, 4, 8, 16 and 32 random normalised images with the
execution provider the server would pick (CUDA first, CPU here), and prints
ms per batch, ms per image and images per second. With ``--torch`` it also
times the family's torch module in eager mode with the same weights, from the
training checkpoint the artifact was exported from (trainer install only):

    python -m bench.model_latency models/bottle-pwae --torch runs/bottle-pwae/checkpoint.pt
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import OUT_HELP, print_table, repeat, write_json
from service.artifact import DEFAULT_PROVIDERS, load_artifact
from service.contract import INPUT_NAME

BATCH_SIZES = (1, 2, 4, 8, 16, 32)


def measure_ort(
    model_dir: Path, batch_sizes: tuple[int, ...], budget_s: float, threads: int
) -> dict[str, Any]:
    art = load_artifact(model_dir, DEFAULT_PROVIDERS, intra_op_threads=threads)
    meta = art.metadata
    rng = np.random.default_rng(0)
    rows = []
    for b in batch_sizes:
        x = rng.standard_normal((b, 3, meta.input.height, meta.input.width)).astype(np.float32)
        t = repeat(lambda x=x: art.session.run(None, {INPUT_NAME: x}), budget_s=budget_s)
        rows.append(
            {
                "batch": b,
                **t.summary(),
                "ms_per_image": round(t.p50 / b, 3),
                "images_per_s": round(1000 * b / t.p50, 2),
            }
        )
    size_mb = (art.path / "model.onnx").stat().st_size / 2**20
    return {
        "model": f"{meta.name}/{meta.version}",
        "family": meta.family,
        "provider": art.provider,
        "model_mb": round(size_mb, 2),
        "runtime": "onnxruntime",
        "rows": rows,
    }


def measure_torch(
    checkpoint: Path, batch_sizes: tuple[int, ...], budget_s: float, threads: int
) -> dict[str, Any]:
    import torch

    from model_export.families import load_checkpoint  # trainer install only

    torch.set_num_threads(threads or torch.get_num_threads())
    family, _, module, _ = load_checkpoint(checkpoint)
    rows = []
    with torch.inference_mode():
        for b in batch_sizes:
            x = torch.randn(b, 3, 300, 300)
            t = repeat(lambda x=x: module(x), budget_s=budget_s)
            rows.append(
                {
                    "batch": b,
                    **t.summary(),
                    "ms_per_image": round(t.p50 / b, 3),
                    "images_per_s": round(1000 * b / t.p50, 2),
                }
            )
    return {
        "model": str(checkpoint),
        "family": family.name,
        "provider": "cpu",
        "runtime": "torch-eager",
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", nargs="+", type=Path)
    ap.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    ap.add_argument("--budget-s", type=float, default=3.0, help="time per batch size")
    ap.add_argument("--threads", type=int, default=0, help="intra-op threads, 0 = all cores")
    ap.add_argument(
        "--torch",
        type=Path,
        action="append",
        default=[],
        metavar="CHECKPOINT",
        help="also time torch eager from this training checkpoint (repeatable)",
    )
    ap.add_argument("--out", default="model_latency", help=OUT_HELP)
    args = ap.parse_args(argv)
    sizes = tuple(int(s) for s in args.batch_sizes.split(","))
    results = []
    for d in args.model_dirs:
        results.append(measure_ort(d, sizes, args.budget_s, args.threads))
    for ckpt in args.torch:
        results.append(measure_torch(ckpt, sizes, args.budget_s, args.threads))
    table = [
        [
            r["model"],
            r["runtime"],
            r["provider"],
            row["batch"],
            row["p50_ms"],
            row["ms_per_image"],
            row["images_per_s"],
        ]
        for r in results
        for row in r["rows"]
    ]
    print_table(["model", "runtime", "provider", "batch", "p50 ms", "ms/image", "images/s"], table)
    print("wrote", write_json(args.out, {"results": results}))


if __name__ == "__main__":
    main()
