"""Sustained load: latency at 80% of the maximum throughput, and memory over time.

    python -m bench.soak models/bottle-pwae --seconds 300

First measures the maximum throughput with 16 closed-loop clients, then sends
requests open-loop at 80% of it (a fixed schedule, so a slow answer does not
slow the offered load) for ``--seconds``, sampling the server's RSS every
5 s. Reports p50/p99 under that load, the ratio p99/p50, and RSS at the
start (after warm-up) and end of the run.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import threading
import time
from pathlib import Path

import httpx

from bench.common import Timing, write_json
from bench.http_load import ServerProcess, drive, sample_image


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the maximum throughput")
    ap.add_argument("--out", default="soak")
    args = ap.parse_args(argv)
    data, source = sample_image()
    server = ServerProcess(args.model_dir, max_queue="256")
    try:
        drive(server.base, data, 16, 3.0, 10_000)  # warm-up
        peak = drive(server.base, data, 16, 10.0, 10_000)["throughput_per_s"]
        rate = args.load * peak
        rss = [(0.0, server.rss_mb())]
        latencies: list[float] = []
        codes: dict[int, int] = {}
        lock = threading.Lock()
        client = httpx.Client(base_url=server.base, timeout=60,
                              limits=httpx.Limits(max_connections=64))  # fmt: skip

        def one() -> None:
            t0 = time.perf_counter()
            r = client.post("/v1/inspect", content=data, headers={"content-type": "image/png"})
            with lock:
                codes[r.status_code] = codes.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append((time.perf_counter() - t0) * 1000)

        start = time.perf_counter()
        next_sample = 5.0
        sent = 0
        with concurrent.futures.ThreadPoolExecutor(64) as pool:
            while (now := time.perf_counter() - start) < args.seconds:
                due = int(now * rate) - sent
                for _ in range(due):
                    pool.submit(one)
                sent += due
                if now >= next_sample:
                    rss.append((round(now, 1), server.rss_mb()))
                    next_sample += 5.0
                time.sleep(0.002)
        rss.append((round(time.perf_counter() - start, 1), server.rss_mb()))
        client.close()
    finally:
        server.stop()
    t = Timing(latencies)
    first, last = rss[1][1] if len(rss) > 1 else rss[0][1], rss[-1][1]
    result = {
        "image": source, "peak_throughput_per_s": peak, "offered_per_s": round(rate, 2),
        "seconds": args.seconds, **t.summary(), "p99_over_p50": round(t.p99 / t.p50, 2),
        "status_codes": codes, "rss_mb": rss, "rss_growth": round(last / first - 1, 4),
    }  # fmt: skip
    print(
        f"peak {peak:.1f}/s, offered {rate:.1f}/s for {args.seconds:.0f} s: "
        f"p50 {t.p50:.1f} ms, p99 {t.p99:.1f} ms (p99/p50 {t.p99 / t.p50:.2f}); "
        f"codes {codes}; RSS {first:.0f} -> {last:.0f} MB ({100 * (last / first - 1):+.1f}%)"
    )
    print("wrote", write_json(args.out, result))


if __name__ == "__main__":
    main()
