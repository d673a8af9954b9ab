"""Which batch shapes the server runs, and on which session.

On a GPU, onnxruntime's CUDA provider pays 0.5-1.2 s whenever a session's
input shape changes, even back to a shape it has run before: a batcher that
runs whatever number of images it collected pays that on nearly every batch.
So on a GPU provider the server runs a fixed set of batch sizes (1, 2, 4, 8
by default), each on a session of its own that only ever sees that one
shape, pads a batch up to the next size, and warms every size up before
``/readyz`` says ready (as Triton's model warm-up does): no request pays a
first run or a shape change. Each such session has its batch dimension
pinned, so onnxruntime folds the graph's shape computations away (see
:func:`service.artifact.open_session`).

On the CPU a shape change costs nothing and padding would cost compute: with
batching on (sizes 1 to the limit) one session runs every size, unpadded.
With the CPU default of one image a run, that one size gets its own pinned
session too (a few per cent faster than the dynamic one, bench.model_latency).
The artifact's own dynamic session stays for recalibration, which scores
the line's images in batches of any size.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass

# Providers that run a batch in about the time of one image.
GPU_PROVIDERS = frozenset({"CUDAExecutionProvider", "TensorrtExecutionProvider"})
DEFAULT_GPU_BATCH = 8


@dataclass(frozen=True)
class ShapePlan:
    sizes: tuple[int, ...]  # the batch sizes run, ascending
    session_per_size: bool  # one session per size (each sees one shape only)

    def __post_init__(self) -> None:
        if not self.sizes or list(self.sizes) != sorted(set(self.sizes)) or self.sizes[0] < 1:
            raise ValueError(f"batch sizes must be distinct, ascending and >= 1: {self.sizes}")

    @property
    def largest(self) -> int:
        return self.sizes[-1]

    def size_for(self, n: int) -> int:
        """The batch size n images run at: the smallest planned size that holds them."""
        if not 1 <= n <= self.largest:
            raise ValueError(f"{n} images do not fit batch sizes {self.sizes}")
        return self.sizes[bisect.bisect_left(self.sizes, n)]


def powers_of_two_to(limit: int) -> tuple[int, ...]:
    """1, 2, 4, ... up to ``limit``, and ``limit`` itself."""
    sizes = [1]
    while sizes[-1] * 2 < limit:
        sizes.append(sizes[-1] * 2)
    return tuple(sorted({*sizes, limit}))


def shape_plan(
    provider: str,
    max_batch_size: int | None,
    batch_sizes: Sequence[int] = (),
    session_per_size: bool | None = None,
) -> ShapePlan:
    """The plan for the provider in use, unless the settings fix it.

    ``max_batch_size`` unset: 8 on a GPU provider, 1 on the CPU, where a batch
    takes as long as its images one by one (docs/performance.md).
    ``batch_sizes`` given: exactly those (the largest is then the limit).
    ``session_per_size`` unset: on a GPU provider, or where one size is run.
    """
    gpu = provider in GPU_PROVIDERS
    if batch_sizes:
        sizes = tuple(sorted(set(batch_sizes)))
    else:
        limit = max_batch_size or (DEFAULT_GPU_BATCH if gpu else 1)
        pad = gpu or bool(session_per_size)
        sizes = powers_of_two_to(limit) if pad else tuple(range(1, limit + 1))
    if session_per_size is None:
        session_per_size = gpu or len(sizes) == 1
    return ShapePlan(sizes, session_per_size)
