"""End-to-end cost of the server next to the raw model, in one run.

    python -m bench.http_load models/bottle-pwae --clients 1,4,16,64

Starts ``python -m service`` on 127.0.0.1 (dynamic batching on, then off),
drives it with N closed-loop clients (threads, one keep-alive connection
each) posting the same real image, and reports client-side p50/p95/p99 and
throughput. In the same run it times the raw onnxruntime session on that
image's tensor (batch 1 and the best batch size), so the ratio HTTP / raw is
what the server costs. Client and server share this machine's cores; the
server's onnxruntime uses its default thread count.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from bench.common import Timing, print_table, repeat, write_json
from service.artifact import DEFAULT_PROVIDERS, load_artifact
from service.contract import INPUT_NAME
from service.preprocessing import prepare

REPO = Path(__file__).resolve().parent.parent
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))


def sample_image() -> tuple[bytes, str]:
    bottle = DATASETS / "mvtec_ad" / "bottle" / "test" / "broken_large"
    if bottle.is_dir():
        path = sorted(bottle.glob("*.png"))[0]
        return path.read_bytes(), str(path.relative_to(DATASETS))
    from tests.helpers.synthetic import encode_png, good_image

    return encode_png(good_image(np.random.default_rng(0))), "synthetic part (no datasets found)"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServerProcess:
    def __init__(self, model_dir: Path, **settings: str) -> None:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTION_")}
        env.update({f"INSPECTION_{k.upper()}": v for k, v in settings.items()})
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "service",
                "--port",
                str(self.port),
                "--model-dir",
                str(model_dir),
            ],
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.2)
        raise RuntimeError("server did not become ready")

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        self.proc.wait(timeout=60)


def drive(
    base: str, data: bytes, clients: int, seconds: float, max_requests: int
) -> dict[str, Any]:
    """Closed loop: each client posts, waits for the answer, posts again."""
    stop = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: list[float] = []
    codes: dict[int, int] = {}
    sent = [0]

    def client() -> None:
        with httpx.Client(base_url=base, timeout=60) as c:
            while time.monotonic() < stop:
                with lock:
                    if sent[0] >= max_requests:
                        return
                    sent[0] += 1
                t0 = time.perf_counter()
                r = c.post("/v1/inspect", content=data, headers={"content-type": "image/png"})
                took = (time.perf_counter() - t0) * 1000
                with lock:
                    codes[r.status_code] = codes.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(took)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        for f in [pool.submit(client) for _ in range(clients)]:
            f.result()
    wall = time.perf_counter() - started
    t = Timing(latencies)
    return {
        "clients": clients,
        **t.summary(),
        "throughput_per_s": round(len(latencies) / wall, 2),
        "status_codes": codes,
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--seconds", type=float, default=10.0, help="per setting")
    ap.add_argument("--max-requests", type=int, default=5000, help="per setting")
    ap.add_argument("--out", default="http_load")
    args = ap.parse_args(argv)
    data, source = sample_image()

    art = load_artifact(args.model_dir, DEFAULT_PROVIDERS)
    meta = art.metadata
    x = prepare(data, meta.input, meta.grid).tensor[None]
    raw1 = repeat(lambda: art.session.run(None, {INPUT_NAME: x}), budget_s=5)
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
        settings = {"max_batch_size": "16" if batching == "on" else "1", "max_queue": "256"}
        server = ServerProcess(args.model_dir, **settings)
        try:
            for n in (int(c) for c in args.clients.split(",")):
                drive(server.base, data, n, 1.0, 50)  # warm the connections and caches
                row = drive(server.base, data, n, args.seconds, args.max_requests)
                row["batching"] = batching
                row["server_rss_mb"] = round(server.rss_mb(), 1)
                rows.append(row)
        finally:
            server.stop()
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
        },
        "http": rows,
        "cores": "client threads and server share all cores of this machine",
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
