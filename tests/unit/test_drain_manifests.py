"""The time Kubernetes and compose give the server after SIGTERM covers its
drain and graceful shutdown (service/server.py), with the settings those
files give it."""

from __future__ import annotations

import re

import yaml

from service.settings import Settings
from tests.helpers.deploy import DOCKER, K8S

MARGIN_S = 5  # the lifespan's shutdown: the batcher finishes its queue
TIMING = ("INSPECTION_DRAIN_S", "INSPECTION_GRACEFUL_SHUTDOWN_S")


def _needed(env: dict[str, str]) -> float:
    s = Settings(
        _env_file=None,  # type: ignore[call-arg]
        **{k.removeprefix("INSPECTION_").lower(): v for k, v in env.items()},
    )
    return s.drain_s + s.graceful_shutdown_s + MARGIN_S


def test_kubernetes_grace_period_covers_drain_and_shutdown() -> None:
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    pod = yaml.safe_load((K8S / "deployment.yaml").read_text())["spec"]["template"]["spec"]
    settings = {k: v for k, v in config.items() if k in TIMING}
    assert float(settings.get("INSPECTION_DRAIN_S", 0)) > 0, "the drain is on in Kubernetes"
    assert pod["terminationGracePeriodSeconds"] >= _needed(settings)
    # The server drains on SIGTERM itself; a preStop sleep would only add to it.
    (server,) = pod["containers"]
    assert "preStop" not in server.get("lifecycle", {})


def test_compose_stop_grace_period_covers_drain_and_shutdown() -> None:
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    for name in ("server", "server-cpu"):
        svc = compose["services"][name]
        # A setting listed without a value comes from docker/.env, else the default.
        env = {
            k: str(v)
            for k, v in svc.get("environment", {}).items()
            if k in TIMING and v is not None
        }
        m = re.fullmatch(r"(\d+)s", svc["stop_grace_period"])
        assert m, svc["stop_grace_period"]
        assert int(m.group(1)) >= _needed(env), name
