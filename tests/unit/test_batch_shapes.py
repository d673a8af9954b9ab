"""Which batch sizes the server runs, on which sessions (service/batch_shapes.py)."""

from __future__ import annotations

import pytest

from service.batch_shapes import DEFAULT_GPU_BATCH, ShapePlan, powers_of_two_to, shape_plan

CPU, CUDA, TRT = "CPUExecutionProvider", "CUDAExecutionProvider", "TensorrtExecutionProvider"


@pytest.mark.parametrize(
    ("provider", "setting", "sizes", "per_size"),
    [
        (CPU, None, (1,), True),
        (CUDA, None, (1, 2, 4, DEFAULT_GPU_BATCH), True),
        (TRT, None, (1, 2, 4, DEFAULT_GPU_BATCH), True),
        (CPU, 8, (1, 2, 3, 4, 5, 6, 7, 8), False),
        (CPU, 1, (1,), True),
        (CUDA, 2, (1, 2), True),
        (CUDA, 12, (1, 2, 4, 8, 12), True),
    ],
)
def test_plan_follows_the_setting_else_the_provider(
    provider: str, setting: int | None, sizes: tuple[int, ...], per_size: bool
) -> None:
    plan = shape_plan(provider, setting)
    assert plan.sizes == sizes and plan.session_per_size is per_size
    assert plan.largest == sizes[-1]


def test_explicit_sizes_and_sessions_win() -> None:
    plan = shape_plan(CPU, None, (8, 1, 4), session_per_size=True)
    assert plan == ShapePlan((1, 4, 8), True)
    assert shape_plan(CUDA, 4, session_per_size=False).session_per_size is False


def test_a_batch_runs_at_the_smallest_size_that_holds_it() -> None:
    plan = ShapePlan((1, 2, 4, 8), True)
    assert [plan.size_for(n) for n in range(1, 9)] == [1, 2, 4, 4, 8, 8, 8, 8]
    with pytest.raises(ValueError, match="do not fit"):
        plan.size_for(9)
    with pytest.raises(ValueError, match="do not fit"):
        plan.size_for(0)


@pytest.mark.parametrize("sizes", [(), (0, 1), (2, 1), (1, 1)])
def test_a_plan_refuses_sizes_it_cannot_use(sizes: tuple[int, ...]) -> None:
    with pytest.raises(ValueError, match="batch sizes"):
        ShapePlan(sizes, True)


def test_powers_of_two_end_at_the_limit() -> None:
    assert powers_of_two_to(1) == (1,)
    assert powers_of_two_to(8) == (1, 2, 4, 8)
    assert powers_of_two_to(6) == (1, 2, 4, 6)
