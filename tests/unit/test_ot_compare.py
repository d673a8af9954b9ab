"""The comparison report reads an artifact's own figures and times it."""

from __future__ import annotations

from pathlib import Path

from model_export import ot_compare

MODEL = Path(__file__).resolve().parents[2] / "models" / "bottle-otproto" / "1"


def test_report_has_the_artifacts_figures_and_a_timing(tmp_path: Path) -> None:
    out = tmp_path / "cmp.md"
    ot_compare.main([str(MODEL), "--runs", "1", "--out", str(out)])
    text = out.read_text()
    row = next(line for line in text.splitlines() if line.startswith("| ot_prototypes | bottle"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    # image AUROC, balanced accuracy, pixel AUROC, PRO from the metadata.
    assert cells[2:6] == ["1.000", "1.000", "0.983", "0.925"]
    # The calibrated rule on the test split, as the line sees it: this version
    # predates the conformal calibration, so it promised nothing.
    assert cells[7:11] == ["6/20 (30.0%)", "63/63 (100.0%)", "none (per-error quantiles)", "png"]
    assert float(cells[11]) > 0  # ms per image
    assert 25 < float(cells[12]) < 35  # model.onnx MB
    assert "0.973" in text and "0.976" in text  # the paper's figures are there
