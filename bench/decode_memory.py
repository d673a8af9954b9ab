"""Peak memory of decoding hostile and large images, alone and on the server.

    python -m bench.decode_memory models/bottle-pwae

Two measurements, each file crafted by tests/helpers/hostile_images.py:

* decode: each file through ``service.preprocessing.prepare`` in a fresh
  Python process; the figure is the process's peak resident memory
  (``VmHWM``) during the call, less the peak before it.
* server: ``python -m service`` on 127.0.0.1 on the given model, a fresh
  server for each scenario; N copies of a file posted at once (one thread
  each); the figure is the server's peak resident memory (``VmHWM`` in
  /proc/<pid>/status) after the answers, less its peak after a warm-up
  request, with the HTTP statuses and reasons of the answers.

Prints both tables and writes bench/results/decode_memory.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import httpx
import numpy as np

from bench.common import (
    OUT_HELP,
    add_server_settings,
    print_table,
    server_settings,
    write_json,
)
from service.image_header import sniff
from tests.helpers import hostile_images as hostile
from tests.helpers import memory
from tests.helpers.server import run_server
from tests.helpers.synthetic import encode_png, good_image

MB = 2**20


def _camera_frame(ext: str, width: int = 4096, height: int = 3000, depth: int = 8) -> bytes:
    """A 12.3 MP frame of a synthetic part with sensor-like noise."""
    rng = np.random.default_rng(0)
    img = cv2.resize(good_image(rng), (width, height), interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(img.astype(np.int16) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    bgr = cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR)
    if depth == 16:
        bgr = bgr.astype(np.uint16) * 257
    ok, buf = cv2.imencode(ext, bgr)
    assert ok
    return buf.tobytes()


# name -> (what it is, how to make it)
CASES: dict[str, tuple[str, Callable[[], bytes]]] = {
    "tiff_duplicate_size": (
        "TIFF, IFD names 20000x20000 then 300x300",
        hostile.tiff_duplicate_size,
    ),
    "png_rgba16_6300": ("16-bit RGBA PNG 6300x6300, 39.7 MP", hostile.png_rgba16),
    "png_two_ihdr": ("PNG, IHDR 300x300 then IHDR 20000x20000", hostile.png_two_ihdr),
    "apng_300": ("animated PNG 300x300, 2 frames", hostile.apng),
    "jpeg_two_sof": ("JPEG, SOF 300x300 then SOF 20000x20000", hostile.jpeg_two_sof),
    "jpeg_sof_after_scan": (
        "progressive JPEG, SOF 20000x20000 after scan 1",
        hostile.jpeg_sof_after_scan,
    ),
    "tiff_tile_16000": (
        "TIFF 300x300 in one 16000x16000 tile",
        lambda: hostile.tiff(300, 300, tile=(16000, 16000), pixels=(16000, 16000)),
    ),
    "tiff_strip_800000": (
        "TIFF 300x300, 800000 rows per strip",
        lambda: hostile.tiff(300, 300, rows_per_strip=800_000),
    ),
    "tiff_rgb16_6300": (
        "16-bit RGB TIFF 6300x6300 in one strip",
        lambda: hostile.tiff(6300, 6300, bps=16, rows_per_strip=6300),
    ),
    "bmp_rle8_6000": (
        "8-bit RLE BMP 6000x6000, 1 kB",
        lambda: hostile.bmp(6000, 6000, 8, rle8_end=True),
    ),
    "jpeg_progressive_6300": (
        "progressive JPEG 6300x6300",
        lambda: hostile.jpeg(6300, 6300, progressive=True),
    ),
    "jpeg_camera_12mp": ("JPEG 4096x3000 camera frame", lambda: _camera_frame(".jpg")),
    "png_camera_12mp": ("PNG 4096x3000 camera frame", lambda: _camera_frame(".png")),
}

# name -> (case, copies posted at once)
SCENARIOS: dict[str, tuple[str, int]] = {
    "tiff_duplicate_size x1": ("tiff_duplicate_size", 1),
    "tiff_duplicate_size x2": ("tiff_duplicate_size", 2),
    "png_rgba16_6300 x1": ("png_rgba16_6300", 1),
    "png_rgba16_6300 x8": ("png_rgba16_6300", 8),
    "tiff_tile_16000 x4": ("tiff_tile_16000", 4),
    "png_camera_12mp x8": ("png_camera_12mp", 8),
}


def decode_peak(data: bytes) -> dict[str, Any]:
    """prepare(data) in a fresh process: outcome, peak bytes over the process's
    peak before the call, seconds, and the plan's reservation."""
    peak = memory.decode_peak(data)
    return {
        "outcome": peak.outcome,
        "peak_bytes": peak.peak_bytes,
        "base_bytes": peak.base_bytes,
        "seconds": peak.seconds,
        # what the server reserves for it (0: refused from the header)
        "planned_bytes": peak.planned_bytes,
    }


