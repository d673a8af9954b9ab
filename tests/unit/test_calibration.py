"""The conformal calibration keeps its promise on images it never saw."""

from __future__ import annotations

import numpy as np
import pytest

from service.calibration import (
    conformal_rank,
    conformal_thresholds,
    error_scales,
    fpr_quantile,
    images_for_target,
    promised_fpr,
    rejects_at_least,
    rule_flags,
    rule_score,
)


def _good_errors(rng: np.random.Generator, n: int) -> np.ndarray:
    """(n, 10) errors of good images: heavy-tailed, correlated across e0..e9,
    each column on its own scale, as reconstruction errors are."""
    common = rng.lognormal(0.0, 0.3, (n, 1))  # lighting moves every error together
    own = rng.lognormal(0.0, 0.5, (n, 10))
    return common * own * np.geomspace(0.5, 20.0, 10)


def _realised_fpr(n: int, target: float, draws: int, seed: int) -> tuple[np.ndarray, object]:
    """False-reject rate on 1,000 new good images, for ``draws`` calibration sets of n."""
    rng = np.random.default_rng(seed)
    scales = error_scales(_good_errors(rng, 500))  # from other images, as the fit set is
    rates = np.empty(draws)
    cal = None
    for d in range(draws):
        cal = conformal_thresholds(_good_errors(rng, n), scales, target)
        rates[d] = rule_flags(_good_errors(rng, 1000), cal.eps).mean()
    return rates, cal


@pytest.mark.parametrize(("n", "target"), [(42, 0.01), (152, 0.01), (400, 0.05)])
def test_new_good_images_are_rejected_no_more_than_promised(n: int, target: float) -> None:
    rates, cal = _realised_fpr(n, target, draws=300, seed=n)
    assert cal is not None
    promise = cal.promised_fpr  # type: ignore[attr-defined]
    # The expectation over calibration draws is the promise (exact for
    # continuous scores); 300 draws of 1,000 images pin the mean to ~0.1 points.
    assert rates.mean() <= promise + 0.002, (rates.mean(), promise)
    assert rates.mean() >= promise - 0.004  # and not far below: thresholds are not wasted
    # One draw misses the 90% bound in about a tenth of the draws.
    over = (rates > cal.fpr_upper_90).mean()  # type: ignore[attr-defined]
    assert over <= 0.15, over


def test_per_error_thresholds_at_the_held_out_maximum_reject_far_more() -> None:
    # The old rule's failure, reproduced: each of ten thresholds at the maximum
    # of 42 held-out errors lets a new good image exceed at least one with
    # probability up to 10/43; the single conformal score keeps it at 1/43.
    rng = np.random.default_rng(7)
    scales = error_scales(_good_errors(rng, 500))
    per_error, conformal = [], []
    for _ in range(200):
        held = _good_errors(rng, 42)
        new = _good_errors(rng, 1000)
        per_error.append(rule_flags(new, held.max(axis=0)).mean())
        conformal.append(rule_flags(new, conformal_thresholds(held, scales, 0.01).eps).mean())
    assert np.mean(conformal) <= 1 / 43 + 0.003
    assert np.mean(per_error) > 3 * np.mean(conformal)


def test_the_rule_on_eps_is_the_single_score_on_its_threshold() -> None:
    rng = np.random.default_rng(3)
    scales = error_scales(_good_errors(rng, 300))
    cal = conformal_thresholds(_good_errors(rng, 100), scales, 0.05)
    new = _good_errors(rng, 5000)
    single = (new / scales).max(axis=1) > cal.score_threshold
    assert (rule_flags(new, cal.eps) == single).all()
    assert cal.eps == pytest.approx(cal.score_threshold * scales)
    # The k-th calibration image is accepted, the (k+1)-th is not.
    assert cal.rank == conformal_rank(100, 0.05) == 96
    assert cal.achieved_fpr == pytest.approx(4 / 100)


