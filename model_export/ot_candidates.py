"""OT-prototype settings chosen on validation, and afterwards how well
validation ranked them against the test split.

    python -m model_export.ot_candidates --data ../shared/datasets/mvtec_ad/bottle \\
        --out bench/results/ot_candidates_bottle.json
    python -m model_export.ot_candidates --data ../shared/datasets/mt_defect/magnetic_tile \\
        --out bench/results/ot_candidates_magnetic_tile.json
    python -m model_export.ot_candidates --report bench/results/ot_candidates_*.json

Every candidate in CANDIDATES is fitted with the family's own fitting
(model_export/ot_prototypes/fit.py) on the training split the trainer uses
(hold-out 0.2, seed 0), on features the frozen encoder computes once per
image. Its validation AUROC is the trainer's: the image error e0 of the
held-out good images against the same images with synthetic defects
(model_export/validation.py, two each, seed 0). The test AUROC (e0 over the
test split) is written to the same file but printed by ``--report`` only
after the choice, which ``--report`` makes from validation alone by RULE.

The candidates run on the encoder the recorded sweep ran on, EfficientNet-
Lite0 (``--backbone`` names another); the family's default encoder was
chosen afterwards by the run command's own validation (docs/ot-prototypes.md).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model_export.backbones import LITE_STAGES, LiteName, input_normalization
from model_export.data import category_spec, load_tensor, split_train, test_set
from model_export.ot_prototypes import (
    FIRST_ENSEMBLE,
    MemberConfig,
    OTPrototypesConfig,
    OTPrototypesModel,
    extract_features,
    fit_member,
)
from model_export.ot_prototypes.model import frozen_encoder
from model_export.validation import synthetic_defectives
from service.contract import InputSpec

RULE = (
    "the highest mean over the datasets of the validation AUROC; candidates "
    "within 0.005 of it are tied, and the tie goes to the shortest fit (summed over the datasets)"
)
TIE = 0.005

_M = MemberConfig
_SHARP = {"epsilon": 0.01, "sinkhorn_iterations": 100}  # the authors' values
# (label, config fields): the first default, then one member on the deepest
# block ("s32") with more prototypes, the authors' epsilon and iterations,
# larger problems (images per batch), local members, and ensembles.
CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("first default (4 members, s8+s16)", {"members": FIRST_ENSEMBLE, "images_per_batch": 4}),
    ("s32 k16", {"members": (_M("s32", 0.0, 16),), "images_per_batch": 4}),
    ("s32 k64", {"members": (_M("s32", 0.0, 64),), "images_per_batch": 4}),
    ("s32 k256", {"members": (_M("s32", 0.0, 256),), "images_per_batch": 4}),
    ("s32 alpha0.5 k64", {"members": (_M("s32", 0.5, 64),), "images_per_batch": 4}),
    ("s32 k64 eps0.01 it100", {"members": (_M("s32", 0.0, 64),), "images_per_batch": 4, **_SHARP}),
    (
        "s32 k64 eps0.01 it100 ema0.5",
        {"members": (_M("s32", 0.0, 64),), "images_per_batch": 4, "ema": 0.5, **_SHARP},
    ),
    (
        "s32 k64 ipb64 eps0.01 it100",
        {"members": (_M("s32", 0.0, 64),), "images_per_batch": 64, **_SHARP},
    ),
    (
        "s32 k256 ipb64 eps0.01 it100",
        {"members": (_M("s32", 0.0, 256),), "images_per_batch": 64, **_SHARP},
    ),
    (
        "s32 k64 ipb16 eps0.01 it100 3 epochs",
        {"members": (_M("s32", 0.0, 64),), "images_per_batch": 16, "epochs": 3, **_SHARP},
    ),
    (
        "s32 k256 ipb128 eps0.01 it100",
        {"members": (_M("s32", 0.0, 256),), "images_per_batch": 128, **_SHARP},
    ),
    ("s32 k256 ipb64", {"members": (_M("s32", 0.0, 256),), "images_per_batch": 64}),
    (
        "s32 alpha0.5 k256 ipb64 eps0.01 it100",
        {"members": (_M("s32", 0.5, 256),), "images_per_batch": 64, **_SHARP},
    ),
    (
        "s32 k512 ipb64 eps0.01 it100",
        {"members": (_M("s32", 0.0, 512),), "images_per_batch": 64, **_SHARP},
    ),
    (
        "s16 k16 + s32 k256, ipb64 eps0.01 it100",
        {"members": (_M("s16", 0.0, 16), _M("s32", 0.0, 256)), "images_per_batch": 64, **_SHARP},
    ),
    (
        "first default + s32 k256, ipb64 eps0.01 it100",
        {"members": (*FIRST_ENSEMBLE, _M("s32", 0.0, 256)), "images_per_batch": 64, **_SHARP},
    ),
)


def _auroc(good: np.ndarray, bad: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.r_[np.zeros(len(good)), np.ones(len(bad))], np.r_[good, bad]))


@torch.no_grad()
def _image_errors(model: OTPrototypesModel, feats: dict[str, torch.Tensor]) -> np.ndarray:
    n = len(next(iter(feats.values())))
    maps = [
        model.map_from_features({s: f[i : i + 16] for s, f in feats.items()})
        for i in range(0, n, 16)
    ]
    return torch.cat(maps).flatten(1).max(dim=1).values.numpy()


def sweep(
    data: Path,
    candidates: Sequence[tuple[str, dict[str, Any]]] = CANDIDATES,
    backbone: LiteName = "efficientnet_lite0",
) -> dict[str, Any]:
    base = OTPrototypesConfig(backbone=backbone)
    norm = input_normalization(backbone, base.input_normalisation)
    spec = category_spec(data, InputSpec(normalization=norm))
    fit_paths, hold = split_train(data, 0.2, 0)
    tests = test_set(data)
    images = {
        "fit": torch.stack([load_tensor(p, spec) for p in fit_paths]),
        "hold": torch.stack([load_tensor(p, spec) for p in hold]),
        "synthetic": torch.stack(synthetic_defectives(hold, 0, 2, spec)),
        "test": torch.stack([load_tensor(p, spec) for p, _, _ in tests]),
    }
    labels = np.array([label for _, label, _ in tests])
    encoder = frozen_encoder(backbone)
    scales = sorted({m.scale for _, cfg in candidates for m in cfg["members"]})
    # A model with one small member per scale, only for the family's own
    # feature extraction: every candidate is then fitted and scored on them.
    probe = OTPrototypesModel(
        OTPrototypesConfig(
            members=tuple(MemberConfig(s, 0.0, 1) for s in scales), backbone=backbone
        ),
        encoder,
    ).eval()
    t0 = time.perf_counter()
    feats = {k: extract_features(probe, x) for k, x in images.items()}
    rows: list[dict[str, Any]] = []
    for label, fields in candidates:
        config = OTPrototypesConfig(**{**fields, "backbone": backbone})
        model = OTPrototypesModel(config, encoder).eval()
        start = time.perf_counter()
        for member in model.prototype_members():
            fit_member(member, feats["fit"][member.config.scale], config)
        fit_s = time.perf_counter() - start
        e0 = {k: _image_errors(model, f) for k, f in feats.items() if k != "fit"}
        rows.append(
            {
                "label": label,
                "config": config.to_dict(),
                "validation_auroc": _auroc(e0["hold"], e0["synthetic"]),
                "test_auroc": _auroc(e0["test"][labels == 0], e0["test"][labels == 1]),
                "fit_s": round(fit_s, 1),
            }
        )
        print(
            f"{label}: validation {rows[-1]['validation_auroc']:.3f}, fit {fit_s:.0f} s", flush=True
        )
    return {
        "data": str(data),
        "backbone": backbone,
        "images": {k: len(x) for k, x in images.items()},
        "feature_s": round(time.perf_counter() - t0 - sum(r["fit_s"] for r in rows), 1),
        "candidates": rows,
    }


def choose(results: Sequence[dict[str, Any]]) -> str:
    """The candidate RULE picks, from validation figures and fit times only."""
    by_label: dict[str, list[dict[str, Any]]] = {}
    for res in results:
        for row in res["candidates"]:
            by_label.setdefault(row["label"], []).append(row)
    complete = {k: v for k, v in by_label.items() if len(v) == len(results)}
    mean = {k: float(np.mean([r["validation_auroc"] for r in v])) for k, v in complete.items()}
    best = max(mean.values())
    tied = [k for k, m in mean.items() if m >= best - TIE]
    return min(tied, key=lambda k: sum(r["fit_s"] for r in complete[k]))


def report(results: Sequence[dict[str, Any]]) -> str:
    from scipy.stats import spearmanr

    chosen = choose(results)
    lines = [f"Rule: {RULE}.", f"Chosen: {chosen}.", ""]
    for res in results:
        rows = res["candidates"]
        name = Path(res["data"]).name
        lines += [
            f"{name} ({res['images']})",
            "| candidate | validation AUROC | test AUROC | fit s |",
        ]
        lines.append("|---|---|---|---|")
        for r in sorted(rows, key=lambda r: -r["validation_auroc"]):
            mark = " (chosen)" if r["label"] == chosen else ""
            figures = f"{r['validation_auroc']:.3f} | {r['test_auroc']:.3f} | {r['fit_s']:.0f}"
            lines.append(f"| {r['label']}{mark} | {figures} |")
        rho = spearmanr([r["validation_auroc"] for r in rows], [r["test_auroc"] for r in rows])
        lines += [
            f"Spearman rank correlation, validation against test, {len(rows)} candidates: "
            f"{rho.statistic:.2f}",
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, help="an MVTec-layout category folder")
    parser.add_argument("--out", type=Path, help="where the sweep's JSON goes")
    parser.add_argument("--report", type=Path, nargs="+", help="sweep JSON files to report on")
    parser.add_argument(
        "--backbone",
        choices=sorted(LITE_STAGES),
        default="efficientnet_lite0",
        help="the frozen encoder every candidate runs on (default: Lite0, as recorded)",
    )
    args = parser.parse_args(argv)
    if args.report:
        print(report([json.loads(p.read_text()) for p in args.report]))
        return 0
    if args.data is None or args.out is None:
        parser.error("give --data and --out to sweep, or --report FILES")
    torch.manual_seed(0)
    result = sweep(args.data, backbone=args.backbone)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
