"""Rescoring a trained P-WAE: the same weights, its error measured other
ways, scored on validation only (no training, no test image).

    python -m model_export.pwae.rescore runs/mt-pwae-auto \\
        --candidate error_backbone=efficientnet_lite0 \\
        --candidate error_backbone=efficientnet_lite1 \\
        --candidate error_backbone=efficientnet_lite2 --seeds 0 1

Each ``--candidate`` is one or more comma-separated KEY=VALUE settings of
the error (ERROR_SETTINGS) over the checkpoint's own config, as it was
settled after training. For every candidate and every seed, the held-out
good images the checkpoint recorded are scored against the same images with
two synthetic defects each (model_export/validation.py, drawn with that
seed), by the AUROC of max_k(e_k / s_k) with s_k the fit images' median
error k: the figure ``error_space="auto"`` settles by
(model_export/pwae/error_space.py). With ``--line-changes``, each row also
counts the held-out images a calibrated threshold rejects when the line
changes a little (a lamp 5% dimmer, the part 3 px off, a lens slightly out
of focus: model_export/line_changes.py). Each rule that chose a setting
this way is in docs/pwae-experiments.md, written before its figures.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from model_export.config_args import ConfigError, parse_set
from model_export.data import checkpoint_spec, checkpoint_split, load_tensor
from model_export.families import load_checkpoint
from model_export.line_changes import LINE_CHANGES, changed_inputs
from model_export.pwae.error_space import line_change_counts, measured_as, measured_errors
from model_export.pwae.model import PWAE
from model_export.validation import synthetic_defectives, validation_figures
from service.calibration import error_scales
from service.contract import InputSpec

# The settings that change how the error is measured, not what is trained.
ERROR_SETTINGS = (
    "error_space", "error_backbone", "error_feature_stride", "error_feature_scale",
    "error_sigma", "error_normalisation", "error_std_floor", "error_stat_radius", "tile_error",
)  # fmt: skip

# The settings the raw error maps depend on (the rest act on them afterwards).
RAW_MAP_SETTINGS = (
    "error_space", "error_backbone", "error_feature_stride", "error_feature_scale", "error_sigma",
)  # fmt: skip


def parse_candidate(text: str) -> dict[str, Any]:
    """``KEY=VALUE[,KEY=VALUE...]`` -> the settings, each an error setting."""
    update = dict(parse_set(item) for item in text.split(","))
    other = sorted(set(update) - set(ERROR_SETTINGS))
    if other:
        raise ConfigError(
            f"--candidate {text}: {', '.join(other)} would change what is trained; "
            f"a rescoring takes only {', '.join(ERROR_SETTINGS)}"
        )
    return update


def rescore(
    model: PWAE,
    fit: torch.Tensor,
    holdout: Sequence[Path],
    spec: InputSpec,
    candidates: Sequence[dict[str, Any]],
    seeds: Sequence[int] = (0,),
    line_changes: bool = False,
) -> list[dict[str, Any]]:
    """One row per candidate: its settings and validation AUROC per seed;
    ``fit`` are the images the model was trained on, ``holdout`` the held-out
    ones. With ``line_changes``, also how many held-out images a threshold
    from the other half rejects under each of LINE_CHANGES (model_export/line_changes.py)."""
    held = torch.stack([load_tensor(p, spec) for p in holdout])
    inputs = {"fit": fit, "held": held}
    inputs.update(
        (f"seed {s}", torch.stack(synthetic_defectives(holdout, s, 2, spec))) for s in seeds
    )
    if line_changes:
        inputs.update(
            (name, changed_inputs(holdout, spec, change)) for name, change in LINE_CHANGES.items()
        )
    rows = []
    # Candidates that differ only after the raw maps (the z-score's
    # statistics, the tile error) share them: each image set is
    # reconstructed and measured once per distinct raw error.
    maps: dict[tuple[Any, ...], dict[str, torch.Tensor]] = {}
    for update in candidates:
        candidate = measured_as(model, update)
        space = candidate.error_space()
        key = tuple(getattr(candidate.config, k) for k in RAW_MAP_SETTINGS)
        if key not in maps:
            if space == "feature" and candidate.config.error_feature_scale == "channel":
                candidate.fit_feature_scale(fit)  # from the images training fitted it on
            maps[key] = {part: candidate.raw_error_maps(x)[space] for part, x in inputs.items()}
        errs = measured_errors(candidate, maps[key])
        # The fit images' median errors in the place of eps: the same ranking
        # as the calibrated rule's (model_export/pwae/error_space.py).
        scales = error_scales(errs["fit"])
        row: dict[str, Any] = {
            "settings": update,
            "validation_auroc": {
                f"seed {s}": round(
                    validation_figures(errs["held"], errs[f"seed {s}"], scales)["synthetic_auroc"],
                    4,
                )
                for s in seeds
            },
        }
        text = ", ".join(f"{k} {v:.3f}" for k, v in row["validation_auroc"].items())
        if line_changes:
            rejects = line_change_counts(candidate, maps[key])
            row["line_change_rejects"] = rejects
            row["line_change_images"] = len(holdout)
            counts = ", ".join(f"{k} {v}" for k, v in rejects.items())
            text += f"; rejected of {len(holdout)}: {counts}"
        rows.append(row)
        print(f"{update}: {text}", flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model_export.pwae.rescore", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("work", type=Path, help="a P-WAE work directory (its checkpoint.pt)")
    parser.add_argument(
        "--candidate", action="append", required=True, metavar="KEY=VALUE[,KEY=VALUE]",
        help="error settings to score, e.g. error_backbone=efficientnet_lite1 (repeatable)",
    )  # fmt: skip
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="synthetic defect draws")
    parser.add_argument(
        "--line-changes", action="store_true",
        help="also count held-out images rejected when the line changes a little "
        "(model_export/line_changes.py)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    try:
        candidates = [parse_candidate(c) for c in args.candidate]
    except ConfigError as exc:
        parser.error(str(exc))
    if not (args.work / "checkpoint.pt").is_file():
        parser.error(f"{args.work} holds no checkpoint.pt (train there first)")
    _, _, model, ckpt = load_checkpoint(args.work / "checkpoint.pt")
    if not isinstance(model, PWAE):
        parser.error(f"{args.work}: a rescoring takes a P-WAE work directory")
    spec = checkpoint_spec(ckpt)
    fit = torch.stack([load_tensor(p, spec) for p in checkpoint_split(ckpt, "fit")])
    hold = checkpoint_split(ckpt, "holdout")
    rows = rescore(model, fit, hold, spec, candidates, args.seeds, args.line_changes)
    if args.out:
        args.out.write_text(json.dumps({"work": str(args.work), "rows": rows}, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
