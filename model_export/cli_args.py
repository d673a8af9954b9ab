"""The trainer: train, calibrate, validate, evaluate and export a model of either family.

One command, from a plain folder of defect-free images (any size; PNG, JPEG,
BMP, TIFF; subfolders too):

    inspection-train run --good path/to/good_images [--test path/to/test]

holds out a seeded fifth of the images, trains on the rest, calibrates the
thresholds on the held-out ones, validates on them with synthetic defects
pasted in, and exports the next version of ``models/<name>-<family>``; with
``--test`` (``good/`` and a folder per defect kind, masks optional) it adds
the test-split figures. ``inspection-train predict MODEL_DIR IMAGES...``
then gives the server's verdicts on any images, offline. A category in MVTec
AD layout trains with ``--data`` instead of ``--good`` (``--export`` then says
where to export: nothing is exported without it):

    inspection-train run --family pwae --data ../shared/datasets/mvtec_ad/bottle \\
        --work runs/bottle-pwae --export models/bottle-pwae

Stages (each reads what the previous one wrote under --work; ``<stage> --help``
says more):

* ``train``: a seeded fraction of the good images is held out (never test
  images); the family is fitted on the rest by the shared trainer
  (model_export/trainer.py) -> ``checkpoint.pt``. It also keeps
  ``train_state.pt`` after every epoch; an interrupted run resumes from it, a
  finished one is reused (model_export/workdir.py), and the trainer says which.
  What a family leaves to the category is then settled on the held-out
  images with synthetic defects (P-WAE's ``error_space="auto"``:
  model_export/pwae/error_space.py).
* ``calibrate``: e0..e9 on the held-out defect-free images -> eps0..eps9 for a
  target false-positive rate of the whole rule, and, from the same images
  with synthetic defects pasted in, the validation AUROC that configurations
  are chosen by (model_export/validation.py) -> ``calibration.json``.
* ``evaluate``: the test split -> image AUROC and max balanced accuracy of
  max_k(ek/epsk), AUROC of e0, confusion matrix of the rule, pixel AUROC, PRO
  (where there are masks) -> ``evaluation.json``, ``per_image.json``,
  ``summary.md`` and PNG plots.
* ``export``: the graph (model_export/export.py), proven first: onnxruntime's
  outputs against torch's on held-out images, a mismatch stopping the
  command with a sentence and nothing written; then models/<name>/<version>/
  per the contract (service.artifact; given models/<name>, the next free version).
* ``run``: all four (evaluate where there is a test split).

Everything a run needs is checked before any work: the flags and settings,
every image (read by the server's own code, service.preprocessing), the
number of held-out images against the calibration target, the work
directory, and the export version.

``--device auto|cpu|cuda`` (model_export/device.py) says where torch trains,
calibrates and evaluates: ``auto``, the default, takes the GPU where torch
sees one; ``cpu`` is the path every figure in docs/ was measured on and is
unchanged. The trainer logs the device and platform (torch's build, the
processor, the kernels torch picked for it, its threads) at start and each
epoch's images/s, and the artifact records them (``model_info``:
``train_device``, ``train_platform``, ``train_images_per_s``). Export always
runs on the CPU.

This module is the command line's text and flags: each stage's help, the
flags every stage takes and the parser (its description is the top of this
docstring). model_export/cli.py parses with it, model_export/preflight.py
checks what it parsed, model_export/stages.py does the work.
"""

from __future__ import annotations

import argparse
import textwrap
from pathlib import Path

from model_export import predict
from model_export.data import AUTO_HOLDOUT
from model_export.device import DEVICE_HELP, DEVICE_NAMES
from model_export.families import FAMILIES
from model_export.preflight import DEFAULT_TARGET_FPR
from service.contract import Codec

STAGES = {
    "run": (
        "all stages: train, calibrate (with validation), evaluate where there is a test "
        "split, export",
        """\
Train, calibrate, validate, evaluate and export in one go:

  1. train      a seeded --holdout fraction of the good images is held out (auto:
                20%, more where --target-fpr needs it, at most half); the family
                (--family, default pwae) is fitted on the rest
                -> <work>/checkpoint.pt. A work directory holding this same
                training is reused (finished) or resumed (interrupted), and the
                trainer says so; one holding another training is refused unless
                --force. P-WAE then settles its error space (pixels or
                features) on the held-out images with synthetic defects.
  2. calibrate  thresholds eps0..eps9 on the held-out images for --target-fpr
                (default 1% false rejects on new good parts), and validation:
                the same images with synthetic defects pasted in (no test image)
                -> <work>/calibration.json
  3. evaluate   only where there is a test split (--test DIR, or test/ of a --data
                category) -> <work>/evaluation.json, per_image.json, plots;
                <work>/summary.md either way
  4. export     the next version of the model directory, checked against torch
                with onnxruntime

Where things go: with --good DIR the name is DIR's (or its parent's where DIR is
called good or train; --name sets it), <work> defaults to runs/<name>-pwae and
the export to models/<name>-pwae (-otproto for ot_prototypes; --no-export: none).
With --data the export happens only where --export is given.

Everything is checked before any work: flags and --set values, every image
(read as the server reads it), the held-out images against the calibration
target, the work directory and the export version.

Examples:
  inspection-train run --good photos/good
  inspection-train run --good photos/good --test photos/test --set epochs=10
  inspection-train run --family ot_prototypes --data mvtec_ad/bottle \\
      --work runs/bottle-ot --export models/bottle-otproto
""",
    ),
    "train": (
        "fit the family on the good images less a held-out fraction -> checkpoint.pt",
        "Fit the family on the good images (--good DIR or --data CATEGORY) less a seeded "
        "--holdout fraction -> <work>/checkpoint.pt. A finished training of the same "
        "images and settings in <work> is reused, an interrupted one resumed, "
        "another refused unless --force.",
    ),
    "calibrate": (
        "thresholds on the held-out images, and validation on synthetic defects",
        "Thresholds eps0..eps9 on the held-out images for --target-fpr, the images sent "
        "as --codec; validation: the same images with synthetic defects pasted in "
        "-> <work>/calibration.json.",
    ),
    "evaluate": (
        "figures on a test split (good/ and a folder per defect kind)",
        "Image AUROC, balanced accuracy, the calibrated rule's false rejects and "
        "detections, pixel AUROC and PRO where there are masks, on the test split the "
        "training recorded or --test DIR -> <work>/evaluation.json, per_image.json, "
        "summary.md, plots.",
    ),
    "export": (
        "write models/<name>/<version> and check it against torch",
        "Write the model version (--export models/<name> for its next free version, or "
        "models/<name>/<version>) from <work>, and compare onnxruntime's outputs with "
        "torch's on held-out images.",
    ),
}


