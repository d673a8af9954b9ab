"""The OT settings sweep (model_export/ot_candidates.py): the rule chooses on
validation alone, and a sweep on a real (synthetic-image) category writes
what the report reads."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from model_export.ot_candidates import TIE, choose, report, sweep
from model_export.ot_prototypes import MemberConfig
from tests.helpers.synthetic import write_category


def _row(label: str, validation: float, test: float, fit_s: float) -> dict[str, Any]:
    return {"label": label, "validation_auroc": validation, "test_auroc": test, "fit_s": fit_s}


def _result(name: str, *rows: dict[str, Any]) -> dict[str, Any]:
    return {"data": f"/data/{name}", "images": {}, "candidates": list(rows)}


def test_the_rule_takes_the_best_mean_validation_and_ignores_test() -> None:
    a = _result("a", _row("x", 0.90, 0.50, 10), _row("y", 0.80, 0.99, 1))
    b = _result("b", _row("x", 0.80, 0.50, 10), _row("y", 0.70, 0.99, 1))
    assert choose([a, b]) == "x"


def test_a_tie_within_the_margin_goes_to_the_shorter_fit() -> None:
    near = 0.90 - TIE / 2
    a = _result("a", _row("slow", 0.90, 0.9, 100), _row("fast", near, 0.8, 5))
    assert choose([a]) == "fast"
    far = 0.90 - 2 * TIE
    b = _result("a", _row("slow", 0.90, 0.9, 100), _row("fast", far, 0.8, 5))
    assert choose([b]) == "slow"


def test_a_candidate_missing_from_one_dataset_is_not_chosen() -> None:
    a = _result("a", _row("x", 0.70, 0.7, 1), _row("only-a", 0.99, 0.9, 1))
    b = _result("b", _row("x", 0.70, 0.7, 1))
    assert choose([a, b]) == "x"


def test_report_names_the_choice_and_the_rank_correlation() -> None:
    a = _result("tiles", _row("x", 0.9, 0.8, 1), _row("y", 0.8, 0.7, 1), _row("z", 0.7, 0.9, 1))
    text = report([a])
    assert "Chosen: x." in text
    assert "| x (chosen) | 0.900 | 0.800 | 1 |" in text
    # Validation ranks x > y > z, test z > x > y: rank differences 1, 1, -2,
    # rho = 1 - 6 * 6 / (3 * (9 - 1)) = -0.5.
    assert "rank correlation, validation against test, 3 candidates: -0.50" in text


@pytest.mark.slow
def test_a_sweep_fits_every_candidate_on_the_split_and_scores_both_splits(tmp_path: Path) -> None:
    category = write_category(tmp_path, n_train=10, n_test_good=3, n_test_defective=3)
    candidates = [
        ("one", {"members": (MemberConfig("s32", 0.0, 1),), "images_per_batch": 4}),
        ("two", {"members": (MemberConfig("s32", 0.0, 2),), "images_per_batch": 8}),
    ]
    result = sweep(category, candidates)
    assert result["images"] == {"fit": 8, "hold": 2, "synthetic": 4, "test": 6}
    assert [r["label"] for r in result["candidates"]] == ["one", "two"]
    for row in result["candidates"]:
        assert 0.0 <= row["validation_auroc"] <= 1.0 and 0.0 <= row["test_auroc"] <= 1.0
        assert row["config"]["members"][0]["scale"] == "s32"
        # The recorded sweep's encoder, whatever the family's default is now.
        assert row["config"]["backbone"] == result["backbone"] == "efficientnet_lite0"
    assert choose([result]) in {"one", "two"}
