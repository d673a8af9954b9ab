"""Round trips and reductions of the tile grid, on NumPy (and torch when present)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from service.tiler import from_tiles, tile_boxes, tile_maxima, tile_means, to_tiles


@st.composite
def gridded(draw: st.DrawFn) -> tuple[np.ndarray, int, int]:
    rows = draw(st.integers(1, 4))
    cols = draw(st.integers(1, 4))
    th = draw(st.integers(1, 6))
    tw = draw(st.integers(1, 6))
    lead = draw(st.lists(st.integers(1, 3), max_size=2))
    x = draw(
        arrays(np.float32, (*lead, rows * th, cols * tw), elements=st.floats(-1e3, 1e3, width=32))
    )
    return x, rows, cols


@given(gridded())
def test_round_trip(case: tuple[np.ndarray, int, int]) -> None:
    x, rows, cols = case
    t = to_tiles(x, rows, cols)
    assert t.shape == (*x.shape[:-2], rows * cols, x.shape[-2] // rows, x.shape[-1] // cols)
    np.testing.assert_array_equal(from_tiles(t, rows, cols), x)


@given(gridded())
def test_reductions_match_boxes(case: tuple[np.ndarray, int, int]) -> None:
    x, rows, cols = case
    boxes = tile_boxes(x.shape[-2], x.shape[-1], rows, cols)
    means, maxima = tile_means(x, rows, cols), tile_maxima(x, rows, cols)
    for k, (y0, x0, y1, x1) in enumerate(boxes):
        np.testing.assert_allclose(
            means[..., k], x[..., y0:y1, x0:x1].mean(axis=(-2, -1)), rtol=1e-5, atol=1e-3
        )
        np.testing.assert_array_equal(maxima[..., k], x[..., y0:y1, x0:x1].max(axis=(-2, -1)))


def test_indexing_is_row_major_from_top_left() -> None:
    # A 300x300 image whose pixels carry their tile number 1..9.
    x = np.zeros((300, 300), np.float32)
    for k, (y0, x0, y1, x1) in enumerate(tile_boxes(300, 300), start=1):
        x[y0:y1, x0:x1] = k
    np.testing.assert_array_equal(tile_means(x), np.arange(1, 10, dtype=np.float32))
    assert tile_boxes(300, 300)[0] == (0, 0, 100, 100)  # tile 1: top-left
    assert tile_boxes(300, 300)[2] == (0, 200, 100, 300)  # tile 3: top-right
    assert tile_boxes(300, 300)[8] == (200, 200, 300, 300)  # tile 9: bottom-right


def test_squared_error_map_gives_tile_mse() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random((300, 300)), rng.random((300, 300))
    mse = tile_means((a - b) ** 2)
    np.testing.assert_allclose(mse[4], ((a[100:200, 100:200] - b[100:200, 100:200]) ** 2).mean())


def test_indivisible_size_is_refused() -> None:
    with pytest.raises(ValueError, match="does not divide"):
        to_tiles(np.zeros((301, 300)))
    with pytest.raises(ValueError, match="8 tiles for a 3x3 grid"):
        from_tiles(np.zeros((8, 10, 10)))


def test_torch_tensors_give_the_same_tiles() -> None:
    torch = pytest.importorskip("torch", reason="torch is only installed with the trainer extra")
    x = np.random.default_rng(1).random((2, 300, 300)).astype(np.float32)
    t = torch.from_numpy(x)
    np.testing.assert_array_equal(to_tiles(t).numpy(), to_tiles(x))
    np.testing.assert_allclose(tile_means(t).numpy(), tile_means(x), rtol=1e-6)
    np.testing.assert_array_equal(tile_maxima(t).numpy(), tile_maxima(x))
    np.testing.assert_array_equal(from_tiles(to_tiles(t)).numpy(), x)
