"""Everything a run needs, checked before any work: the flags and settings,
every image (read by the server's own code, service.preprocessing), the
number of held-out images against the calibration target, the work
directory, and the export version. :func:`_resolve` turns the parsed command
line into a :class:`Job`, or raises the first problem as a sentence.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model_export.config_args import ConfigError, build_config
from model_export.data import AUTO_HOLDOUT, auto_holdout, holdout_count
from model_export.families import FAMILIES, get_family
from model_export.sources import (
    DataError,
    Source,
    check_images,
    check_test_split,
    folder_source,
    good_images,
    mvtec_source,
)
from model_export.stages import colour_spec
from model_export.workdir import CHECKPOINT
from service.calibration import images_for_target, promised_fpr
from service.contract import InputSpec

DEFAULT_TARGET_FPR = 0.01
MODEL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")  # service.contract's ModelMetadata.name


@dataclass(frozen=True)
class Job:
    """What a stage will do, resolved and checked before any work."""

    source: Source | None
    config: Any
    work: Path
    out: Path | None
    target_fpr: float
    checked: tuple[list[Path], InputSpec] | None
    holdout: float | None  # the fraction held out, ``auto`` resolved; None: no training


def _images_needed(need: int, holdout: float) -> int:
    """The fewest good images whose hold-out has ``need`` images."""
    n = max(2, math.ceil(need / holdout))
    while holdout_count(n, holdout) < need:
        n += 1
    return n


def resolve_holdout(flag: float | str, n: int, target: float) -> float:
    """``--holdout`` as a fraction of ``n`` good images: a number as given,
    ``auto`` as data.auto_holdout for what ``target`` needs."""
    if flag == AUTO_HOLDOUT:
        return auto_holdout(n, images_for_target(target))
    assert isinstance(flag, float)
    return flag


def _check_target(n: int, holdout: float, target: float, explicit: bool, flag: str) -> None:
    """The held-out images against the calibration target, before any work;
    ``flag`` is the --holdout the user gave, as the messages quote it."""
    need = images_for_target(target)  # a valid target: _resolve checked it
    n_hold = holdout_count(n, holdout)
    if n_hold >= need:
        return
    best = promised_fpr(n_hold, target)
    what = (
        f"{n} good images, {n_hold} of them held out to calibrate (--holdout {flag}), can "
        f"promise a false-reject rate of at best {best:.2%} on new good parts; {target:.2%} "
        f"needs {need} held-out images, about {_images_needed(need, holdout)} good images"
    )
    if explicit:
        raise DataError(
            f"--target-fpr {target} cannot be kept: {what}. Add good images, raise --holdout, "
            f"or ask for --target-fpr {math.ceil(best * 1e4) / 1e4:g}"
        )
    print(
        f"note: {what}; the thresholds will promise {best:.2%} (metadata and summary say so)",
        file=sys.stderr,
    )


def _resolve(args: argparse.Namespace) -> Job:
    """Every check that needs no training, in the order a user would fix them."""
    stage = args.stage
    training = stage in ("train", "run")
    if args.good is not None and args.data is not None:
        raise DataError("--good and --data: give one (--good for a plain folder of good images)")
    if args.test is not None and args.data is not None:
        raise DataError("--test goes with --good; a --data category's test split is its test/")
    if args.holdout != AUTO_HOLDOUT and not 0 < args.holdout < 1:
        raise ConfigError(
            f"--holdout {args.holdout}: a fraction between 0 and 1, e.g. 0.2, or auto"
        )
    family = get_family(args.family)
    config = build_config(family, args.preset, args.config, args.set) if training else None
    source: Source | None = None
    if args.good is not None:
        source = folder_source(args.good, args.test)
    elif args.data is not None and training:
        source = mvtec_source(args.data)
    elif training:
        raise DataError(
            "no images: give --good DIR (a folder of defect-free images) or --data CATEGORY "
            "(MVTec AD layout)"
        )
    if args.name is not None and not MODEL_NAME.match(args.name):
        raise ConfigError(f"--name {args.name}: letters, digits and _ . - only")
    name = args.name
    if name is None and source is not None:  # made fit for a directory name
        name = re.sub(r"[^A-Za-z0-9_.-]+", "-", source.category).strip("-.") or "model"
    suffix = FAMILIES[family.name].suffix
    work = args.work
    if work is None:
        if name is None:
            raise ConfigError("--work is needed: the folder the train stage wrote to")
        work = Path("runs") / f"{name}-{suffix}"
    out = args.out
    folder = source is not None and source.layout == "folder"
    if out is None and folder and not args.no_export and stage in ("run", "export"):
        out = Path("models") / f"{name}-{suffix}"
    if stage == "export" and out is None:
        raise ConfigError("--export models/<name>[/<version>] is needed to export")
    if stage in ("run", "export") and out is not None and not args.no_export:
        _check_export(out)
    else:
        out = None
    target = DEFAULT_TARGET_FPR if args.target_fpr is None else args.target_fpr
    try:
        images_for_target(target)
    except ValueError as exc:
        raise ConfigError(f"--target-fpr {target}: {exc}") from None
    checked, holdout = None, None
    if training:
        assert source is not None
        paths = good_images(source)
        if len(paths) < 2:
            raise DataError(
                f"{source.good} holds 1 image; training needs at least 2: images to fit on, "
                "and images held out to calibrate the thresholds on"
            )
        spec = colour_spec(check_images(paths))
        checked = paths, spec
        holdout = resolve_holdout(args.holdout, len(paths), target)
        if stage == "run":
            explicit = args.target_fpr is not None
            _check_target(len(paths), holdout, target, explicit, str(args.holdout))
            check_test_split(source, spec)
    elif stage in ("calibrate", "evaluate", "export") and not (work / CHECKPOINT).is_file():
        raise DataError(f"{work / CHECKPOINT} is missing: train first (--work {work})")
    return Job(source, config, work, out, target, checked, holdout)


def _check_export(out: Path) -> None:
    """The export target, before any work: a new version of a valid name."""
    name = out.parent.name if out.name.isdigit() else out.name
    if not MODEL_NAME.match(name):
        raise ConfigError(
            f"--export {out}: the model directory's name {name!r} may hold letters, digits "
            "and _ . - only"
        )
    if out.name.isdigit() and out.exists():
        raise ConfigError(
            f"--export {out} already exists and versions are immutable: give the model "
            f"directory ({out.parent}) to write its next free version, or another version"
        )
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--export {out} is a file, not a model directory")
