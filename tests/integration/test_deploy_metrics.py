"""The dashboard, the alerts and the HPA read only metrics the server really
exposes: compared with the /metrics of a live server (uvicorn on 127.0.0.1),
started the way the container starts it (``python -m service``)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.deploy import (
    DASHBOARD,
    REPO,
    dashboard_metric_names,
    dashboard_queries,
    free_port,
    label_names,
    metric_names,
    wait_ready,
)

DEFAULT_MODEL = REPO / "models" / "bottle-pwae"


def exposed_names(exposition: str) -> set[str]:
    """Every name a PromQL query can read: families (from # TYPE, present even
    for labelled metrics with no series yet) and their sample names."""
    names: set[str] = set()
    types: dict[str, str] = {}
    for line in exposition.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            types[name] = kind
        elif line and not line.startswith("#"):
            names.add(line.split("{", 1)[0].split(" ", 1)[0])
    for name, kind in types.items():
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif kind == "summary":
            names |= {f"{name}_sum", f"{name}_count"}
        elif kind == "counter" and not name.endswith("_total"):
            names.add(f"{name}_total")
    return names


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("service.__main__", reason="the server (python -m service) is not there")
    if any(DEFAULT_MODEL.glob("*/metadata.json")):
        model_dir = DEFAULT_MODEL
    else:
        # Metric names do not depend on the model: a contract-valid toy will do.
        from tests.helpers.onnx_models import write_toy_artifact

        root = tmp_path_factory.mktemp("models")
        write_toy_artifact(root, name="toy", version=1)
        model_dir = root / "toy"
    port = free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTION_")}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port),
             "--model-dir", str(model_dir)],
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=120, log=log)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def exposition(server: str) -> str:
    """/metrics after one good inspection and one rejected input, the paths
    that create the labelled series."""
    import cv2
    import numpy as np

    img = np.full((300, 300, 3), 128, np.uint8)
    ok, png = cv2.imencode(".png", img)
    assert ok
    answer = httpx.post(
        f"{server}/v1/inspect",
        content=png.tobytes(),
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert answer.status_code == 200, answer.text
    bad = httpx.post(
        f"{server}/v1/inspect",
        content=b"not an image",
        headers={"Content-Type": "image/png"},
        timeout=60,
    )
    assert 400 <= bad.status_code < 500, bad.text
    metrics = httpx.get(f"{server}/metrics", timeout=30)
    assert metrics.status_code == 200
    return metrics.text


def test_dashboard_alerts_and_hpa_use_only_exposed_metrics(exposition: str) -> None:
    exposed = exposed_names(exposition)
    assert any(n.startswith("inspection_") for n in exposed), "no inspection_ metrics at all"
    used = dashboard_metric_names()
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert not missing, (
        "read by the deployment but not exposed by the server: "
        f"{missing}; exposed: {sorted(n for n in exposed if n.startswith('inspection_'))}"
    )


def test_dashboard_and_alerts_use_only_exposed_labels(exposition: str) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    labels: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(exposition):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
    queries = dashboard_queries()
    dash = json.loads(DASHBOARD.read_text())
    for var in dash["templating"]["list"]:
        m = re.match(r"label_values\((\w+)[^,]*,\s*(\w+)\)", var["definition"])
        assert m, var["definition"]
        queries.append((f"variable ${var['name']}", f'{m.group(1)}{{{m.group(2)}!=""}}'))
    checked, wrong = 0, {}
    for where, expr in queries:
        series = [labels[m] for m in metric_names(expr) if m in labels]
        if not series:  # no series yet (e.g. no reload happened): nothing to compare
            continue
        checked += 1
        have = set().union(*series)
        unknown = label_names(expr) - have
        if unknown:
            wrong[where] = (sorted(unknown), sorted(have))
    assert not wrong, f"labels the server does not put on these metrics: {wrong}"
    assert checked >= len(queries) // 2, f"only {checked} of {len(queries)} queries had series"
