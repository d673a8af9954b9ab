"""Cost as the posted image grows: decode + resize + inference per frame size.

    python -m bench.image_growth models/bottle-pwae

Frames are a synthetic part (tests/helpers/synthetic.py) scaled up to common
camera resolutions with sensor-like noise, encoded as PNG and as JPEG (q 95),
then run through the server's own preprocessing and the model.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import cv2
import numpy as np

from bench.common import OUT_HELP, print_table, repeat, write_json
from service.artifact import DEFAULT_PROVIDERS, load_artifact
from service.contract import INPUT_NAME
from service.preprocessing import prepare
from tests.helpers.synthetic import good_image

SIZES = ((300, 300), (1024, 1024), (2448, 2048), (4096, 3000))


def frame(width: int, height: int, ext: str) -> bytes:
    rng = np.random.default_rng(0)
    img = cv2.resize(good_image(rng), (width, height), interpolation=cv2.INTER_LINEAR)
    noisy = np.clip(img.astype(np.int16) + rng.integers(-4, 5, img.shape), 0, 255).astype(np.uint8)
    params = [cv2.IMWRITE_JPEG_QUALITY, 95] if ext == ".jpg" else []
    ok, buf = cv2.imencode(ext, cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR), params)
    assert ok
    return buf.tobytes()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir", type=Path)
    ap.add_argument("--budget-s", type=float, default=2.0)
    ap.add_argument("--out", default="image_growth", help=OUT_HELP)
    args = ap.parse_args(argv)
    art = load_artifact(args.model_dir, DEFAULT_PROVIDERS)
    meta = art.metadata
    x = prepare(frame(300, 300, ".png"), meta.input, meta.grid).tensor[None]
    infer = repeat(lambda: art.session.run(None, {INPUT_NAME: x}), budget_s=args.budget_s)
    rows = []
    for w, h in SIZES:
        for ext in (".png", ".jpg"):
            data = frame(w, h, ext)
            pre = repeat(lambda d=data: prepare(d, meta.input, meta.grid), budget_s=args.budget_s)
            rows.append(
                {
                    "width": w,
                    "height": h,
                    "format": ext[1:],
                    "bytes": len(data),
                    "preprocess_p50_ms": round(pre.p50, 2),
                    "inference_p50_ms": round(infer.p50, 2),
                    "total_p50_ms": round(pre.p50 + infer.p50, 2),
                }
            )
    print_table(
        ["frame", "format", "MB", "decode+resize ms", "inference ms", "total ms"],
        [
            [
                f"{r['width']}x{r['height']}",
                r["format"],
                round(r["bytes"] / 2**20, 2),
                r["preprocess_p50_ms"],
                r["inference_p50_ms"],
                r["total_p50_ms"],
            ]
            for r in rows
        ],
    )
    payload = {"model": f"{meta.name}/{meta.version}", "provider": art.provider, "rows": rows}
    print("wrote", write_json(args.out, payload))


if __name__ == "__main__":
    main()
