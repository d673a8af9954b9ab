"""Compare trained candidates on the same synthetic defects, with a paired interval.

    python -m model_export.paired_validation runs/a runs/b runs/c --per-image 4 --seed 1000

The validation figure ``calibrate`` writes has a standard error of about 0.03
on bottle's 42 held-out images, as large as the differences between the
configurations worth comparing. Scored on the same held-out images with the
same synthetic defects, most of that noise is common to every candidate: the
bootstrap below resamples images, not models, so the interval it gives for
the difference to the first candidate holds only the part that is not. A
second seed draws defects the calibrate figure did not see.

Every candidate must have been trained on the same split (data, hold-out
fraction and seed); each is calibrated on the held-out images as
``calibrate`` does, and no test image is read.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from model_export.data import checkpoint_spec, checkpoint_split
from model_export.evaluation import score, score_tensors
from model_export.families import load_checkpoint
from model_export.validation import synthetic_defectives
from service.calibration import conformal_thresholds, error_scales, rule_flags, rule_score


def paired_auroc_difference(
    good: np.ndarray, bad: np.ndarray, resamples: int = 1000, seed: int = 0
) -> np.ndarray:
    """Bootstrap AUROC(candidate) - AUROC(first) over resampled images.

    ``good`` (M, G) and ``bad`` (M, B) are M candidates' scores of the same
    G defect-free and B defective images. Returns (resamples, M - 1).
    """
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(seed)
    n_good, n_bad = good.shape[1], bad.shape[1]
    labels = np.r_[np.zeros(n_good), np.ones(n_bad)]
    out = np.empty((resamples, len(good) - 1))
    for r in range(resamples):
        gi, bi = rng.integers(0, n_good, n_good), rng.integers(0, n_bad, n_bad)
        aurocs = [
            roc_auc_score(labels, np.r_[g[gi], b[bi]]) for g, b in zip(good, bad, strict=True)
        ]
        out[r] = np.asarray(aurocs[1:]) - aurocs[0]
    return out


def compare(
    works: Sequence[Path], per_image: int, seed: int, target_fpr: float
) -> tuple[np.ndarray, np.ndarray, list[float]]:
    """Scores max_k(ek/epsk) of every candidate on the held-out images and on
    their synthetic defectives: (good (M, G), bad (M, B), rule detection rate per candidate)."""
    split = None
    defectives = None
    goods, bads, detected = [], [], []
    for work in works:
        _, _, model, ckpt = load_checkpoint(work / "checkpoint.pt")
        this = (ckpt["data"], ckpt["holdout"])
        if split is not None and this != split:
            raise SystemExit(f"{work} was trained on another split than {works[0]}")
        split = this
        hold = checkpoint_split(ckpt, "holdout")
        spec = checkpoint_spec(ckpt)
        if defectives is None:
            defectives = synthetic_defectives(hold, seed, per_image, spec)
        held_errors, _ = score(model, hold, spec=spec)
        fit_errors, _ = score(model, checkpoint_split(ckpt, "fit"), spec=spec)
        eps = conformal_thresholds(held_errors, error_scales(fit_errors), target_fpr).eps
        bad_errors, _ = score_tensors(model, defectives)
        goods.append(rule_score(held_errors, eps))
        bads.append(rule_score(bad_errors, eps))
        detected.append(float(rule_flags(bad_errors, eps).mean()))
    return np.stack(goods), np.stack(bads), detected


def main(argv: Sequence[str] | None = None) -> None:
    from sklearn.metrics import roc_auc_score

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("works", type=Path, nargs="+", help="--work directories; the first is the base")
    ap.add_argument("--per-image", type=int, default=4, help="synthetic defects per image")
    ap.add_argument("--seed", type=int, default=1000, help="seed of the synthetic defects")
    ap.add_argument("--target-fpr", type=float, default=0.01)
    ap.add_argument("--resamples", type=int, default=1000)
    args = ap.parse_args(argv)
    good, bad, detected = compare(args.works, args.per_image, args.seed, args.target_fpr)
    labels = np.r_[np.zeros(good.shape[1]), np.ones(bad.shape[1])]
    diffs = paired_auroc_difference(good, bad, args.resamples)
    aurocs = [roc_auc_score(labels, np.r_[g, b]) for g, b in zip(good, bad, strict=True)]
    print(f"{good.shape[1]} held-out images, {bad.shape[1]} with a synthetic defect")
    print("| candidate | validation AUROC | rule detects | minus the first, 90% interval |")
    print("|---|---|---|---|")
    for m, work in enumerate(args.works):
        interval = "-"
        if m > 0:
            lo, hi = np.quantile(diffs[:, m - 1], [0.05, 0.95])
            interval = f"{aurocs[m] - aurocs[0]:+.3f} [{lo:+.3f}, {hi:+.3f}]"
        print(f"| `{work}` | {aurocs[m]:.3f} | {detected[m]:.2f} | {interval} |")


if __name__ == "__main__":
    main()
