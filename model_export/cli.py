"""The trainer's command line: ``inspection-train`` (``python -m model_export``).

``main`` parses the arguments (model_export/cli_args.py, whose docstring is
the overview of the stages and the top of ``--help``), checks everything a
run needs before any work (model_export/preflight.py), and runs the stages
the command names (model_export/stages.py); ``predict`` is
model_export/predict.py. A problem found on the way ends the command with
``inspection-train <stage>: error: <sentence>`` and exit status 2.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from model_export import predict
from model_export.cli_args import parser
from model_export.config_args import ConfigError
from model_export.data import holdout_count
from model_export.device import DeviceUnavailable, resolve_device
from model_export.export import ExportMismatch
from model_export.preflight import Job, _resolve
from model_export.sources import DataError
from model_export.stages import (
    calibrate,
    evaluate,
    export,
    summarise_without_test,
    train,
    version_dir,
)
from model_export.workdir import WorkDirConflict
from service.rejection import InputRejected


def _fail(stage: str, message: str) -> NoReturn:
    print(f"inspection-train {stage}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


def main(argv: Sequence[str] | None = None) -> None:
    ap = parser()
    args = ap.parse_args(argv)
    stage = args.stage
    if stage == "predict":
        code = predict.main(args.model_dir, args.images, args.out)
        if code:
            raise SystemExit(code)
        return
    device = torch.device("cpu")
    if stage != "export":  # export runs on the CPU
        try:
            device = resolve_device(args.device)
        except DeviceUnavailable as e:
            _fail(stage, str(e))
    try:
        job = _resolve(args)
        _run(args, job, device)
    except (DataError, ConfigError, WorkDirConflict, InputRejected, ExportMismatch) as exc:
        _fail(stage, str(exc))


def _run(args: argparse.Namespace, job: Job, device: torch.device) -> None:
    stage = args.stage
    if stage == "run":
        assert job.source is not None and job.checked is not None and job.holdout is not None
        n = len(job.checked[0])
        test = "no test split" if job.source.test is None else f"test split {job.source.test}"
        where = "no export" if job.out is None else f"exports the next version of {job.out}"
        print(
            f"inspection-train run: {args.family} on {n} good images from {job.source.good} "
            f"({holdout_count(n, job.holdout)} held out), {test}; work in {job.work}; {where}"
        )
    if stage in ("train", "run"):
        assert job.source is not None and job.holdout is not None
        train(
            args.family, job.source, job.work, job.config.to_dict(), job.holdout, args.seed,
            args.augment_codec, device, args.force, job.checked,
        )  # fmt: skip
    if stage in ("calibrate", "run"):
        calibrate(job.work, job.target_fpr, args.codec, device)
    if stage == "evaluate":
        evaluate(job.work, device, args.test)
    elif stage == "run":
        if job.source is not None and job.source.test is not None:
            evaluate(job.work, device)
        else:
            summarise_without_test(job.work)
            print("no test split (--test DIR adds its figures): validation is the quality figure")
    if job.out is not None:
        version = version_dir(job.out)
        export(job.work, version)
        if stage == "run":
            print(
                f"done: {version}; {job.work / 'summary.md'} says how it did. Serve it with "
                f"`python -m service --model-dir {job.out}`; try it on images with "
                f"`inspection-train predict {job.out} IMAGES...`"
            )
    elif stage == "run":
        why = "--no-export" if args.no_export else "no --export given"
        print(f"not exported ({why}); {job.work / 'summary.md'} says how it did")


if __name__ == "__main__":
    main()
