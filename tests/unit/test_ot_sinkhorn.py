"""Log-domain Sinkhorn: marginals, agreement with POT, and refusal of bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from model_export.sinkhorn import log_sinkhorn


@pytest.mark.parametrize(("n", "m", "eps"), [(30, 50, 0.05), (64, 16, 0.01), (7, 7, 0.5)])
def test_plan_has_uniform_marginals(n: int, m: int, eps: float) -> None:
    cost = torch.rand(n, m, generator=torch.Generator().manual_seed(n + m))
    res = log_sinkhorn(cost, epsilon=eps, iterations=500)
    assert torch.allclose(res.plan.sum(1), torch.full((n,), 1.0 / n), atol=1e-3 / n)
    # The column marginal is projected exactly at the end of every iteration.
    assert torch.allclose(res.plan.sum(0), torch.full((m,), 1.0 / m), atol=1e-5 / m)
    assert res.marginal_error < 1e-3
    assert (res.plan >= 0).all()


def test_small_epsilon_does_not_underflow() -> None:
    # exp(-C / eps) underflows to 0 in float32 for C / eps > ~88; the log
    # domain must still return a proper plan.
    cost = torch.rand(20, 20, generator=torch.Generator().manual_seed(1)) * 10
    plan = log_sinkhorn(cost, epsilon=0.01, iterations=300).plan
    assert torch.isfinite(plan).all()
    assert abs(float(plan.sum()) - 1.0) < 1e-3


def test_small_epsilon_approaches_the_assignment() -> None:
    # A square problem with one clearly cheapest permutation: the plan must
    # concentrate on it as epsilon shrinks.
    perm = torch.tensor([3, 0, 4, 1, 2])
    cost = torch.ones(5, 5)
    cost[torch.arange(5), perm] = 0.0
    plan = log_sinkhorn(cost, epsilon=0.02, iterations=200).plan
    assert torch.equal(plan.argmax(1), perm)
    assert float(plan[torch.arange(5), perm].sum()) > 0.99


@pytest.mark.filterwarnings("ignore:Sinkhorn did not converge")
def test_agrees_with_pot() -> None:
    ot = pytest.importorskip("ot")
    cost = torch.rand(40, 25, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    ours = log_sinkhorn(cost, epsilon=0.1, iterations=300).plan.numpy()
    ref = ot.sinkhorn(
        np.full(40, 1 / 40),
        np.full(25, 1 / 25),
        cost.numpy(),
        0.1,
        method="sinkhorn_log",
        numItermax=300,
        stopThr=0.0,
    )
    np.testing.assert_allclose(ours, ref, atol=1e-9)


def test_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="2-D"):
        log_sinkhorn(torch.rand(3))
    with pytest.raises(ValueError, match="epsilon"):
        log_sinkhorn(torch.rand(3, 3), epsilon=0.0)
    with pytest.raises(ValueError, match="iterations"):
        log_sinkhorn(torch.rand(3, 3), iterations=0)
