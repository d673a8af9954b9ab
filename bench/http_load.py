"""End-to-end cost of the server next to the raw model, in one run.

    python -m bench.http_load models/bottle-pwae --clients 1,4,16,64

Starts ``python -m service`` on 127.0.0.1 (dynamic batching on, then off),
drives it with N closed-loop clients (bench.loadgen: one asyncio loop, one
keep-alive connection each, so the client takes little of the shared cores)
posting the same real image, and reports client-side p50/p95/p99 and
throughput. In the same run it times the raw onnxruntime session on that
image's tensor (batch 1 and the best batch size), so the ratio HTTP / raw is
what the server costs. Client and server share this machine's cores; the
server's onnxruntime uses its default thread count.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bench import loadgen
from bench.common import (
    OUT_HELP,
    Timing,
    add_server_settings,
    print_table,
    repeat,
    server_settings,
    write_json,
)
from service.artifact import DEFAULT_PROVIDERS, load_artifact
from service.contract import INPUT_NAME
from service.preprocessing import prepare
from tests.helpers.server import Server, run_server

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))


CORES = "client (bench.loadgen, one asyncio thread) and server share all cores of this machine"


def sample_image() -> tuple[bytes, str]:
    bottle = DATASETS / "mvtec_ad" / "bottle" / "test" / "broken_large"
    if bottle.is_dir():
        path = sorted(bottle.glob("*.png"))[0]
        return path.read_bytes(), str(path.relative_to(DATASETS))
    from tests.helpers.synthetic import encode_png, good_image

    return encode_png(good_image(np.random.default_rng(0))), "synthetic part (no datasets found)"


@contextlib.contextmanager
def serving(model_dir: Path, **settings: str) -> Iterator[Server]:
    """``python -m service`` on 127.0.0.1 with INSPECTION_<KEY> settings, as the tests start it."""
    with tempfile.TemporaryDirectory() as logs, run_server(model_dir, Path(logs), **settings) as s:
        yield s


def rss_mb(server: Server) -> float:
    for line in Path(f"/proc/{server.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def cpu_s(server: Server) -> float:
    """CPU seconds the server process has used, all its threads."""
    fields = Path(f"/proc/{server.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def drive(
    server: Server, data: bytes, clients: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """Closed loop: each client posts, waits for the answer, posts again.

    Besides latency and throughput, the CPU time that the server and this
    client spent per answered image: on shared cores, their sum bounds the
    throughput at cores / (server + client) whatever the batching does.
    """
    server_cpu, client_cpu = cpu_s(server), time.process_time()
    r = loadgen.closed_loop(loadgen.Target(server.base, data), clients, seconds, max_requests)
    server_cpu, client_cpu = cpu_s(server) - server_cpu, time.process_time() - client_cpu
    t = Timing(r.latencies_ms)
    done = max(1, len(r.latencies_ms))
    return {
        "clients": clients,
        **t.summary(),
        "throughput_per_s": round(len(r.latencies_ms) / r.wall_s, 2),
        "server_cpu_ms_per_image": round(1000 * server_cpu / done, 2),
        "client_cpu_ms_per_image": round(1000 * client_cpu / done, 2),
        "status_codes": {str(k): v for k, v in sorted(r.codes.items())},
        "client_errors": dict(r.errors),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=10.0, help="per setting")
    ap.add_argument("--max-requests", type=int, default=5000, help="per setting")
    ap.add_argument("--out", default="http_load", help=OUT_HELP)
    add_server_settings(ap)
    args = ap.parse_args(argv)
    data, source = sample_image()
    extra = server_settings(args)

    art = load_artifact(args.model_dir, DEFAULT_PROVIDERS)
    meta = art.metadata
    x = prepare(data, meta.input, meta.grid).tensor[None]
    cpu0 = time.process_time()
    raw1 = repeat(lambda: art.session.run(None, {INPUT_NAME: x}), budget_s=5)
    # onnxruntime's threads spin between ops here (its default, the fastest
    # when nothing else runs), so this CPU figure includes the spinning.
    raw1_cpu_ms = 1000 * (time.process_time() - cpu0) / (len(raw1.samples_ms) + 2)
    raw_pre = repeat(
        lambda: art.session.run(None, {INPUT_NAME: prepare(data).tensor[None]}), budget_s=5
    )
    best = {"batch": 1, "images_per_s": 1000 / raw1.p50}
    for b in (2, 4, 8, 16):
        xb = np.repeat(x, b, axis=0)
        tb = repeat(lambda xb=xb: art.session.run(None, {INPUT_NAME: xb}), budget_s=3)
        if 1000 * b / tb.p50 > best["images_per_s"]:
            best = {"batch": b, "images_per_s": 1000 * b / tb.p50}

    rows = []
    for batching in ("on", "off"):
        settings = {
            "max_batch_size": "16" if batching == "on" else "1",
            "max_queue": "256",
            **extra,
        }
        with serving(args.model_dir, **settings) as server:
            for n in (int(c) for c in args.clients.split(",")):
                drive(server, data, n, 1.0, 50)  # warm the connections and caches
                row = drive(server, data, n, args.seconds, args.max_requests)
                row["batching"] = batching
                row["server_rss_mb"] = round(rss_mb(server), 1)
                rows.append(row)
    print(f"image: {source}; model {meta.name}/{meta.version}")
    print(
        f"raw onnxruntime, batch 1: p50 {raw1.p50:.2f} ms; "
        f"with decode+resize: p50 {raw_pre.p50:.2f} ms; "
        f"best raw throughput {best['images_per_s']:.1f} images/s at batch {best['batch']}"
    )
    print_table(
        [
            "batching",
            "clients",
            "p50 ms",
            "p95 ms",
            "p99 ms",
            "images/s",
            "p50 / raw",
            "thr / best raw",
            "server cpu ms/img",
            "client cpu ms/img",
            "codes",
        ],
        [
            [
                r["batching"],
                r["clients"],
                r["p50_ms"],
                r["p95_ms"],
                r["p99_ms"],
                r["throughput_per_s"],
                round(r["p50_ms"] / raw_pre.p50, 3),
                round(r["throughput_per_s"] / best["images_per_s"], 3),
                r["server_cpu_ms_per_image"],
                r["client_cpu_ms_per_image"],
                r["status_codes"],
            ]
            for r in rows
        ],
    )
    payload = {
        "model": f"{meta.name}/{meta.version}",
        "image": source,
        "raw": {
            "batch1": raw1.summary(),
            "batch1_with_preprocessing": raw_pre.summary(),
            "best": best,
            "batch1_cpu_ms_per_image": round(raw1_cpu_ms, 2),
        },
        "server_settings": extra,
        "http": rows,
        "cores": CORES,
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
