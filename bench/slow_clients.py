"""Hostile clients and a SIGTERM under load: what the server holds, and what it answers.

    python -m bench.slow_clients models/bottle-pwae --clients 1000 --seconds 60

Two parts, each run on a fresh ``python -m service`` on 127.0.0.1:

* slow: ``--clients`` connections each send a request's headers one byte a
  second (never finishing within the run); a prompt probe request goes to the
  server every second meanwhile. Reported: how many slow connections the
  server still holds after 5, 15, 30 s and at the end, when it cut the last
  one off, what it answered them (408 header_timeout, 503 when the cap
  closed the longest-waiting, nothing), and whether the probes were served.
  Run once without these limits (header_timeout_s=0, max_connections=0:
  plain uvicorn) and once with the server's defaults (10 s, 1000 connections).
* drain: ``--drain-clients`` closed-loop clients post the real image; after
  3 s the server gets SIGTERM. Reported: requests in flight at SIGTERM and
  how many were answered 200, requests answered during the drain, when
  /readyz turned 503, when the listener closed, and the exit code and time.
  Run with drain_s=0 (before) and with the default drain_s=5.

All clients share one asyncio loop in this process; client and server share
the machine's cores.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import httpx

from bench.common import OUT_HELP, add_server_settings, print_table, server_settings, write_json
from bench.http_load import sample_image, serving
from tests.helpers.server import Server

HEADERS = (
    b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\nX-Slow: " + b"a" * 4096
)
BEFORE = {"header_timeout_s": "0", "max_connections": "0"}


# ------------------------------------------------------------------ slow headers


async def _slow_client(host: str, port: int, t0: float, out: list[dict[str, Any]]) -> None:
    """Send HEADERS a byte a second until the server closes, or the run ends (cancelled)."""
    rec: dict[str, Any] = {"opened_s": None, "closed_s": None, "answer": None}
    out.append(rec)
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        rec["answer"] = f"connect failed: {exc.__class__.__name__}"
        return
    rec["opened_s"] = time.monotonic() - t0
    reading = asyncio.ensure_future(reader.read(4096))
    write_failed = False
    try:
        for i in range(len(HEADERS)):
            if reading.done():
                break
            try:
                writer.write(HEADERS[i : i + 1])
                await writer.drain()
            except OSError:
                write_failed = True
                break
            await asyncio.wait({reading}, timeout=1.0)
    finally:
        if reading.done() or write_failed:
            rec["closed_s"] = time.monotonic() - t0
            if reading.done() and not reading.cancelled() and reading.exception() is None:
                rec["answer"] = reading.result().split(b"\r\n", 1)[0].decode() or "closed"
            else:
                rec["answer"] = "reset"
        reading.cancel()
        writer.close()


async def _probe(base: str, t0: float, seconds: float, out: list[dict[str, Any]]) -> None:
    """A prompt request every second, on a new connection each time."""
    while time.monotonic() - t0 < seconds:
        started = time.monotonic()
        try:
            async with httpx.AsyncClient(timeout=5) as c:
                status: Any = (await c.get(f"{base}/healthz")).status_code
        except httpx.HTTPError as exc:
            status = exc.__class__.__name__
        out.append(
            {"at_s": started - t0, "status": status, "ms": (time.monotonic() - started) * 1e3}
        )
        await asyncio.sleep(max(0.0, 1.0 - (time.monotonic() - started)))


async def _slow_run(server: Server, clients: int, seconds: float) -> dict[str, Any]:
    url = httpx.URL(server.base)
    host, port = url.host, url.port or 80
    t0 = time.monotonic()
    slow: list[dict[str, Any]] = []
    probes: list[dict[str, Any]] = []
    tasks = []
    for _ in range(clients):  # open them over the first second, as a burst
        tasks.append(asyncio.ensure_future(_slow_client(host, port, t0, slow)))
        await asyncio.sleep(1.0 / clients)
    probe = asyncio.ensure_future(_probe(server.base, t0, seconds, probes))
    await asyncio.sleep(max(0.0, seconds - (time.monotonic() - t0)))
    end = time.monotonic() - t0
    held_at_end = sum(1 for r in slow if r["opened_s"] is not None and r["closed_s"] is None)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, probe, return_exceptions=True)

    def held(at: float) -> int:
        return sum(
            1
            for r in slow
            if r["opened_s"] is not None
            and r["opened_s"] <= at
            and (r["closed_s"] is None or r["closed_s"] > at)
        )

    cut = [r["closed_s"] for r in slow if r["closed_s"] is not None and r["closed_s"] <= end]
    answers: dict[str, int] = {}
    for r in slow:
        key = r["answer"] if r["closed_s"] is not None and r["closed_s"] <= end else "still open"
        answers[str(key)] = answers.get(str(key), 0) + 1
    probe_ok = [p for p in probes if p["status"] == 200]
    return {
        "clients": clients,
        "seconds": round(end, 1),
        "opened": sum(1 for r in slow if r["opened_s"] is not None),
        "held": {f"{at}s": held(at) for at in (5, 15, 30) if at < end} | {"end": held_at_end},
        "last_cut_s": round(max(cut), 1) if cut else None,
        "answers": answers,
        "probes": len(probes),
        "probes_ok": len(probe_ok),
        "probe_max_ms": round(max(p["ms"] for p in probe_ok), 1) if probe_ok else None,
    }


# ------------------------------------------------------------------------ drain


async def _drain_run(server: Server, data: bytes, clients: int, drain_s: float) -> dict[str, Any]:
    t0 = time.monotonic()
    reqs: list[dict[str, Any]] = []
    ready: list[tuple[float, int | str]] = []
    stop = asyncio.Event()

    async def client() -> None:
        async with httpx.AsyncClient(base_url=server.base, timeout=30) as c:
            while not stop.is_set():
                rec: dict[str, Any] = {"start": time.monotonic() - t0, "end": None, "status": None}
                reqs.append(rec)
                try:
                    r = await c.post(
                        "/v1/inspect", content=data, headers={"content-type": "image/png"}
                    )
                    rec["status"] = r.status_code
                except httpx.HTTPError as exc:
                    rec["status"] = exc.__class__.__name__
                rec["end"] = time.monotonic() - t0
                if rec["status"] != 200:
                    await asyncio.sleep(0.05)

    async def readiness() -> None:
        while not stop.is_set():
            try:
                async with httpx.AsyncClient(timeout=2) as c:
                    status: int | str = (await c.get(f"{server.base}/readyz")).status_code
            except httpx.HTTPError as exc:
                status = exc.__class__.__name__
            ready.append((time.monotonic() - t0, status))
            await asyncio.sleep(0.1)

    tasks = [asyncio.ensure_future(client()) for _ in range(clients)]
    tasks.append(asyncio.ensure_future(readiness()))
    await asyncio.sleep(3.0)
    server.proc.send_signal(signal.SIGTERM)
    sig = time.monotonic() - t0
    while server.proc.poll() is None and time.monotonic() - t0 < sig + drain_s + 60:
        await asyncio.sleep(0.05)
    exited = time.monotonic() - t0
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)

    in_flight = [r for r in reqs if r["start"] < sig and (r["end"] is None or r["end"] > sig)]
    after = [r for r in reqs if r["start"] >= sig]
    not_ready = [at for at, st in ready if at > sig and st == 503]
    refused = [r["start"] for r in after if r["status"] == "ConnectError"]
    return {
        "clients": clients,
        "drain_s": drain_s,
        "in_flight_at_sigterm": len(in_flight),
        "in_flight_answered_200": sum(1 for r in in_flight if r["status"] == 200),
        "answered_after_sigterm": sum(1 for r in after if r["status"] == 200),
        "readyz_503_after_s": round(min(not_ready) - sig, 2) if not_ready else None,
        "listener_closed_after_s": round(min(refused) - sig, 2) if refused else None,
        # Neither answered nor refused: what each was and when it started
        # relative to SIGTERM, so a lost request can be told from a race on
        # a keep-alive connection the drain closed as the request went out.
        "other_failures": [
            {"status": str(r["status"]), "started_after_sigterm_s": round(r["start"] - sig, 2)}
            for r in reqs
            if r["status"] not in (200, "ConnectError")
        ],
        "exit_code": server.proc.returncode,
        "exit_after_s": round(exited - sig, 2),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path, nargs="?", help="default: the server's default model")
    ap.add_argument("--clients", type=int, default=1000, help="slow-header connections")
    ap.add_argument("--seconds", type=float, default=60.0, help="how long the slow part runs")
    ap.add_argument("--drain-clients", type=int, default=16)
    ap.add_argument("--part", choices=["slow", "drain", "all"], default="all")
    ap.add_argument("--out", default="slow_clients", help=OUT_HELP)
    add_server_settings(ap)
    args = ap.parse_args(argv)
    extra = server_settings(args)
    result: dict[str, Any] = {}
    if args.part in ("slow", "all"):
        result["slow"] = {}
        for name, settings in (("before", BEFORE), ("after", {})):
            with serving(args.model_dir, **{**settings, **extra}) as server:
                run = asyncio.run(_slow_run(server, args.clients, args.seconds))
            result["slow"][name] = {"settings": settings, **run}
        print_table(
            ["slow headers", "clients", "held 5s", "held 15s", "held end", "last cut s",
             "answers", "probes ok"],
            [[name, r["clients"], r["held"].get("5s"), r["held"].get("15s"), r["held"]["end"],
              r["last_cut_s"], r["answers"], f"{r['probes_ok']}/{r['probes']}"]
             for name, r in result["slow"].items()],
        )  # fmt: skip
    if args.part in ("drain", "all"):
        data, source = sample_image()
        result["drain"] = {"image": source}
        for name, drain_s in (("before", 0.0), ("after", 5.0)):
            settings = {"drain_s": str(drain_s), **extra}
            with serving(args.model_dir, **settings) as server:
                run = asyncio.run(_drain_run(server, data, args.drain_clients, drain_s))
            result["drain"][name] = run
        print_table(
            ["drain", "in flight", "answered", "after SIGTERM", "readyz 503 s", "closed s",
             "other failures", "exit", "exit s"],
            [[name, r["in_flight_at_sigterm"], r["in_flight_answered_200"],
              r["answered_after_sigterm"], r["readyz_503_after_s"], r["listener_closed_after_s"],
              len(r["other_failures"]), r["exit_code"], r["exit_after_s"]]
             for name, r in result["drain"].items() if name != "image"],
        )  # fmt: skip
    print(f"wrote {write_json(args.out, result)}")


if __name__ == "__main__":
    main()
