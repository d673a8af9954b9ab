"""How many images the batcher puts in one onnxruntime run (service/batcher.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from service.batcher import DEFAULT_GPU_BATCH, Batcher
from service.metrics import Metrics


def _batcher(provider: str, setting: int | None) -> Batcher:
    # Only the provider of the model in service matters here; CUDA cannot
    # load on these machines, so the runtime is its one attribute.
    runtime: Any = SimpleNamespace(current=SimpleNamespace(provider=provider))
    return Batcher(runtime, Metrics(), setting, 0.002, 4)


@pytest.mark.parametrize(
    ("provider", "setting", "limit"),
    [
        ("CPUExecutionProvider", None, 1),
        ("CUDAExecutionProvider", None, DEFAULT_GPU_BATCH),
        ("TensorrtExecutionProvider", None, DEFAULT_GPU_BATCH),
        ("CPUExecutionProvider", 8, 8),
        ("CUDAExecutionProvider", 2, 2),
    ],
)
def test_batch_limit_follows_the_setting_else_the_provider(
    provider: str, setting: int | None, limit: int
) -> None:
    assert _batcher(provider, setting).batch_limit() == limit
