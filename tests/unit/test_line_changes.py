"""The line's small changes and the half-split count of what a threshold rejects."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from model_export.line_changes import LINE_CHANGES, changed_inputs, half_split_rejects
from service.contract import InputSpec
from service.preprocessing import normalise, prepare
from tests.helpers.synthetic import good_image


def test_each_half_is_judged_by_the_other_halfs_threshold() -> None:
    held = np.arange(10.0)  # even positions 0, 2, .., 8; odd 1, 3, .., 9
    # Five images per half and a 1% target: each threshold is its half's maximum,
    # 8 for the even half (the odd 9 is over it), 9 for the odd half (no even image is).
    counts = half_split_rejects(held, {"same": held, "raised": held + 100, "lowered": held - 1})
    assert counts == {"unchanged": 1, "same": 1, "raised": 10, "lowered": 0}
    # A looser target lowers each threshold to the 4th of 5 (ceil(6 * 0.66) = 4):
    # 6 and 7; the odd 7 and 9 and the even 8 are over them.
    assert half_split_rejects(held, {}, target_fpr=0.34)["unchanged"] == 3
    with pytest.raises(ValueError, match="at least two"):
        half_split_rejects(np.ones(1), {})


def test_the_changes_keep_the_image_and_change_it_a_little() -> None:
    rgb = good_image(np.random.default_rng(0))
    for name, change in LINE_CHANGES.items():
        out = change(rgb)
        assert out.shape == rgb.shape and out.dtype == np.uint8, name
        diff = np.abs(out.astype(int) - rgb.astype(int))
        assert 0 < diff.mean() < 16, name  # changed, not another image
    shifted = LINE_CHANGES["shifted_3px"](rgb)
    np.testing.assert_array_equal(shifted[3:, 3:], rgb[:-3, :-3])
    darker = LINE_CHANGES["darker_5pct"](rgb)
    assert darker.mean() == pytest.approx(0.95 * rgb.mean(), rel=0.01)


def test_changed_inputs_are_prepared_as_the_model_reads_them(tmp_path: Path) -> None:
    rgb = good_image(np.random.default_rng(1))
    path = tmp_path / "good.png"
    cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    spec = InputSpec()
    change = LINE_CHANGES["blurred_sigma1"]
    (x,) = changed_inputs([path], spec, change).numpy()
    want = normalise(change(prepare(path.read_bytes(), spec).rgb).astype(np.float32) / 255, spec)
    np.testing.assert_array_equal(x, want)
