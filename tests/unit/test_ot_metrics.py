"""The shared quality metrics: PRO, balanced accuracy."""

from __future__ import annotations

import numpy as np

from model_export.evaluation import max_balanced_accuracy, pro_score


def _masks() -> np.ndarray:
    masks = np.zeros((4, 40, 40), bool)
    masks[1, 5:15, 5:15] = True  # a large region
    masks[2, 30:33, 30:33] = True  # a small one: PRO weighs it like the large one
    return masks


def test_pro_is_one_for_a_perfect_map_and_low_for_noise() -> None:
    masks = _masks()
    rng = np.random.default_rng(0)
    perfect = masks.astype(np.float32) + 0.01 * rng.random(masks.shape)
    assert pro_score(masks, perfect) > 0.99
    noise = rng.random(masks.shape).astype(np.float32)
    # A random map overlaps each region as much as it flags normal pixels:
    # PRO ~ mean FPR over [0, 0.3] = 0.15.
    assert 0.08 < pro_score(masks, noise) < 0.22


def test_pro_weighs_regions_not_pixels() -> None:
    masks = _masks()
    found_large_only = np.zeros(masks.shape, np.float32)
    found_large_only[1, 5:15, 5:15] = 1.0
    # Half the regions found at zero FPR, though they hold 100 of the 109
    # defect pixels; the flat background then flags everything at once, and
    # the curve from (0, 0.5) to (1, 1) is interpolated at FPR 0.3 (as
    # MVTec AD's code does): area 0.3 * (0.5 + 0.65) / 2, over 0.3 = 0.575.
    assert np.isclose(pro_score(masks, found_large_only), 0.575, atol=1e-6)


def test_max_balanced_accuracy() -> None:
    labels = np.array([0, 0, 0, 1, 1, 1])
    assert max_balanced_accuracy(labels, np.array([0.1, 0.2, 0.3, 0.7, 0.8, 0.9])) == 1.0
    # One defect scored below every normal image: best split catches 2 of 3.
    assert np.isclose(
        max_balanced_accuracy(labels, np.array([0.2, 0.3, 0.4, 0.1, 0.8, 0.9])), 5 / 6
    )
