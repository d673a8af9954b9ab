"""Where the trainer's images come from, checked before any work is done.

Two layouts:

* ``--good DIR``: a plain folder of defect-free images, subfolders too, of
  any size and format the server reads (PNG, JPEG, BMP, TIFF); optionally
  ``--test DIR``, a folder with ``good/`` and one subfolder per defect kind,
  and masks, where there are any, as ``<kind>/<name>_mask.png`` under a
  ``ground_truth`` folder inside it or beside it (MVTec AD's layout).
* ``--data CATEGORY``: a category in MVTec AD layout (``train/good``,
  ``test/``, ``ground_truth/``).

Either way the images are read by the server's own code
(service.preprocessing), so an image the server would refuse is refused
here, before training, with its name and the reason, instead of a
traceback minutes in.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal

from model_export.data import IMAGE_EXTS, MASKS_DIR, kind_folders, labelled_images, list_images
from service.contract import InputSpec
from service.preprocessing import plan_prepare
from service.rejection import InputRejected, Reject

Layout = Literal["mvtec", "folder"]
# How many unreadable files an error lists before it says "and N more".
SHOWN = 10


class DataError(ValueError):
    """The images cannot be trained on; the message says which and why, in sentences."""


@dataclass(frozen=True)
class Source:
    layout: Layout
    data: Path  # what a checkpoint records as "data": the category, or the good folder
    good: Path  # the defect-free images (every image under it)
    test: Path | None  # good/ and a folder per defect kind, where there is a test split
    masks: Path | None  # ground_truth/<kind>/<name>_mask.png, where there are masks
    dataset: str
    category: str


def _exts() -> str:
    return ", ".join(IMAGE_EXTS)


def mvtec_source(category: Path) -> Source:
    """A category in MVTec AD layout; DataError where it is not one."""
    good = category / "train" / "good"
    if not category.is_dir():
        raise DataError(f"--data {category}: no such folder")
    if not good.is_dir():
        raise DataError(
            f"--data {category}: not a category in MVTec AD layout (no train/good folder in "
            f"it); for a plain folder of good images use --good {category}"
        )
    manifest: dict[str, Any] = {}
    if (category / "manifest.json").is_file():
        manifest = json.loads((category / "manifest.json").read_text())
    test = category / "test"
    return Source(
        layout="mvtec",
        data=category,
        good=good,
        test=test if test.is_dir() else None,
        masks=category / MASKS_DIR,
        dataset=str(manifest.get("dataset", category.resolve().parent.name)),
        category=str(manifest.get("category", category.resolve().name)),
    )


def masks_of(test: Path | None) -> Path | None:
    """The masks folder of a ``--test`` folder: ``ground_truth`` inside it or
    beside it (MVTec AD's layout), where there is one; DataError where the
    test folder is missing."""
    if test is None:
        return None
    if not test.is_dir():
        raise DataError(f"--test {test}: no such folder")
    for where in (test / MASKS_DIR, test.parent / MASKS_DIR):
        if where.is_dir():
            return where
    return None


def folder_source(good: Path, test: Path | None = None) -> Source:
    """A plain folder of good images, and optionally a test folder; DataError
    where a folder is missing."""
    if not good.is_dir():
        raise DataError(f"--good {good}: no such folder")
    return Source(
        layout="folder",
        data=good,
        good=good,
        test=test,
        masks=masks_of(test),
        dataset="own images",
        category=default_name(good),
    )


def source_of(ckpt: dict[str, Any], test: Path | None = None) -> Source:
    """The source a training checkpoint recorded, ``test`` (a folder as
    ``--test`` takes) replacing its test split where given."""
    if ckpt.get("layout") == "folder":
        recorded = ckpt.get("test")
        source = Source(
            layout="folder",
            data=Path(ckpt["data"]),
            good=Path(ckpt["good"]),
            test=Path(recorded) if recorded else None,
            masks=Path(ckpt["masks"]) if ckpt.get("masks") else None,
            dataset=str(ckpt.get("dataset", "own images")),
            category=str(ckpt.get("category", default_name(Path(ckpt["good"])))),
        )
    else:
        source = mvtec_source(Path(ckpt["data"]))
    if test is None:
        return source
    return replace(source, test=test, masks=masks_of(test))


def default_name(good: Path) -> str:
    """A model name from the good folder: its name, or its parent's where it is
    called good or train (``bottle/train/good`` -> ``bottle``), made fit for a
    model directory name (letters, digits, ``_ . -``)."""
    path = good.resolve()
    while path.name.lower() in ("good", "train", "ok") and path.parent != path:
        path = path.parent
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", path.name).strip("-.")
    return name or "model"


def good_images(source: Source) -> list[Path]:
    """Every good image of ``source``; DataError where there is none."""
    paths = list_images(source.good)
    if not paths:
        where = "in it or its subfolders" if source.layout == "folder" else "in it"
        raise DataError(f"{source.good} holds no images {where} (looked for {_exts()})")
    return paths


def refusal(exc: Exception) -> str:
    """Why a file cannot be read as an image, in words (the server's reason first)."""
    if isinstance(exc, InputRejected):
        if exc.reason == Reject.EMPTY:
            return "empty: the file has 0 bytes"
        return f"{exc.reason.value}: {exc.message}"
    if isinstance(exc, OSError):
        return f"unreadable: {exc.strerror or exc}"
    return str(exc)


def _problem(path: Path, exc: Exception) -> str:
    return f"{path}: {refusal(exc)}"


def _raise_problems(what: str, problems: Sequence[str], total: int) -> None:
    if not problems:
        return
    shown = "\n  ".join(problems[:SHOWN])
    more = f"\n  and {len(problems) - SHOWN} more" if len(problems) > SHOWN else ""
    raise DataError(
        f"{len(problems)} of {total} {what} cannot be read as the server reads images "
        f"(remove or replace them):\n  {shown}{more}"
    )


def check_images(paths: Sequence[Path], what: str = "good images") -> Literal["RGB", "grey"]:
    """The colour the model gets (``grey`` where every image is single-channel,
    else ``RGB``, as data.category_colour judges it), after checking from
    its header that the server would take each image: format, size (at least
    one tile), pixel budget, complete file. DataError lists the images that fail,
    and, for an RGB set, the greyscale images the model would refuse."""
    problems, grey = [], []
    loose = InputSpec(color="grey")  # colour is judged below, over all images
    for p in paths:
        try:
            plan = plan_prepare(p.read_bytes(), loose)
        except (InputRejected, OSError) as exc:
            problems.append(_problem(p, exc))
            continue
        grey.append(plan.header.grey)
    _raise_problems(what, problems, len(paths))
    if all(grey):
        return "grey"
    mixed = [str(p) for p, g in zip(paths, grey, strict=True) if g]
    if mixed:
        shown = "\n  ".join(mixed[:SHOWN])
        more = f"\n  and {len(mixed) - SHOWN} more" if len(mixed) > SHOWN else ""
        raise DataError(
            f"{len(mixed)} of {len(paths)} {what} are greyscale among colour ones; the model "
            f"would be a colour model, which refuses greyscale images (as the server does). "
            f"Convert them, or make every image greyscale for a greyscale model:\n  {shown}{more}"
        )
    return "RGB"


def check_test_split(source: Source, spec: InputSpec) -> int:
    """Check the test split's layout and images before any work: ``good/`` and
    at least one defect folder, none of them empty, every image one the
    model takes. Returns the number of test images."""
    test = source.test
    if test is None:
        return 0
    kinds = kind_folders(test)
    names = [d.name for d in kinds]
    if "good" not in names or len(names) < 2:
        raise DataError(
            f"test split {test}: needs a good/ folder and one folder per defect kind "
            f"(found {', '.join(names) or 'no folders'})"
        )
    empty = [str(d) for d in kinds if not list_images(d)]
    if empty:
        raise DataError(f"test split {test}: empty folders {', '.join(empty)}")
    paths = [p for p, _, _ in labelled_images(test, None, 8)]
    problems = []
    for p in paths:
        try:
            plan_prepare(p.read_bytes(), spec)
        except (InputRejected, OSError) as exc:
            problems.append(_problem(p, exc))
    _raise_problems("test images", problems, len(paths))
    return len(paths)
