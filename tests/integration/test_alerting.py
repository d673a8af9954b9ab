"""An alert fired by a real Prometheus reaches a real receiver.

The chain of docker/compose.yaml, without containers: the real server
(``python -m service``) scraped by Prometheus, which evaluates the real
``InspectionNoServerUp`` and ``InspectionServerDown`` rules of
docker/prometheus/alerts.yml (their ``for:`` shortened) and sends to
Alertmanager, configured by docker/alertmanager/render.sh from
docker/alertmanager/alertmanager.yml with ALERT_WEBHOOK_URL pointing at a
webhook this test runs on 127.0.0.1 (its waits shortened). The server is
stopped; the webhook must receive the alert within ``for:`` + one evaluation
interval + the scrape that sees the server gone + Alertmanager's group wait,
and the per-replica alert must stay inhibited.

Binaries: Debian's prometheus and prometheus-alertmanager
(scripts/install-system-deps.sh); skipped, saying so, where either is absent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.helpers.deploy import DOCKER, free_port
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import run_server

SCRAPE_S = 1  # scrape and evaluation interval
FOR_S = 3  # the rules' `for:`, shortened from 1m
GROUP_WAIT_S = 1  # Alertmanager's, shortened from 10s
SLACK_S = 3  # process scheduling on a busy machine, HTTP round trips
# The server stops; the next scrape sees it gone, the next evaluation starts
# the alert pending, `for:` later an evaluation fires it, Alertmanager waits
# its group wait and posts.
DEADLINE_S = SCRAPE_S + SCRAPE_S + FOR_S + SCRAPE_S + GROUP_WAIT_S + SLACK_S
RULES = ("InspectionServerDown", "InspectionNoServerUp")


class Sink:
    """A webhook receiver: every POSTed JSON body, with when it arrived."""

    def __init__(self) -> None:
        self.received: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                with sink.lock:
                    sink.received.append((time.monotonic(), json.loads(body)))
                self.send_response(200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def firing(self, alertname: str) -> list[tuple[float, dict[str, Any]]]:
        """(arrival, alert) for each firing ``alertname`` notified so far."""
        with self.lock:
            return [
                (at, alert)
                for at, body in self.received
                for alert in body["alerts"]
                if alert["labels"]["alertname"] == alertname and alert["status"] == "firing"
            ]

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [body for _, body in self.received]


@contextlib.contextmanager
def sink() -> Iterator[Sink]:
    s = Sink()
    s.thread.start()
    try:
        yield s
    finally:
        s.http.shutdown()
        s.http.server_close()


@contextlib.contextmanager
def process(args: list[str], log: Path) -> Iterator[subprocess.Popen[bytes]]:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def wait_for(what: str, check: Any, timeout: float, log: Path) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            got = check()
        except httpx.HTTPError:
            got = None
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"{what} not within {timeout:.0f} s:\n{log.read_text(errors='replace')[-3000:]}")


def alertmanager_config(tmp_path: Path, webhook: str) -> Path:
    """The compose configuration, rendered by render.sh as the container does,
    with its waits shortened for the test."""
    am = DOCKER / "alertmanager"
    out = tmp_path / "alertmanager.yml"
    env = {k: v for k, v in os.environ.items() if not k.startswith("ALERT_")}
    result = subprocess.run(
        ["sh", str(am / "render.sh"), str(am / "alertmanager.yml"), str(out)],
        env={**env, "ALERT_WEBHOOK_URL": webhook},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    config = yaml.safe_load(out.read_text())
    assert config["receivers"][0]["webhook_configs"][0]["url"] == webhook
    routes = [config["route"], *config["route"].get("routes", [])]
    for route in routes:
        route.update(group_wait=f"{GROUP_WAIT_S}s", group_interval="1s")
    out.write_text(yaml.safe_dump(config))
    return out


def alert_rules(tmp_path: Path) -> Path:
    """The real rules, their `for:` shortened."""
    doc = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    rules = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") in RULES]
    assert {r["alert"] for r in rules} == set(RULES)
    for rule in rules:
        rule["for"] = f"{FOR_S}s"
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "inspection", "rules": rules}]}))
    return path


def test_an_alert_fired_by_prometheus_reaches_the_webhook(tmp_path: Path) -> None:
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    if prometheus is None or alertmanager is None:
        pytest.skip(
            "prometheus and prometheus-alertmanager not installed "
            "(scripts/install-system-deps.sh installs them)"
        )
    write_toy_artifact(tmp_path / "models", name="toy", version=1)
    am_port, prom_port = free_port(), free_port()
    am_log, prom_log = tmp_path / "alertmanager.log", tmp_path / "prometheus.log"
    with contextlib.ExitStack() as stack:
        webhook = stack.enter_context(sink())
        stack.enter_context(
            process(
                [
                    alertmanager,
                    f"--config.file={alertmanager_config(tmp_path, webhook.url)}",
                    f"--storage.path={tmp_path / 'am-data'}",
                    f"--web.listen-address=127.0.0.1:{am_port}",
                    "--cluster.listen-address=",
                ],
                am_log,
            )
        )
        am = f"http://127.0.0.1:{am_port}"
        wait_for("Alertmanager ready", lambda: httpx.get(f"{am}/-/ready").status_code == 200,
                 30, am_log)  # fmt: skip

        # Prometheus joins the outer stack: it outlives the server.
        with run_server(
            tmp_path / "models" / "toy", tmp_path, providers="CPUExecutionProvider"
        ) as server:
            config = {
                "global": {"scrape_interval": f"{SCRAPE_S}s",
                           "evaluation_interval": f"{SCRAPE_S}s"},
                "rule_files": [str(alert_rules(tmp_path))],
                "alerting": {"alertmanagers": [
                    {"static_configs": [{"targets": [f"127.0.0.1:{am_port}"]}]}]},
                "scrape_configs": [{
                    "job_name": "inspection-server",
                    "static_configs": [{"targets": [server.base.removeprefix("http://")]}],
                }],
            }  # fmt: skip
            (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
            stack.enter_context(
                process(
                    [
                        prometheus,
                        f"--config.file={tmp_path / 'prometheus.yml'}",
                        f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                        f"--web.listen-address=127.0.0.1:{prom_port}",
                    ],
                    prom_log,
                )
            )
            api = f"http://127.0.0.1:{prom_port}/api/v1"

            def server_up() -> bool:
                q = httpx.get(f"{api}/query", params={"query": 'up{job="inspection-server"}'})
                result = q.json()["data"]["result"]
                return bool(result) and result[0]["value"][1] == "1"

            wait_for("Prometheus scraping the server", server_up, 60, prom_log)
            # Up for longer than `for:`: nothing fires, nothing is sent.
            time.sleep(FOR_S + 2 * SCRAPE_S)
            alerts = httpx.get(f"{api}/alerts").json()["data"]["alerts"]
            assert alerts == [], alerts
            assert webhook.bodies() == []
        assert server.proc.poll() is not None
        stopped = time.monotonic()

        ((arrived, alert),) = wait_for(
            "InspectionNoServerUp at the webhook",
            lambda: webhook.firing("InspectionNoServerUp"),
            DEADLINE_S + 30,
            prom_log,
        )
        took = arrived - stopped
        assert took <= DEADLINE_S, (
            f"the alert took {took:.1f} s from the server stopping; for: {FOR_S} s, "
            f"evaluation and scrape every {SCRAPE_S} s, group wait {GROUP_WAIT_S} s"
        )
        assert alert["labels"]["severity"] == "critical"
        assert alert["annotations"]["runbook_url"] == "docs/runbooks.md#inspectionnoserverup"
        assert alert["annotations"]["summary"]
        (body,) = [b for b in webhook.bodies() if alert in b["alerts"]]
        assert body["receiver"] == "plant" and body["status"] == "firing"

        # InspectionServerDown fires in Prometheus too, but Alertmanager holds
        # it back while no server is up at all (alertmanager.yml's inhibit rule).
        def server_down_firing() -> bool:
            alerts = httpx.get(f"{api}/alerts").json()["data"]["alerts"]
            return any(
                a["labels"]["alertname"] == "InspectionServerDown" and a["state"] == "firing"
                for a in alerts
            )

        wait_for("InspectionServerDown firing in Prometheus", server_down_firing, 10, prom_log)
        time.sleep(GROUP_WAIT_S + 2)
        assert webhook.firing("InspectionServerDown") == []
        print(f"InspectionNoServerUp reached the webhook {took:.1f} s after the server stopped")
