"""What a person reads after evaluation: a Markdown summary and PNG plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np

from service.calibration import rule_score

PAPER = {
    "pwae": "P-WAE paper, bottle: image AUROC 0.99, balanced accuracy 0.99",
    "ot_prototypes": "OT prototypes paper, MVTec AD mean: image AUROC 0.973, pixel AUROC 0.976",
}


def _is_mvtec(dataset: str) -> bool:
    return dataset.lower().replace(" ", "_").replace("-", "_") == "mvtec_ad"


def paper_reference(family: str, dataset: str, category: str) -> str:
    """The published figure this model can be held against, or why there is none.

    The P-WAE paper's figure is for MVTec AD's bottle; the OT prototypes
    paper's is a mean over MVTec AD's categories. Neither is a figure for
    another category or for anyone's own parts.
    """
    if family == "pwae" and _is_mvtec(dataset) and category == "bottle":
        return f"For reference: {PAPER['pwae']}."
    if family == "ot_prototypes" and _is_mvtec(dataset):
        return (
            f"For reference: {PAPER['ot_prototypes']} (a mean over the categories, "
            f"not {category}'s own figure)."
        )
    if family == "pwae" and _is_mvtec(dataset):
        return (
            f"No published P-WAE figure for {category} to compare with (the paper's is for "
            "the bottle)."
        )
    return "No published figure for these images to compare with."


def write_plots(
    work: Path,
    items: list[tuple[Path, int, np.ndarray]],
    errors: np.ndarray,
    maps: np.ndarray,
    eps: np.ndarray,
    labels: np.ndarray,
) -> None:
    """roc.png, scores.png (good vs defective histograms), heatmaps.png (examples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    score = rule_score(errors, eps)
    fpr, tpr, _ = roc_curve(labels, score)
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot(fpr, tpr, label=f"max_k e_k/eps_k (AUROC {roc_auc_score(labels, score):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="ROC, test split")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "roc.png", dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = list(np.linspace(0, np.quantile(score, 0.99) * 1.1, 40))
    ax.hist(score[labels == 0], bins, alpha=0.6, label="defect-free")
    ax.hist(score[labels == 1], bins, alpha=0.6, label="defective")
    ax.axvline(1.0, color="k", ls="--", lw=1, label="threshold (score 1)")
    ax.set(xlabel="max_k e_k / eps_k", ylabel="images")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(work / "scores.png", dpi=100)
    plt.close(fig)

    # Example heatmaps: the two most and least anomalous images of each label.
    picks = []
    for label in (1, 0):
        idx = np.flatnonzero(labels == label)
        order = idx[np.argsort(score[idx])]
        picks += list(order[-2:]) + list(order[:1])
    top = float(np.quantile(maps, 0.999))
    cols = []
    for i in picks:
        path, _, mask = items[i]
        bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
        assert bgr is not None, path
        rgb = cv2.resize(bgr, maps.shape[1:][::-1])
        heat = cv2.applyColorMap(
            (np.clip(maps[i] / top, 0, 1) * 255).astype(np.uint8), cv2.COLORMAP_JET
        )
        overlay = cv2.addWeighted(rgb, 0.5, heat, 0.5, 0)
        edge = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
        overlay[edge > 0] = (255, 255, 255)
        cv2.putText(
            overlay, f"{score[i]:.2f}", (5, 20), cv2.FONT_HERSHEY_SIMPLEX, 0.6, (255, 255, 255), 2
        )
        cols.append(np.vstack([rgb, overlay]))
    cv2.imwrite(str(work / "heatmaps.png"), np.hstack(cols))


def _validation_line(v: dict[str, float]) -> str:
    return (
        f"Validation, the figure configurations are chosen by: {v['synthetic_images']:.0f} "
        f"held-out defect-free images with synthetic defects against the same images "
        f"without (no test image): AUROC {v['synthetic_auroc']:.3f}; the calibrated rule "
        f"detects {v['synthetic_detected']:.2f} of them."
    )


def _promise_line(record: dict[str, Any]) -> str:
    """What the thresholds promise on new good parts, against the target."""
    promised, upper = record.get("promised_fpr"), record.get("fpr_upper_90")
    if promised is None or upper is None:
        return f"Thresholds set for a {record['target_fpr']:.2%} false-reject target."
    kept = (
        ""
        if promised <= record["target_fpr"] + 1e-12
        else (f", above the {record['target_fpr']:.2%} target: more good images would lower it")
    )
    return (
        f"The thresholds promise a false-reject rate on new good parts of at most "
        f"{promised:.2%} expected ({upper:.2%} with 90% probability){kept}."
    )


def _figure(m: dict[str, float], key: str, why_missing: str) -> str:
    return f"{m[key]:.3f}" if key in m else f"- ({why_missing})"


def write_summary(
    work: Path,
    ckpt: dict[str, Any],
    metrics: dict[str, float] | None,
    validation: dict[str, float] | None = None,
    masked_defective: int | None = None,
    calibration: dict[str, Any] | None = None,
) -> None:
    """summary.md: training, the calibration's promise (``calibration``: its
    record), validation and, where there was a test split (``metrics``), its
    figures. ``masked_defective``: how many defective test images had a mask
    (the pixel figures' images)."""
    dataset = str(ckpt.get("dataset", Path(ckpt["data"]).resolve().parent.name))
    category = str(ckpt.get("category", Path(ckpt["data"]).name))
    lines = [
        f"# {ckpt['family']} on {category}",
        "",
        f"Trained on {len(ckpt['fit'])} defect-free images in {ckpt['train_seconds']:.0f} s; "
        f"thresholds calibrated on {len(ckpt['holdout'])} held-out defect-free images.",
        "",
        *([] if calibration is None else [_promise_line(calibration), ""]),
        *([] if validation is None else [_validation_line(validation), ""]),
    ]
    if metrics is None:
        lines += [
            "No test split was given (`--test DIR`: good/ and a folder per defect kind), so "
            "there are no test figures; the validation above is the quality figure.",
            "",
        ]
    else:
        m = metrics
        defective = int(m["tp"] + m["fn"])
        no_masks = "no defect masks in the test split: pixel figures need them"
        lines += [
            "| figure (test split) | value |",
            "|---|---|",
            f"| image AUROC (max_k e_k/eps_k) | {m['image_auroc']:.3f} |",
            f"| image AUROC (e0 alone) | {m['image_auroc_e0']:.3f} |",
            f"| max balanced accuracy | {m['max_balanced_accuracy']:.3f} |",
            f"| pixel AUROC | {_figure(m, 'pixel_auroc', no_masks)} |",
            f"| PRO (FPR <= 0.3) | {_figure(m, 'pro_30', no_masks)} |",
            "| calibrated rule: TP / FP / TN / FN | "
            f"{m['tp']:.0f} / {m['fp']:.0f} / {m['tn']:.0f} / {m['fn']:.0f} |",
            "",
        ]
        if masked_defective is not None and 0 < masked_defective < defective:
            lines += [
                f"Pixel figures over the {masked_defective} of {defective} defective images "
                "that have a mask, and the good images.",
                "",
            ]
        lines += [
            "![ROC](roc.png) ![scores](scores.png)",
            "",
            "![examples: input above, heatmap below, mask outline in white](heatmaps.png)",
            "",
        ]
    lines += [paper_reference(str(ckpt["family"]), dataset, category), ""]
    (work / "summary.md").write_text("\n".join(lines))
