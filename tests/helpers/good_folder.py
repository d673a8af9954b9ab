"""A new user's images: a plain folder of good parts, not MVTec AD's layout.

Nested folders, PNG, JPEG, BMP and TIFF, sizes other than the model's; and a
test folder with good/ and a folder per defect kind, masks for some images
only (in a ground_truth folder beside it, as MVTec AD keeps them).
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

from tests.helpers.synthetic import good_image, inject_defect

FORMATS = (".png", ".jpg", ".bmp", ".tif")
SIZES = ((300, 300), (420, 315), (640, 640), (360, 270))  # (width, height)


def _write(path: Path, rgb: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)), path


def write_good_folder(root: Path, n: int = 12, seed: int = 0) -> Path:
    """``root``/good with ``n`` good parts in two subfolders, every format and
    several sizes; returns the folder."""
    rng = np.random.default_rng(seed)
    good = root / "good"
    for i in range(n):
        w, h = SIZES[i % len(SIZES)]
        img = cv2.resize(good_image(rng), (w, h), interpolation=cv2.INTER_AREA)
        sub = "camera-a" if i % 2 else "camera-b"
        _write(good / sub / f"part{i:02d}{FORMATS[i % len(FORMATS)]}", img)
    return good


def write_test_folder(
    root: Path, n_good: int = 2, kinds: tuple[str, ...] = ("scratch", "blob"), seed: int = 1
) -> Path:
    """``root``/test: good/ and one folder per defect kind (two images each);
    a mask in ``root``/ground_truth for the first image of each kind only."""
    rng = np.random.default_rng(seed)
    test = root / "test"
    for i in range(n_good):
        _write(test / "good" / f"{i}.png", good_image(rng))
    for kind in kinds:
        for i in range(2):
            img, mask = inject_defect(good_image(rng), rng, kind)
            _write(test / kind / f"{i}.png", img)
            if i == 0:
                path = root / "ground_truth" / kind / f"{i}_mask.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                assert cv2.imwrite(str(path), mask)
    return test
