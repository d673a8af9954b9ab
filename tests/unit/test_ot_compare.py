"""The comparison report reads an artifact's own figures and times it."""

from __future__ import annotations

from pathlib import Path

from model_export import ot_compare
from service.artifact import load_artifact, resolve_version_dir

MODEL = resolve_version_dir(Path(__file__).resolve().parents[2] / "models" / "bottle-otproto")


def test_report_has_the_artifacts_figures_and_a_timing(tmp_path: Path) -> None:
    out = tmp_path / "cmp.md"
    ot_compare.main([str(MODEL), "--runs", "1", "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ot_prototypes | bottle"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    meta = load_artifact(MODEL).metadata
    assert meta.evaluation is not None
    m, cal = meta.evaluation.metrics, meta.calibration
    # image AUROC, balanced accuracy, pixel AUROC, PRO from the metadata.
    keys = ("image_auroc", "max_balanced_accuracy", "pixel_auroc", "pro_30")
    assert cells[2:6] == [f"{m[k]:.3f}" for k in keys]
    # The calibrated rule on the test split, as the line sees it, and its promise.
    good, bad = meta.evaluation.good_images, meta.evaluation.defective_images
    assert cells[6] == f"{good}+{bad}"
    assert cells[7] == f"{int(m['fp'])}/{good} ({m['fp'] / good:.1%})"
    assert cells[8] == f"{int(m['tp'])}/{bad} ({m['tp'] / bad:.1%})"
    assert cal.promised_fpr is not None and cal.fpr_upper_90 is not None
    assert cells[9] == f"{cal.promised_fpr:.1%} / {cal.fpr_upper_90:.1%}"
    assert cells[10] == "png"
    assert float(cells[11]) > 0  # ms per image
    assert abs(float(cells[12]) - (MODEL / "model.onnx").stat().st_size / 1e6) < 0.06  # MB
    assert "0.973" in text and "0.976" in text  # the paper's figures are there
