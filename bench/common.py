"""Shared pieces of the benchmarks: timing, percentiles, the machine, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_export.processor import processor_name

RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> dict[str, Any]:
    """What the figures were measured on; printed with every table."""
    import onnxruntime as ort

    info: dict[str, Any] = {
        "cpu": processor_name(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    gpu = gpus()
    if gpu:
        info["gpus"] = gpu
    return info


def gpus() -> list[dict[str, str]]:
    """The NVIDIA GPUs nvidia-smi sees (name, driver, memory); none where it is absent."""
    import shutil
    import subprocess

    if shutil.which("nvidia-smi") is None:
        return []
    query = "--query-gpu=name,driver_version,memory.total"
    try:
        out = subprocess.run(
            ["nvidia-smi", query, "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    rows = [line.split(", ") for line in out.strip().splitlines() if line.strip()]
    return [{"name": r[0], "driver": r[1], "memory": r[2]} for r in rows if len(r) == 3]


@dataclass(frozen=True)
class Timing:
    """Latencies of repeated calls, in milliseconds."""

    samples_ms: list[float]

    @property
    def p50(self) -> float:
        return percentile(self.samples_ms, 50)

    @property
    def p95(self) -> float:
        return percentile(self.samples_ms, 95)

    @property
    def p99(self) -> float:
        return percentile(self.samples_ms, 99)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.samples_ms)

    def summary(self) -> dict[str, float]:
        return {
            "n": len(self.samples_ms),
            "p50_ms": round(self.p50, 3),
            "p95_ms": round(self.p95, 3),
            "p99_ms": round(self.p99, 3),
            "mean_ms": round(self.mean, 3),
        }


def percentile(samples: list[float], q: float) -> float:
    """Nearest-rank percentile; exact on the samples, no interpolation."""
    if not samples:
        raise ValueError("no samples")
    ordered = sorted(samples)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def repeat(
    fn: Callable[[], object], min_runs: int = 5, budget_s: float = 3.0, warmup: int = 2
) -> Timing:
    """Call ``fn`` after ``warmup`` calls until ``budget_s`` passed and ``min_runs`` ran."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < min_runs or time.perf_counter() - start < budget_s:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1000)
    return Timing(samples)


def add_server_settings(ap: argparse.ArgumentParser) -> None:
    """``--server-setting KEY=VALUE``, repeatable: INSPECTION_* settings of the started server."""
    ap.add_argument(
        "--server-setting",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="an INSPECTION_* setting for the server, e.g. intra_op_spinning=true",
    )


def server_settings(args: argparse.Namespace) -> dict[str, str]:
    return dict(item.split("=", 1) for item in args.server_setting)


def command() -> str:
    """The command line that is running, as a person would type it again."""
    import shlex
    import sys

    return shlex.join(["python", "-m", f"bench.{Path(sys.argv[0]).stem}", *sys.argv[1:]])


OUT_HELP = "results file: a name under bench/results, or a path ending in .json"


def write_json(name: str, payload: dict[str, Any]) -> Path:
    """bench/results/<name>.json, or ``name`` itself where it is a path ending in
    .json: the payload, the machine and the command that measured it."""
    path = Path(name) if name.endswith(".json") else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"machine": machine(), "command": command(), **payload}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def print_table(headers: list[str], rows: list[list[object]]) -> None:
    cells = [[str(h) for h in headers]] + [
        [f"{c:.2f}" if isinstance(c, float) else str(c) for c in r] for r in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
        if i == 0:
            print("  ".join("-" * w for w in widths))
