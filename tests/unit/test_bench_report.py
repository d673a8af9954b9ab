"""docs/performance.md's GPU section renders from the GPU machine's results
(scripts/gpu-bench.sh writes them under these names). No GPU here: the CPU's
own results stand in as inputs to the renderer, never as figures."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import bench.report as report
from bench.common import RESULTS

AS_GPU = {
    "model_latency": "gpu_model_latency",
    "http_load": "gpu_http_load_pwae",
    "soak": "gpu_soak",
    "train_speed": "gpu_train_speed",
}


def test_gpu_section_renders_from_gpu_results(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    for cpu_name, gpu_name in AS_GPU.items():
        payload = json.loads((results / f"{cpu_name}.json").read_text())
        payload["machine"]["gpus"] = [{"name": "GPU X", "driver": "1.2", "memory": "80 GiB"}]
        if cpu_name == "soak":
            payload["fixed_rate"] = True
        (results / f"{gpu_name}.json").write_text(json.dumps(payload))
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "OUT", tmp_path / "performance.md")
    report.main()
    text = (tmp_path / "performance.md").read_text()
    gpu = text[text.index("## On the GPU") :]
    assert "No GPU was lent" not in text
    assert "GPU X (driver 1.2, 80 GiB)" in gpu
    assert "### Targets" in gpu and "HTTP throughput >= 0.8x the best raw batch" in gpu
    assert "p99 <= 20 ms at" in gpu
    assert "### P-WAE through HTTP on the GPU" in gpu
    assert "### Training, GPU against CPU" in gpu


def test_without_gpu_results_the_page_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    results = tmp_path / "results"
    shutil.copytree(RESULTS, results)
    for gpu_file in results.glob("gpu_*.json"):
        gpu_file.unlink()
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "OUT", tmp_path / "performance.md")
    report.main()
    assert "No GPU was lent to this work yet" in (tmp_path / "performance.md").read_text()
