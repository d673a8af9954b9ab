"""inspection_execution_provider_fallback: the execution provider the model
really runs on against the first one INSPECTION_PROVIDERS asks for.

onnxruntime skips a provider it cannot start (a CUDA library or the driver
missing) with a warning and runs on the CPU; the metric, and the alert
InspectionProviderFallback that reads it, make that visible.
"""

from __future__ import annotations

from pathlib import Path

import onnxruntime as ort
import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.app import create_app
from service.metrics import Metrics
from service.settings import Settings
from tests.helpers.onnx_models import write_toy_artifact

ADMIN = "admin-key-for-tests"
CUDA, CPU = "CUDAExecutionProvider", "CPUExecutionProvider"
NAME = "inspection_execution_provider_fallback"


def fallback_series(text: str) -> dict[tuple[tuple[str, str], ...], float]:
    return {
        tuple(sorted(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == NAME
    }


def labels(version: str, requested: str, provider: str) -> tuple[tuple[str, str], ...]:
    return tuple(
        sorted(
            {
                "model": "toy",
                "version": version,
                "requested": requested,
                "provider": provider,
            }.items()
        )
    )


def exposition(m: Metrics) -> str:
    return generate_latest(m.registry).decode()


def test_metric_says_fallback_only_when_the_first_provider_asked_for_is_not_used() -> None:
    m = Metrics()
    m.provider_in_use("toy", "1", (CUDA, CPU), CPU)
    assert fallback_series(exposition(m)) == {labels("1", CUDA, CPU): 1.0}
    # a new version replaces the series: one per process, for the version in service
    m.provider_in_use("toy", "2", (CUDA, CPU), CUDA)
    assert fallback_series(exposition(m)) == {labels("2", CUDA, CUDA): 0.0}
    m.provider_in_use("toy", "3", (CPU,), CPU)
    assert fallback_series(exposition(m)) == {labels("3", CPU, CPU): 0.0}


def serve(model_dir: Path, providers: tuple[str, ...]) -> TestClient:
    settings = Settings(model_dir=model_dir, providers=providers, admin_key=ADMIN)
    return TestClient(create_app(settings))


def test_cpu_asked_for_and_used_is_no_fallback(tmp_path: Path) -> None:
    write_toy_artifact(tmp_path, name="toy", version=1)
    with serve(tmp_path / "toy", (CPU,)) as client:
        series = fallback_series(client.get("/metrics").text)
    assert series == {labels("1", CPU, CPU): 0.0}


def test_cuda_asked_for_but_the_session_runs_on_the_cpu_is_a_fallback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The GPU image's case: onnxruntime lists CUDA, the session cannot start
    # it and silently runs on the CPU. On a CPU-only onnxruntime, claiming
    # CUDA is available makes onnxruntime do just that (it warns and skips it).
    if CUDA not in ort.get_available_providers():
        monkeypatch.setattr(ort, "get_available_providers", lambda: [CUDA, CPU])
    root = tmp_path
    write_toy_artifact(root, name="toy", version=1)
    with serve(root / "toy", (CUDA, CPU)) as client:
        text = client.get("/metrics").text
        info = [
            s.labels["provider"]
            for f in text_string_to_metric_families(text)
            for s in f.samples
            if s.name == "inspection_model_info"
        ]
        (used,) = info
        assert fallback_series(text) == {labels("1", CUDA, used): float(used != CUDA)}
        if used == CUDA:
            pytest.skip("this machine runs the model on CUDA: no fallback to see")
        # after a reload the series follows the version in service
        write_toy_artifact(root, name="toy", version=2)
        r = client.post("/v1/models/reload", headers={"x-api-key": ADMIN})
        assert r.status_code == 200, r.text
        assert fallback_series(client.get("/metrics").text) == {labels("2", CUDA, CPU): 1.0}