def test_the_promise_and_the_images_it_needs() -> None:
    assert images_for_target(0.01) == 99  # 1/(99+1) = 1%
    assert images_for_target(0.05) == 19
    assert promised_fpr(42, 0.01) == pytest.approx(1 / 43)
    assert promised_fpr(99, 0.01) == pytest.approx(0.01)
    assert promised_fpr(152, 0.01) == pytest.approx(1 / 153)
    assert promised_fpr(1000, 0.01) <= 0.01
    # Beta(1, n): the 90% quantile has a closed form.
    assert fpr_quantile(42, 42) == pytest.approx(1 - 0.1 ** (1 / 42), rel=1e-9)
    # Larger a: checked against the binomial tail it is defined by.
    q = fpr_quantile(600, 595)
    assert 0.005 < q < 0.02


def test_a_target_too_small_for_the_images_is_said_with_what_would_do() -> None:
    rng = np.random.default_rng(0)
    scales = np.ones(10)
    small = conformal_thresholds(_good_errors(rng, 42), scales, 0.01)
    assert not small.supports_target
    warning = small.warning()
    assert warning is not None and "99 good images" in warning and "2.33%" in warning
    report = small.report()
    assert f"eps0={small.eps[0]:.4g}" in report
    assert "42 calibration images" in report and "2.33% expected, 5.33% with 90%" in report
    assert conformal_thresholds(_good_errors(rng, 152), scales, 0.01).warning() is None


@pytest.mark.parametrize(
    ("errors", "scales", "target", "match"),
    [
        (np.ones((5, 10)), np.ones(9), 0.01, "do not match"),
        (np.full((5, 10), np.nan), np.ones(10), 0.01, "NaN"),
        (np.ones((5, 10)), np.ones(10), 0.0, "target"),
        (np.ones((0, 10)), np.ones(10), 0.01, "at least one image"),
    ],
)
def test_calibration_refuses_what_it_cannot_use(
    errors: np.ndarray, scales: np.ndarray, target: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        conformal_thresholds(errors, scales, target)


def test_rule_score_is_above_one_exactly_where_the_rule_flags() -> None:
    eps = np.linspace(1.0, 2.0, 10)
    errors = np.tile(eps * 0.5, (3, 1))
    errors[1, 0] = 1.5  # e0 over eps0
    errors[2, 9] = 2.0  # tile 9 exactly at its threshold: not over it
    assert rule_score(errors, eps) == pytest.approx([0.5, 1.5, 1.0])
    assert rule_flags(errors, eps).tolist() == [False, True, False]
    assert bool(rule_flags(errors[1], eps)) and rule_score(errors[1], eps) == 1.5  # one image


@pytest.mark.parametrize("target", [5e-324, 1e-7, 0.0, 1.0])
def test_targets_outside_what_can_be_promised_are_refused(target: float) -> None:
    with pytest.raises(ValueError, match="must lie in"):
        images_for_target(target)


def test_the_chance_of_a_count_of_false_rejects_under_the_promise() -> None:
    # Threshold at the maximum of n: the x largest of all n+m scores must be
    # new ones, a count of orderings.
    for x, m, n in [(5, 190, 152), (3, 20, 42), (2, 20, 99)]:
        exact = float(np.prod([(m - i) / (n + m - i) for i in range(x)]))
        assert rejects_at_least(x, m, n, n) == pytest.approx(exact, rel=1e-9)
    assert rejects_at_least(0, 20, 42, 42) == pytest.approx(1.0)
    # Below the maximum (k < n): against simulated exchangeable scores.
    rng = np.random.default_rng(0)
    n, m, k, x, draws = 40, 30, 36, 6, 20_000
    cal = np.sort(rng.random((draws, n)), axis=1)[:, k - 1]
    counts = (rng.random((draws, m)) > cal[:, None]).sum(axis=1)
    simulated = float((counts >= x).mean())
    assert rejects_at_least(x, m, n, k) == pytest.approx(simulated, abs=0.01)
    assert 0.1 < simulated < 0.9  # a case where the tail is not trivially 0 or 1
    with pytest.raises(ValueError, match="need 0 <= x <= m"):
        rejects_at_least(3, 2, 10, 10)
