"""A real Prometheus server scrapes the real inspection server, and the
scraped series are read back through Prometheus' HTTP API."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers.deploy import free_port
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import run_server
from tests.helpers.synthetic import encode_png, good_image


def test_prometheus_scrapes_the_server(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus not installed (scripts/install-system-deps.sh installs it)")
    write_toy_artifact(tmp_path / "models", name="toy", version=1, eps0=3.0, tiles=(3.0,) * 9)
    with run_server(tmp_path / "models" / "toy", tmp_path) as server:
        import numpy as np

        png = encode_png(good_image(np.random.default_rng(0)))
        for _ in range(3):
            r = httpx.post(
                f"{server.base}/v1/inspect", content=png, headers={"content-type": "image/png"}
            )
            assert r.status_code == 200
        target = server.base.removeprefix("http://")
        config = tmp_path / "prometheus.yml"
        config.write_text(
            "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
            "scrape_configs:\n"
            f"  - job_name: inspection\n    static_configs: [{{targets: ['{target}']}}]\n"
        )
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            api = f"http://127.0.0.1:{port}/api/v1"
            value = None
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and value is None:
                time.sleep(1)
                try:
                    res = httpx.get(
                        f"{api}/query",
                        params={"query": 'sum(inspection_verdicts_total{model="toy"})'},
                    ).json()
                except httpx.HTTPError:
                    continue
                if res.get("status") == "success" and res["data"]["result"]:
                    value = float(res["data"]["result"][0]["value"][1])
            assert value == 3.0, (tmp_path / "prometheus.log").read_text()[-2000:]
            targets = httpx.get(f"{api}/targets").json()["data"]["activeTargets"]
            assert [t["health"] for t in targets] == ["up"]
            info = httpx.get(f"{api}/query", params={"query": "inspection_model_info"}).json()
            labels = info["data"]["result"][0]["metric"]
            assert labels["model"] == "toy" and labels["provider"] == "CPUExecutionProvider"
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()