def media_type(data: bytes) -> str:
    fmt = sniff(data) or "png"
    return f"image/{fmt}"


def server_peak(
    model_dir: Path, data: bytes, copies: int, settings: dict[str, str]
) -> dict[str, Any]:
    """``copies`` posts of ``data`` at once to a fresh server."""
    good = encode_png(good_image(np.random.default_rng(0)))
    with tempfile.TemporaryDirectory() as logs, run_server(model_dir, Path(logs), **settings) as s:
        url = f"{s.base}/v1/inspect"
        png = {"content-type": "image/png"}
        assert httpx.post(url, content=good, headers=png, timeout=60).status_code == 200
        base = memory.vm_hwm(s.proc.pid)
        headers = {"content-type": media_type(data)}

        def post(_: int) -> tuple[int, str]:
            r = httpx.post(url, content=data, headers=headers, timeout=300)
            reason = r.json().get("error", {}).get("reason", "") if r.status_code != 200 else ""
            return r.status_code, reason

        t0 = time.perf_counter()
        with ThreadPoolExecutor(copies) as pool:
            answers = list(pool.map(post, range(copies)))
        seconds = time.perf_counter() - t0
        alive = s.proc.poll() is None
        peak = memory.vm_hwm(s.proc.pid) if alive else None
        still = alive and httpx.post(url, content=good, headers=png, timeout=60).status_code
    return {
        "answers": dict(Counter(f"{code} {reason}".strip() for code, reason in answers)),
        "base_bytes": base,
        "peak_over_base_bytes": None if peak is None else peak - base,
        "seconds": round(seconds, 2),
        "server_up_after": still == 200,
    }


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / MB:.0f}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--only", choices=("decode", "server"), help="one of the two measurements")
    ap.add_argument("--cases", help="comma-separated case names (default: all)")
    ap.add_argument("--scenarios", help="comma-separated scenario names (default: all)")
    add_server_settings(ap)
    ap.add_argument("--out", default="decode_memory", help=OUT_HELP)
    args = ap.parse_args(argv)
    files = {name: make() for name, (_, make) in CASES.items()}
    payload: dict[str, Any] = {"cases": {k: v[0] for k, v in CASES.items()}}
    if args.only != "server":
        names = args.cases.split(",") if args.cases else list(CASES)
        rows = {}
        for name in names:
            rows[name] = {"file_bytes": len(files[name]), **decode_peak(files[name])}
            print(name, rows[name], flush=True)
        payload["decode"] = rows
        print_table(
            ["file", "kB", "outcome", "peak MB", "planned MB", "s"],
            [
                [
                    n,
                    len(files[n]) // 1024,
                    r["outcome"],
                    _mb(r["peak_bytes"]),
                    _mb(r.get("planned_bytes")),
                    r["seconds"],
                ]
                for n, r in rows.items()
            ],
        )
    if args.only != "decode":
        settings = server_settings(args)
        names = args.scenarios.split(",") if args.scenarios else list(SCENARIOS)
        served = {}
        for name in names:
            case, copies = SCENARIOS[name]
            served[name] = server_peak(args.model_dir, files[case], copies, settings)
            print(name, served[name], flush=True)
        payload["server"] = served
        payload["server_settings"] = settings
        print_table(
            ["scenario", "answers", "peak over warm MB", "s", "up after"],
            [
                [
                    n,
                    ", ".join(f"{k} x{v}" for k, v in r["answers"].items()),
                    _mb(r["peak_over_base_bytes"]),
                    r["seconds"],
                    r["server_up_after"],
                ]
                for n, r in served.items()
            ],
        )
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
