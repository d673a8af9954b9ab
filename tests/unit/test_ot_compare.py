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
    assert float(cells[8]) > 0  # ms per image
    assert 25 < float(cells[9]) < 35  # model.onnx MB
    assert "0.973" in text and "0.976" in text  # the paper's figures are there