class _Help(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each flag's default where it has one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "%(default)" in text or "default" in text:
            return text
        if action.default is None or action.default is False or action.default == []:
            return text
        if action.default is argparse.SUPPRESS:
            return text
        return f"{text} (default: %(default)s)"


def _holdout(text: str) -> float | str:
    """``--holdout``: 'auto' or a number (checked to lie in (0, 1) before any work)."""
    if text == AUTO_HOLDOUT:
        return AUTO_HOLDOUT
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither 'auto' nor a fraction, e.g. 0.2"
        ) from None


def _common() -> argparse.ArgumentParser:
    """The flags every stage takes (each stage reads those it needs)."""
    ap = argparse.ArgumentParser(add_help=False)
    data = ap.add_argument_group("images")
    data.add_argument(
        "--good", type=Path, help="a folder of defect-free images, subfolders too (any size)"
    )
    data.add_argument(
        "--test",
        type=Path,
        help="a test folder: good/ and one folder per defect kind; masks optional, as "
        "ground_truth/<kind>/<name>_mask.png inside or beside it",
    )
    data.add_argument(
        "--data", type=Path, help="instead of --good: a category directory in MVTec AD layout"
    )
    where = ap.add_argument_group("where")
    where.add_argument(
        "--work", type=Path, help="checkpoint and reports (default with --good or --data: "
        "runs/<name>-pwae or runs/<name>-otproto)",
    )  # fmt: skip
    where.add_argument(
        "--export",
        dest="out",
        type=Path,
        help="models/<name>/<version>, or models/<name> for its next free version "
        "(default with --good: models/<name>-pwae or models/<name>-otproto)",
    )
    where.add_argument("--no-export", action="store_true", help="run: do not export")
    where.add_argument("--name", help="the model's name for the default --work and --export")
    where.add_argument(
        "--force",
        action="store_true",
        help="train afresh, deleting what the trainer wrote in --work",
    )
    training = ap.add_argument_group("training")
    training.add_argument(
        "--family",
        default="pwae",
        choices=sorted(FAMILIES),
        help=", ".join(f"{name} ({entry.summary})" for name, entry in FAMILIES.items()),
    )
    training.add_argument(
        "--preset", help="a named config of the family to start from, e.g. pwae's 'paper'"
    )
    training.add_argument("--config", type=Path, help="JSON of the family's config fields")
    training.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one config field, e.g. --set epochs=5 or --set backbone=resnet50 "
        "(JSON, or a bare word); repeatable",
    )
    training.add_argument(
        "--holdout",
        type=_holdout,
        default=AUTO_HOLDOUT,
        help="fraction of the good images held out to calibrate and validate on; 'auto': "
        "20%%, or more where --target-fpr needs more held-out images to be promised "
        "(at most half)",
    )
    training.add_argument("--seed", type=int, default=0, help="seed of the hold-out split")
    training.add_argument(
        "--augment-codec",
        type=Codec.parse,
        help="train: add each fit image also passed through this codec, e.g. jpeg:90",
    )
    training.add_argument("--device", default="auto", choices=DEVICE_NAMES, help=DEVICE_HELP)
    cal = ap.add_argument_group("calibration")
    cal.add_argument(
        "--target-fpr",
        type=float,
        help=f"false-reject rate to promise on new good parts (default {DEFAULT_TARGET_FPR}); "
        "an explicit target the held-out images cannot keep stops the run before training",
    )
    cal.add_argument(
        "--codec",
        type=Codec.parse,
        default=Codec(),
        help="what the line's camera sends, e.g. png or jpeg:90; calibration "
        "and evaluation pass their images through it",
    )
    return ap


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="inspection-train",
        description=__doc__.split("\n\n")[0]
        + "\n\n"
        + __doc__.split("\n\n")[1]
        + "\n\n    inspection-train run --good path/to/good_images [--test path/to/test]",
        formatter_class=_Help,
        epilog="`inspection-train <stage> --help` says what a stage reads, writes and defaults to.",
    )
    subs = ap.add_subparsers(dest="stage", required=True, metavar="stage")
    common = _common()
    for name, (short, long) in STAGES.items():
        text = long if "\n" in long else textwrap.fill(long, 80)
        subs.add_parser(name, parents=[common], help=short, description=text, formatter_class=_Help)
    pred = subs.add_parser(
        "predict",
        help="the server's verdicts on images, offline: a CSV and an overlay per image",
        description=predict.__doc__,
        formatter_class=_Help,
    )
    pred.add_argument(
        "model_dir", type=Path, help="models/<name> (its newest version) or models/<name>/<v>"
    )
    pred.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    pred.add_argument(
        "--out", type=Path, default=Path("predictions"), help="where the CSV and overlays go"
    )
    return ap
