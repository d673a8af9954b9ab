"""Reading a category in MVTec AD layout for training and evaluation.

Images go through service.preprocessing, the server's own code, so what a
model is fitted on is exactly what it will be served. The held-out split for
calibration is drawn from train/good only; test/ is read by evaluation alone.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from service.codec import apply_codec
from service.contract import Codec, InputSpec
from service.preprocessing import is_greyscale, prepare

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


def category_colour(category: Path) -> Literal["RGB", "grey"]:
    """``grey`` if every train/good image file is single-channel (grey, or
    grey with alpha), else ``RGB``. A grey model takes the luma of colour images; an
    RGB model refuses grey ones, here as on the server (service.preprocessing),
    so an RGB category's stray grey image stops training rather than being
    fitted as colour."""
    paths = _images(category / "train" / "good")
    if not paths:
        raise ValueError(f"{category}/train/good has no images")
    return "grey" if all(is_greyscale(p.read_bytes()) for p in paths) else "RGB"


def category_spec(category: Path, base: InputSpec | None = None) -> InputSpec:
    """``base`` (the default InputSpec) with the category's colour."""
    fields = (base or InputSpec()).model_dump()
    return InputSpec.model_validate({**fields, "color": category_colour(category)})


def checkpoint_spec(ckpt: dict[str, Any]) -> InputSpec:
    """The InputSpec a training checkpoint was fitted with: the one it
    recorded, or, for checkpoints from before colour was recorded, the
    category's (a grey category's images gave the same tensors either way)."""
    if "input" in ckpt:
        return InputSpec.model_validate(ckpt["input"])
    return category_spec(Path(ckpt["data"]))


def load_tensor(
    path: Path, spec: InputSpec | None = None, codec: Codec | None = None
) -> torch.Tensor:
    """The model's input for the image at ``path``, first passed through the
    line camera's ``codec`` where one is given (calibration sees what the line sends)."""
    data = path.read_bytes()
    if codec is not None:
        data = apply_codec(data, codec)
    return torch.from_numpy(prepare(data, spec or InputSpec()).tensor)


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
