"""Where the server's CPU time goes under load: py-spy on a live server.

    python -m bench.profile_server models/bottle-pwae --clients 16 --seconds 20

Starts ``python -m service`` on 127.0.0.1, drives it with N closed-loop
clients (bench.loadgen) and, at the same time, samples every thread of the
server with py-spy (``pip install py-spy``). Each sample whose thread was on
a CPU is put in the first bucket, from the innermost frame out, that one of
its frames belongs to (onnxruntime inference, image decode and resize, HTTP
parsing, JSON, heatmap, metrics, ...); the table gives each bucket's share of
the server's CPU samples. The raw stacks are written beside the JSON for a
flame graph (``flamegraph.pl`` or speedscope read them).
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import threading
from collections import Counter
from pathlib import Path

from bench.common import (
    OUT_HELP,
    RESULTS,
    add_server_settings,
    print_table,
    server_settings,
    write_json,
)
from bench.http_load import drive, sample_image, serving

# (bucket, substrings of a frame "function (file:line)"), matched innermost first.
BUCKETS: list[tuple[str, tuple[str, ...]]] = [
    ("onnxruntime inference", ("onnxruntime", "session.py")),
    ("image decode", ("imdecode", "def decode", "decode (service/preprocessing")),
    ("resize and normalise", ("resize (service", "to_rgb01", "normalise (service")),
    ("image header checks", ("preprocessing.py",)),
    ("heatmap", ("heatmap.py",)),
    ("verdict and response model", ("decision.py", "schemas.py", "pydantic")),
    ("JSON encoding", ("json", "encoders.py", "jsonable_encoder")),
    ("metrics", ("prometheus_client", "metrics.py")),
    ("logging", ("logging", "logs.py")),
    ("HTTP (uvicorn, starlette, fastapi)", ("uvicorn", "h11", "httptools", "starlette", "fastapi")),
    ("batcher", ("batcher.py",)),
    ("asyncio event loop", ("asyncio", "uvloop")),
    ("threads waiting for work", ("thread.py", "threading.py")),
]


def bucket(stack: str) -> str:
    frames = stack.split(";")
    for frame in reversed(frames):
        for name, needles in BUCKETS:
            if any(n in frame for n in needles):
                return name
    return "other"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--rate", type=int, default=200, help="py-spy samples per second")
    ap.add_argument("--out", default="profile_server", help=OUT_HELP)
    add_server_settings(ap)
    args = ap.parse_args(argv)
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        raise SystemExit("py-spy is not installed: pip install py-spy")
    data, source = sample_image()
    RESULTS.mkdir(parents=True, exist_ok=True)
    stacks_path = RESULTS / f"{args.out}.stacks.txt"
    settings = server_settings(args)
    with serving(args.model_dir, **settings) as server:
        drive(server, data, args.clients, 2.0, 10_000)  # warm-up
        spy = subprocess.Popen(
            [py_spy, "record", "--pid", str(server.proc.pid), "--duration",
             str(int(args.seconds)), "--rate", str(args.rate), "--format", "raw",
             "--nonblocking", "--output", str(stacks_path)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        result: dict[str, object] = {}
        load = threading.Thread(
            target=lambda: result.update(drive(server, data, args.clients, args.seconds, 1_000_000))
        )
        load.start()
        _, err = spy.communicate(timeout=args.seconds + 60)
        load.join()
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed: {err.strip()}")
    counts: Counter[str] = Counter()
    for line in stacks_path.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack:
            counts[bucket(stack)] += int(n)
    total = sum(counts.values())
    rows = [[name, n, round(100 * n / total, 1)] for name, n in counts.most_common()]
    print(
        f"image: {source}; {args.clients} clients for {args.seconds:.0f} s: "
        f"{result.get('throughput_per_s')} images/s, p50 {result.get('p50_ms')} ms; "
        f"server CPU {result.get('server_cpu_ms_per_image')} ms per image, "
        f"client CPU {result.get('client_cpu_ms_per_image')} ms per image"
    )
    print_table(["where", "samples", "% of server CPU"], rows)
    payload = {
        "image": source,
        "clients": args.clients,
        "seconds": args.seconds,
        "server_settings": settings,
        "load": result,
        "buckets": {name: n for name, n, _ in rows},
        "samples": total,
        "stacks": stacks_path.name,
    }
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
