"""On a GPU every new input shape costs a session up to a second, so the
batcher runs a fixed set of batch sizes, each on a session of its own, all
warmed up before the model is in service (service/batch_shapes.py).

No GPU here: the plan a GPU gets (one session per size) is forced on the CPU
provider, and every run of every real onnxruntime session is recorded.
"""

from __future__ import annotations

import asyncio
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import service.runtime as runtime_module
from service.batcher import Batcher
from service.contract import INPUT_NAME
from service.metrics import Metrics
from service.runtime import WARM_UP_RUNS, ModelRuntime
from service.settings import Settings
from tests.helpers.onnx_models import write_toy_artifact


class Recorded:
    """A real onnxruntime session whose every run is written down."""

    def __init__(self, session: Any, log: list[tuple[int, tuple[int, ...], str]], phase: list[str]):
        self._session, self._log, self._phase = session, log, phase

    def run(self, names: Any, feeds: dict[str, np.ndarray]) -> Any:
        self._log.append((id(self), feeds[INPUT_NAME].shape, self._phase[0]))
        return self._session.run(names, feeds)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> tuple[list[Any], list[str]]:
    runs: list[tuple[int, tuple[int, ...], str]] = []
    phase = ["warm-up"]
    real_open, real_load = runtime_module.open_session, runtime_module.load_artifact

    def open_session(*a: Any, **kw: Any) -> Any:
        return Recorded(real_open(*a, **kw), runs, phase)

    def load_artifact(*a: Any, **kw: Any) -> Any:
        art = real_load(*a, **kw)
        object.__setattr__(art, "session", Recorded(art.session, runs, phase))
        return art

    monkeypatch.setattr(runtime_module, "open_session", open_session)
    monkeypatch.setattr(runtime_module, "load_artifact", load_artifact)
    return runs, phase  # type: ignore[return-value]


def test_every_session_sees_one_warmed_shape(
    tmp_path: Path, recorded: tuple[list[Any], list[str]]
) -> None:
    runs, phase = recorded
    model_dir = write_toy_artifact(tmp_path / "models").parent
    settings = Settings(model_dir=model_dir, batch_sizes=(1, 2, 4), session_per_size=True)
    metrics = Metrics()
    runtime = ModelRuntime(settings, metrics)
    runtime.load()
    served = runtime.served
    assert served.plan.sizes == (1, 2, 4) and served.plan.session_per_size
    assert len({id(s) for s in served.sessions.values()}) == 3  # a session per size
    # each pinned to its size: onnxruntime itself refuses any other shape
    assert [served.session_for(n).get_inputs()[0].shape[0] for n in (1, 2, 4)] == [1, 2, 4]
    warm = [r for r in runs if r[2] == "warm-up"]
    assert (
        sorted(s[1][0] for s in warm)
        == [1] * WARM_UP_RUNS + [2] * WARM_UP_RUNS + [4] * WARM_UP_RUNS
    )
    phase[0] = "serving"

    rng = np.random.default_rng(0)
    images = rng.normal(size=(24, 3, 300, 300)).astype(np.float32)
    single = {
        i: served.session_for(1).run(None, {INPUT_NAME: images[i : i + 1]}) for i in range(24)
    }

    async def drive() -> list[Any]:
        batcher = Batcher(runtime, metrics, max_queue_delay_s=0.05, max_queue=64)
        batcher.start()
        results: list[Any] = []
        order = random.Random(0)
        start = 0
        while start < len(images):  # groups of 1..7 images arrive together
            n = min(order.randint(1, 7), len(images) - start)
            with batcher.expecting():
                futures = [batcher.enqueue(images[i]) for i in range(start, start + n)]
            results += await asyncio.gather(*futures)
            start += n
        await batcher.stop()
        return results

    results = asyncio.run(drive())
    serving = [r for r in runs if r[2] == "serving"][24:]  # after the reference runs
    assert serving, "the batcher ran nothing"
    by_session: dict[int, set[tuple[int, ...]]] = {}
    for sid, shape, _ in runs:
        by_session.setdefault(sid, set()).add(shape)
    assert all(len(shapes) == 1 for shapes in by_session.values()), by_session
    assert {shape[0] for _, shape, _ in serving} <= {1, 2, 4}
    assert max(r.batch_size for r in results) > 2  # padded batches really ran (3 -> 4, ...)
    for i, r in enumerate(results):  # padding changes no image's result
        assert r.image_error == pytest.approx(float(single[i][0][0]), rel=1e-5)
        np.testing.assert_allclose(r.tile_errors, single[i][1][0], rtol=1e-5)
    padded = metrics.padded_images.labels("toy", "1")._value.get()
    assert padded > 0


def test_the_cpu_plan_shares_one_session_unpadded(
    tmp_path: Path, recorded: tuple[list[Any], list[str]]
) -> None:
    runs, _ = recorded
    model_dir = write_toy_artifact(tmp_path / "models").parent
    runtime = ModelRuntime(Settings(model_dir=model_dir, max_batch_size=4), Metrics())
    runtime.load()
    served = runtime.served
    assert served.plan.sizes == (1, 2, 3, 4) and not served.plan.session_per_size
    assert len({id(s) for s in served.sessions.values()}) == 1
    assert sorted(shape[0] for _, shape, _ in runs) == [1, 2, 3, 4]  # one warm-up run each
