"""Reading a category in MVTec AD layout for training and evaluation.

Images go through service.preprocessing, the server's own code, so what a
model is fitted on is exactly what it will be served. The held-out split for
calibration is drawn from train/good only; test/ is read by evaluation alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from service.contract import InputSpec
from service.preprocessing import prepare

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def split_train(
    category: Path, holdout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(fit, holdout) from train/good, seeded; test/ is never touched here."""
    paths = _images(category / "train" / "good")
    if len(paths) < 2:
        raise ValueError(f"{category}/train/good needs at least 2 images, has {len(paths)}")
    perm = np.random.default_rng(seed).permutation(len(paths))
    n_hold = min(len(paths) - 1, max(1, round(holdout_fraction * len(paths))))
    hold = sorted(paths[i] for i in perm[:n_hold])
    fit_paths = sorted(paths[i] for i in perm[n_hold:])
    return fit_paths, hold


def checkpoint_split(ckpt: dict[str, Any], part: str) -> list[Path]:
    """The train/good images a training checkpoint recorded as ``part``
    ("fit" or "holdout"), under the category it was trained on."""
    good = Path(ckpt["data"]) / "train" / "good"
    return [good / name for name in ckpt[part]]


def load_tensor(path: Path, spec: InputSpec | None = None) -> torch.Tensor:
    return torch.from_numpy(prepare(path.read_bytes(), spec or InputSpec()).tensor)


def fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


def test_set(category: Path, size: int = 300) -> list[tuple[Path, int, np.ndarray]]:
    """(image, label 1=defective, mask bool (size, size)) for every test image."""
    out = []
    for d in sorted(p for p in (category / "test").iterdir() if p.is_dir()):
        for p in _images(d):
            mask = np.zeros((size, size), bool)
            if d.name != "good":
                mp = category / "ground_truth" / d.name / f"{p.stem}_mask.png"
                if mp.is_file():
                    m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
                    if m is None:
                        raise ValueError(f"cannot read mask {mp}")
                    m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
                    mask = m > 127
            out.append((p, int(d.name != "good"), mask))
    return out
