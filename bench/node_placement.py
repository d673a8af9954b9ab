"""Which execution provider runs each node of a model's graph, as the server opens it.

    python -m bench.node_placement models/bottle-pwae models/bottle-otproto

For every model version given, opens the graph with the server's providers
(CUDA first), once with the batch dimension free and once pinned to each
size given (as the server's per-size sessions are, service/batch_shapes.py),
runs one batch with onnxruntime's profiler on, and counts the nodes each
provider ran, with the op types of those that ran on the CPU. Under the CUDA
provider every CPU-placed node between GPU kernels is a copy between host and
device; on a CPU-only machine everything is the CPU's and the table shows the
graph's size, shape computations included, before and after pinning.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from bench.common import OUT_HELP, print_table, write_json
from service.artifact import DEFAULT_PROVIDERS, available_providers, resolve_version_dir
from service.contract import INPUT_NAME, MODEL_FILE


def placement(model: Path, batch: int, pinned: bool) -> dict[str, Any]:
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        if pinned:
            options.add_free_dimension_override_by_name("N", batch)
        session = ort.InferenceSession(
            str(model), options, providers=available_providers(DEFAULT_PROVIDERS)
        )
        x = np.zeros((batch, 3, 300, 300), np.float32)
        session.run(None, {INPUT_NAME: x})
        events = json.loads(Path(session.end_profiling()).read_text())
    per_node: dict[str, tuple[str, str]] = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") == "Node" and "provider" in args:
            name = e["name"].removesuffix("_kernel_time")
            per_node[name] = (args["provider"], args.get("op_name", "?"))
    providers = collections.Counter(p for p, _ in per_node.values())
    cpu_ops = collections.Counter(op for p, op in per_node.values() if p == "CPUExecutionProvider")
    return {
        "batch": batch,
        "batch_dim": "pinned" if pinned else "free",
        "provider": session.get_providers()[0],
        "nodes": len(per_node),
        "by_provider": dict(providers),
        "cpu_op_types": dict(cpu_ops.most_common()),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dirs", type=Path, nargs="+")
    ap.add_argument("--batches", default="1,8", help="pinned batch sizes to look at")
    ap.add_argument("--out", default="node_placement", help=OUT_HELP)
    args = ap.parse_args(argv)
    results = []
    for model_dir in args.model_dirs:
        version_dir = resolve_version_dir(model_dir)
        name = f"{version_dir.parent.name}/{version_dir.name}"
        batches = [int(b) for b in args.batches.split(",")]
        for pinned in (False, True):
            for b in batches:
                results.append({"model": name, **placement(version_dir / MODEL_FILE, b, pinned)})
    print_table(
        ["model", "provider", "batch", "batch dim", "nodes", "by provider", "CPU op types"],
        [
            [
                r["model"],
                r["provider"],
                r["batch"],
                r["batch_dim"],
                r["nodes"],
                r["by_provider"],
                ", ".join(f"{k} {v}" for k, v in list(r["cpu_op_types"].items())[:8]),
            ]
            for r in results
        ],
    )
    print("wrote", write_json(args.out, {"results": results}))


if __name__ == "__main__":
    main()
