"""Reading a category in MVTec AD layout for training and evaluation.

Images go through service.preprocessing, the server's own code, so what a
model is fitted on is exactly what it will be served. The held-out split for
calibration is drawn from train/good only; test/ is read by evaluation alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import cv2
import numpy as np
import torch

from service.codec import apply_codec
from service.contract import Codec, InputSpec
from service.preprocessing import is_greyscale, prepare
from service.rejection import InputRejected

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
MASKS_DIR = "ground_truth"


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS)


def list_images(folder: Path) -> list[Path]:
    """Every image file under ``folder``, in subfolders too, sorted by its path
    relative to ``folder``; hidden files and folders (".name") are skipped. For
    a flat folder (an MVTec train/good) the same images, in the same order, as
    the folder's own listing."""
    found = []
    for p in folder.rglob("*"):
        rel = p.relative_to(folder)
        if any(part.startswith(".") for part in rel.parts):
            continue
        if p.suffix.lower() in IMAGE_EXTS and p.is_file():
            found.append(p)
    return sorted(found, key=lambda p: p.relative_to(folder).parts)


def holdout_count(n: int, holdout_fraction: float) -> int:
    """How many of ``n`` good images the split holds out: at least one, and one
    at least is left to fit on."""
    return min(n - 1, max(1, round(holdout_fraction * n)))


AUTO_HOLDOUT = "auto"  # --holdout's default: the fraction auto_holdout gives
# At least this share is held out, as before ``auto``: the validation and
# P-WAE's settling work on the held-out images too ...
MIN_AUTO_HOLDOUT = 0.2
# ... and at most this share, so the model is still fitted on as many images
# as it is calibrated on.
MAX_AUTO_HOLDOUT = 0.5


def auto_holdout(n: int, need: int) -> float:
    """The fraction ``--holdout auto`` holds out of ``n`` good images: the
    smallest one at or above MIN_AUTO_HOLDOUT that holds out ``need`` images
    (what the calibration target needs to be promised), capped at
    MAX_AUTO_HOLDOUT. With 209 good bottles and a 1% target: 99 held out, not
    the 42 that 20% would give, whose promise is 2.3%."""
    if n < 2:
        raise ValueError(f"a hold-out split needs at least 2 images, got {n}")
    if holdout_count(n, MIN_AUTO_HOLDOUT) >= need:
        return MIN_AUTO_HOLDOUT
    if holdout_count(n, MAX_AUTO_HOLDOUT) <= need:
        return MAX_AUTO_HOLDOUT
    # need / n counts ``need`` images but for float error; step up until it does.
    fraction = need / n
    while holdout_count(n, fraction) < need:
        fraction = math.nextafter(fraction, 1.0)
    return fraction


def split_paths(
    paths: Sequence[Path], holdout_fraction: float, seed: int, where: str = "the folder"
) -> tuple[list[Path], list[Path]]:
    """(fit, holdout) of ``paths``, seeded."""
    if len(paths) < 2:
        raise ValueError(f"{where} needs at least 2 images, has {len(paths)}")
    perm = np.random.default_rng(seed).permutation(len(paths))
    n_hold = holdout_count(len(paths), holdout_fraction)
    hold = sorted(paths[i] for i in perm[:n_hold])
    fit_paths = sorted(paths[i] for i in perm[n_hold:])
    return fit_paths, hold


def split_train(
    category: Path, holdout_fraction: float, seed: int
) -> tuple[list[Path], list[Path]]:
    """(fit, holdout) from train/good, seeded; test/ is never touched here."""
    paths = _images(category / "train" / "good")
    return split_paths(paths, holdout_fraction, seed, f"{category}/train/good")


def checkpoint_good_root(ckpt: dict[str, Any]) -> Path:
    """The folder a checkpoint's fit and hold-out names are relative to: the
    good-image folder it recorded (``--good``, or a category's train/good), or,
    for checkpoints from before it was recorded, the category's train/good."""
    if ckpt.get("good"):
        return Path(ckpt["good"])
    return Path(ckpt["data"]) / "train" / "good"


def checkpoint_split(ckpt: dict[str, Any], part: str) -> list[Path]:
    """The good images a training checkpoint recorded as ``part`` ("fit" or
    "holdout"), under the folder it was trained on."""
    good = checkpoint_good_root(ckpt)
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
    try:
        if codec is not None:
            data = apply_codec(data, codec)
        return torch.from_numpy(prepare(data, spec or InputSpec()).tensor)
    except InputRejected as exc:  # the server's refusal, naming the file it was
        raise InputRejected(exc.reason, f"{path}: {exc.message}") from exc


def fingerprint(paths: Sequence[Path]) -> str:
    digest = hashlib.sha256()
    for p in sorted(paths, key=lambda q: q.name):
        digest.update(p.name.encode())
        digest.update(p.read_bytes())
    return digest.hexdigest()


def test_set(category: Path, size: int = 300) -> list[tuple[Path, int, np.ndarray]]:
    """(image, label 1=defective, mask bool (size, size)) for every test image."""
    return labelled_images(category / "test", category / "ground_truth", size)


def kind_folders(test: Path) -> list[Path]:
    """The folders of a test split: good/ and one per defect kind (a
    ``ground_truth`` folder inside it holds masks, not images)."""
    return sorted(p for p in test.iterdir() if p.is_dir() and p.name != MASKS_DIR)


def labelled_images(
    test: Path, masks: Path | None, size: int = 300
) -> list[tuple[Path, int, np.ndarray]]:
    """(image, label 1=defective, mask bool (size, size)) for every image of a
    test folder: ``good/`` is defect-free, every other folder a defect kind;
    the mask of ``<kind>/<name>.png``, where there is one, is
    ``masks/<kind>/<name>_mask.png`` (MVTec AD's layout); without one it is
    all False (no pixel figure counts that image: evaluation.evaluate_scores)."""
    out = []
    for d in kind_folders(test):
        for p in list_images(d):
            mask = np.zeros((size, size), bool)
            if d.name != "good" and masks is not None:
                rel = p.relative_to(d)
                mp = masks / d.name / rel.parent / f"{p.stem}_mask.png"
                if mp.is_file():
                    m = cv2.imread(str(mp), cv2.IMREAD_GRAYSCALE)
                    if m is None:
                        raise ValueError(f"cannot read mask {mp}")
                    m = cv2.resize(m, (size, size), interpolation=cv2.INTER_NEAREST)
                    mask = m > 127
            out.append((p, int(d.name != "good"), mask))
    return out
