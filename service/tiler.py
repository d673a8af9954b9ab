"""The tile grid: the one place that cuts an image into tiles and back.

Indexing, used everywhere in the project: index 0 is the whole image; tiles
1..rows*cols run row-major, so on the default 3x3 grid tile 1 is top-left,
tile 3 top-right, tile 7 bottom-left and tile 9 bottom-right. Functions here
return tiles in that order (position i holds tile i + 1).

Everything works on NumPy arrays and on torch tensors alike (only ``reshape``
and an axis permutation are used), so the trainer builds the per-tile errors
into the ONNX graph with the very code the server's tests check, and this
module never imports torch.
"""

from __future__ import annotations

from typing import Any, TypeVar

A = TypeVar("A")  # numpy.ndarray or torch.Tensor


def _permute(x: Any, axes: tuple[int, ...]) -> Any:
    # torch.Tensor.permute and numpy.transpose take the same axes.
    return x.permute(*axes) if hasattr(x, "permute") else x.transpose(axes)


def _check(height: int, width: int, rows: int, cols: int) -> tuple[int, int]:
    if rows < 1 or cols < 1:
        raise ValueError(f"grid must be at least 1x1, got {rows}x{cols}")
    if height % rows or width % cols:
        raise ValueError(f"{height}x{width} does not divide into a {rows}x{cols} grid")
    return height // rows, width // cols


def to_tiles(x: A, rows: int = 3, cols: int = 3) -> A:
    """(..., H, W) -> (..., rows*cols, H/rows, W/cols), tiles row-major."""
    x_: Any = x
    *lead, h, w = x_.shape
    th, tw = _check(h, w, rows, cols)
    n = len(lead)
    t = x_.reshape(*lead, rows, th, cols, tw)
    # (..., r, th, c, tw) -> (..., r, c, th, tw)
    t = _permute(t, (*range(n), n, n + 2, n + 1, n + 3))
    return t.reshape(*lead, rows * cols, th, tw)


def from_tiles(t: A, rows: int = 3, cols: int = 3) -> A:
    """Inverse of :func:`to_tiles`: (..., rows*cols, th, tw) -> (..., H, W)."""
    t_: Any = t
    *lead, k, th, tw = t_.shape
    if k != rows * cols:
        raise ValueError(f"{k} tiles for a {rows}x{cols} grid")
    n = len(lead)
    x = t_.reshape(*lead, rows, cols, th, tw)
    x = _permute(x, (*range(n), n, n + 2, n + 1, n + 3))
    return x.reshape(*lead, rows * th, cols * tw)


def tile_means(x: A, rows: int = 3, cols: int = 3) -> A:
    """Mean of each tile: (..., H, W) -> (..., rows*cols).

    Applied to a squared-error map this is each tile's mean squared error.
    """
    t: Any = to_tiles(x, rows, cols)
    return t.reshape(*t.shape[:-2], -1).mean(-1)


def tile_maxima(x: A, rows: int = 3, cols: int = 3) -> A:
    """Maximum of each tile: (..., H, W) -> (..., rows*cols)."""
    t: Any = to_tiles(x, rows, cols)
    flat = t.reshape(*t.shape[:-2], -1)
    m = flat.max(-1)
    # torch's max(dim) returns (values, indices); numpy's returns the values.
    return m.values if hasattr(m, "values") else m


def tile_boxes(
    height: int, width: int, rows: int = 3, cols: int = 3
) -> list[tuple[int, int, int, int]]:
    """Pixel boxes (y0, x0, y1, x1), end-exclusive, of tiles 1..rows*cols in order."""
    th, tw = _check(height, width, rows, cols)
    return [(r * th, c * tw, (r + 1) * th, (c + 1) * tw) for r in range(rows) for c in range(cols)]
