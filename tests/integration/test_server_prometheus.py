"""A real Prometheus server scrapes the real inspection server, and the
scraped series are read back through Prometheus' HTTP API."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.helpers.deploy import DASHBOARD, free_port, grafana_to_promql
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
            check_drift_panels(api, server.base, png)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            log.close()


def rule_score(answer: dict[str, Any]) -> float:
    """max(e0/eps0, ek/epsk) from an inspection answer."""
    return max([answer["image"]["score"], *(t["score"] for t in answer["tiles"])])


def query(api: str, expr: str) -> list[dict[str, Any]]:
    res = httpx.get(f"{api}/query", params={"query": expr}).json()
    assert res["status"] == "success", res
    result: list[dict[str, Any]] = res["data"]["result"]
    return result


def check_drift_panels(api: str, base: str, good_png: bytes) -> None:
    """The dashboard's drift panels, evaluated by Prometheus on the scraped series.

    Prometheus has scraped the three earlier images; three more good parts
    and one near the threshold now arrive, so the panels' hourly rates see
    exactly these four.
    """
    import numpy as np

    near_png = encode_png(np.full((300, 300, 3), 208, np.uint8))  # the toy scores it ~0.89
    answers = []
    for body in (good_png, good_png, good_png, near_png):
        r = httpx.post(f"{base}/v1/inspect", content=body, headers={"content-type": "image/png"})
        assert r.status_code == 200
        answers.append(r.json())
    assert {a["verdict"] for a in answers} == {"defect_free"}
    good, near = rule_score(answers[0]), rule_score(answers[3])
    assert good < 0.8 <= near < 1.0, (good, near)

    count = 'sum(inspection_good_score_count{model="toy"})'
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        res = query(api, count)
        if res and float(res[0]["value"][1]) == 7.0:  # the 3 earlier and these 4
            break
        time.sleep(1)
    else:
        pytest.fail(f"Prometheus never saw the 4 new good parts: {query(api, count)}")

    dash = json.loads(DASHBOARD.read_text())
    drift = [p for p in dash["panels"] if p["type"] != "row" and "drift" in p["title"].lower()]
    share = [p for p in dash["panels"] if "near the threshold" in p["title"].lower()]
    assert len(drift) == 1 and len(share) == 1
    values: dict[str, float] = {}
    for target in (*drift[0]["targets"], *share[0]["targets"]):
        result = query(api, grafana_to_promql(target["expr"]))
        assert len(result) == 1, (target["expr"], result)  # one model version: one line
        assert result[0]["metric"] == {"model": "toy", "version": "1"}
        values[target["refId"] if target in drift[0]["targets"] else "share"] = float(
            result[0]["value"][1]
        )
    # p50 in the good parts' bucket, p90 in the near one's (buckets 0.05 wide)
    assert abs(values["A"] - good) <= 0.05, values
    assert abs(values["B"] - near) <= 0.05, values
    assert values["C"] == 0.5 and values["D"] == 0.625  # the toy's reference, x1.25
    # 1 of the 4 good parts; rate() extrapolates a counter that starts at 0 (near)
    # less far back than one that does not (all good parts), hence the margin
    assert values["share"] == pytest.approx(0.25, abs=0.1)
