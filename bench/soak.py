"""Sustained load: latency at 80% of the maximum throughput, and memory over time.

    python -m bench.soak models/bottle-pwae --seconds 300

First measures the maximum throughput with 16 closed-loop clients, then
offers requests open-loop at 80% of it, or at ``--rate`` per second
(bench.loadgen: a fixed schedule, so a slow answer does not slow the offered
load, and latency counts from the time each request was due) for
``--seconds``, sampling the server's RSS every 5 s. Reports p50/p99 under
that load, the ratio p99/p50, and RSS after warm-up and at the end of the
run, with the RSS of the run's second half (where a leak shows as a slope
and allocator warm-up does not).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import httpx

from bench import loadgen
from bench.common import OUT_HELP, Timing, add_server_settings, server_settings, write_json
from bench.http_load import CORES, drive, rss_mb, sample_image, serving
from tests.helpers.server import Server


def _server_seconds(server: Server) -> dict[str, float]:
    """Sums and counts of the server's inference and decode histograms."""
    text = httpx.get(f"{server.base}/metrics", timeout=10).text
    out: dict[str, float] = {}
    for stage in ("inference", "decode"):
        for part in ("sum", "count"):
            name = f"inspection_{stage}_duration_seconds_{part}"
            out[f"{stage}_{part}"] = sum(
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith(name + "{") or line.startswith(name + " ")
            )
    return out


def _per_image(counters: list[tuple[float, dict[str, float]]], from_s: float) -> dict[str, float]:
    """Mean server inference and decode ms per image between the samples around a window."""
    before = max((c for c in counters if c[0] <= from_s + 1), key=lambda c: c[0])[1]
    after = min((c for c in counters if c[0] >= from_s + 9), key=lambda c: c[0], default=None)
    if after is None:
        return {}
    out = {}
    for stage in ("inference", "decode"):
        n = after[1][f"{stage}_count"] - before[f"{stage}_count"]
        if n > 0:
            out[f"{stage}_ms"] = round(
                1000 * (after[1][f"{stage}_sum"] - before[f"{stage}_sum"]) / n, 1
            )
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--seconds", type=float, default=300.0)
    ap.add_argument("--load", type=float, default=0.8, help="fraction of the maximum throughput")
    ap.add_argument("--rate", type=float, help="offer this many requests/s instead of --load")
    ap.add_argument("--out", default="soak", help=OUT_HELP)
    add_server_settings(ap)
    args = ap.parse_args(argv)
    data, source = sample_image()
    settings = {"max_queue": "256", **server_settings(args)}
    with serving(args.model_dir, **settings) as server:
        drive(server, data, 16, 3.0, 10_000)  # warm-up
        peak = drive(server, data, 16, 10.0, 10_000)["throughput_per_s"]
        rate = args.rate or args.load * peak
        rss = [(0.0, rss_mb(server))]
        # The server's own inference and decode time, read from /metrics
        # every 10 s: when the machine slows down (other tenants on the
        # host), inference per image grows and the fixed offered rate turns
        # into overload; a slow server with a steady machine shows a queue
        # with inference time flat.
        counters = [(0.0, _server_seconds(server))]

        def sample(elapsed: float) -> None:
            if elapsed >= rss[-1][0] + 5.0:
                rss.append((round(elapsed, 1), rss_mb(server)))
            if elapsed >= counters[-1][0] + 10.0:
                counters.append((elapsed, _server_seconds(server)))

        run = loadgen.open_loop(loadgen.Target(server.base, data), rate, args.seconds, sample)
        rss.append((round(run.wall_s, 1), rss_mb(server)))
    t = Timing(run.latencies_ms)
    # Latency per 10 s of the run: a queue that builds steadily and one
    # burst that drains look alike in the overall p99, not here.
    by_window: dict[int, list[float]] = {}
    for at, ms in zip(run.started_s, run.latencies_ms, strict=True):
        by_window.setdefault(int(at // 10), []).append(ms)
    windows = [
        {"from_s": 10 * w, "n": len(v), "p50_ms": round(Timing(v).p50, 1),
         "p99_ms": round(Timing(v).p99, 1), "max_ms": round(max(v), 1),
         **_per_image(counters, 10 * w)}
        for w, v in sorted(by_window.items())
    ]  # fmt: skip
    start, end = rss[0][1], rss[-1][1]
    half = [mb for s, mb in rss if s >= args.seconds / 2]
    codes = {str(k): v for k, v in sorted(run.codes.items())}
    result = {
        "image": source, "peak_throughput_per_s": peak, "offered_per_s": round(rate, 2),
        "fixed_rate": args.rate is not None, "seconds": args.seconds, **t.summary(),
        "p99_over_p50": round(t.p99 / t.p50, 2),
        "status_codes": codes, "client_errors": dict(run.errors), "rss_mb": rss,
        "rss_growth": round(end / start - 1, 4),
        "rss_growth_second_half": round(half[-1] / half[0] - 1, 4), "cores": CORES,
        "server_settings": settings, "windows": windows,
    }  # fmt: skip
    second_half = 100 * result["rss_growth_second_half"]
    print(
        f"peak {peak:.1f}/s, offered {rate:.1f}/s for {args.seconds:.0f} s: "
        f"p50 {t.p50:.1f} ms, p99 {t.p99:.1f} ms (p99/p50 {t.p99 / t.p50:.2f}); "
        f"codes {codes}; client errors {dict(run.errors)}; RSS {start:.0f} -> {end:.0f} MB "
        f"({100 * (end / start - 1):+.1f}%; second half {second_half:+.1f}%)"
    )
    calm = sum(w["max_ms"] <= 3 * t.p50 for w in windows)
    worst = max(windows, key=lambda w: w["max_ms"])
    print(
        f"{calm} of {len(windows)} 10-s windows never exceed 3x p50; the worst, from "
        f"{worst['from_s']} s: p50 {worst['p50_ms']} ms, max {worst['max_ms']} ms"
    )
    print("wrote", write_json(args.out, result))


if __name__ == "__main__":
    main()
