"""Synthetic inspection data: a textured part, with and without defects.

Tests use these instead of real photographs wherever the real data does not
matter, so unit and integration tests run without ../shared. The part is a
bright disc on a darker, grainy background (like a bottle seen from above)
with a woven surface texture; defects are the three kinds a line sees most:
scratches (thin dark lines), blobs (stains or contamination) and missing
pieces (a bite out of the rim). Every defect comes with its pixel mask.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

SIZE = 300
DEFECT_KINDS = ("scratch", "blob", "missing")


def good_image(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A defect-free part: (size, size, 3) uint8 RGB. Each call varies a little."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    # Woven texture with a random phase: the kind of regular surface a
    # reconstruction model learns, varying so no two good images are equal.
    phase = rng.uniform(0, 2 * np.pi, 2)
    texture = 0.5 + 0.25 * np.sin(xx / 3.0 + phase[0]) * np.sin(yy / 3.0 + phase[1])
    img = np.empty((size, size, 3), np.float32)
    base = np.array([0.55, 0.45, 0.30], np.float32) * rng.uniform(0.95, 1.05)
    img[:] = base * (0.6 + 0.4 * texture[..., None])
    # The part: a disc, slightly off centre.
    c = size / 2 + rng.uniform(-3, 3, 2)
    disc = (xx - c[0]) ** 2 + (yy - c[1]) ** 2 <= (0.38 * size) ** 2
    img[disc] = np.array([0.75, 0.72, 0.65], np.float32) * (0.85 + 0.15 * texture[disc, None])
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def inject_defect(
    img: np.ndarray, rng: np.random.Generator, kind: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """A copy of ``img`` with one defect, and its mask ((H, W) uint8, 0 or 255)."""
    kind = kind or DEFECT_KINDS[int(rng.integers(len(DEFECT_KINDS)))]
    h, w = img.shape[:2]
    out = img.copy()
    mask = np.zeros((h, w), np.uint8)
    cx, cy = (int(v) for v in rng.integers(int(0.3 * w), int(0.7 * w), 2))
    if kind == "scratch":
        angle = rng.uniform(0, np.pi)
        length = rng.uniform(0.15, 0.3) * w
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        p0 = (int(cx - dx), int(cy - dy))
        p1 = (int(cx + dx), int(cy + dy))
        cv2.line(mask, p0, p1, 255, thickness=3)
        out[mask > 0] = (out[mask > 0] * 0.25).astype(np.uint8)
    elif kind == "blob":
        axes = tuple(int(v) for v in rng.integers(8, 18, 2))
        cv2.ellipse(mask, (cx, cy), axes, rng.uniform(0, 180), 0, 360, 255, -1)
        out[mask > 0] = np.array([40, 90, 30], np.uint8)
    elif kind == "missing":
        # A bite out of the rim: background shows where the part should be.
        r = int(0.38 * w)
        angle = rng.uniform(0, 2 * np.pi)
        bx, by = int(w / 2 + r * np.cos(angle)), int(h / 2 + r * np.sin(angle))
        cv2.circle(mask, (bx, by), int(rng.integers(14, 22)), 255, -1)
        out[mask > 0] = np.array([20, 20, 20], np.uint8)
    else:
        raise ValueError(f"unknown defect kind {kind!r}; choose from {DEFECT_KINDS}")
    return out, mask


def encode(ext: str, img: np.ndarray) -> bytes:
    """``img`` as OpenCV writes it to a file of type ``ext`` (".png", ".jpg", ...)."""
    ok, buf = cv2.imencode(ext, img)
    assert ok, ext
    return buf.tobytes()


def encode_png(rgb: np.ndarray) -> bytes:
    return encode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))


def part_png(seed: int = 0, defect: str | None = None) -> bytes:
    """A PNG of a synthetic part, with one defect of the given kind if asked."""
    rng = np.random.default_rng(seed)
    img = good_image(rng)
    if defect:
        img, _ = inject_defect(img, rng, defect)
    return encode_png(img)


def write_category(
    root: Path,
    n_train: int = 24,
    n_test_good: int = 6,
    n_test_defective: int = 6,
    seed: int = 0,
    size: int = SIZE,
) -> Path:
    """A category in MVTec AD layout under ``root``; returns the category dir."""
    rng = np.random.default_rng(seed)
    cat = root / "synthetic"

    def save(path: Path, rgb: np.ndarray) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(encode_png(rgb))

    for i in range(n_train):
        save(cat / "train" / "good" / f"{i:03d}.png", good_image(rng, size))
    for i in range(n_test_good):
        save(cat / "test" / "good" / f"{i:03d}.png", good_image(rng, size))
    for i in range(n_test_defective):
        kind = DEFECT_KINDS[i % len(DEFECT_KINDS)]
        img, mask = inject_defect(good_image(rng, size), rng, kind)
        save(cat / "test" / kind / f"{i:03d}.png", img)
        mask_path = cat / "ground_truth" / kind / f"{i:03d}_mask.png"
        mask_path.parent.mkdir(parents=True, exist_ok=True)
        ok, buf = cv2.imencode(".png", mask)
        assert ok
        mask_path.write_bytes(buf.tobytes())
    (cat / "manifest.json").write_text(
        json.dumps({"dataset": "synthetic", "category": "synthetic", "layout": "mvtec"})
    )
    return cat
