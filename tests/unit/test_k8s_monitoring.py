"""Kubernetes monitoring: the PrometheusRule and the Grafana
dashboard ConfigMap under k8s/monitoring/ are generated from the one source
in docker/ (scripts/render-k8s-monitoring.py) and must not drift from it; the
prometheus-adapter values serve the HPA's Pods metric. The CRD and Kubernetes
schema checks of the rendered k8s/ are in tests/unit/test_deploy_files.py."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.helpers.deploy import ADAPTER_VALUES, DASHBOARD, DOCKER, K8S, REPO, metric_names, tool

SCRIPT = REPO / "scripts" / "render-k8s-monitoring.py"
COMMAND = "python scripts/render-k8s-monitoring.py"
ALERTS = DOCKER / "prometheus" / "alerts.yml"
RULE = K8S / "monitoring" / "prometheusrule.yaml"
DASHBOARD_CONFIGMAP = K8S / "monitoring" / "grafana-dashboard.yaml"


def generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("render_k8s_monitoring", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(path.read_text())
    return doc


def kustomized() -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "kubectl kustomize renders k8s/")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def test_generated_files_are_up_to_date() -> None:
    stale = generator().stale()
    assert not stale, (
        f"{', '.join(str(p.relative_to(REPO)) for p in stale)} out of date with "
        f"docker/: run `{COMMAND}`"
    )


def test_the_generator_writes_once_and_check_sees_drift(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    gen = generator()
    monkeypatch.setattr(gen, "RULE", tmp_path / "prometheusrule.yaml")
    monkeypatch.setattr(gen, "DASHBOARD_CONFIGMAP", tmp_path / "grafana-dashboard.yaml")
    assert gen.main(["--check"]) == 1  # missing
    assert gen.main([]) == 0
    written = {p: p.read_text() for p in tmp_path.iterdir()}
    assert len(written) == 2
    assert gen.main([]) == 0 and gen.main(["--check"]) == 0
    assert {p: p.read_text() for p in tmp_path.iterdir()} == written  # idempotent
    (tmp_path / "prometheusrule.yaml").write_text(written[tmp_path / "prometheusrule.yaml"] + "#")
    capsys.readouterr()
    assert gen.main(["--check"]) == 1
    assert COMMAND in capsys.readouterr().err
    # and from the command line, as CI or a person would run it
    check = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, cwd=REPO
    )
    assert check.returncode == 0, check.stderr


def test_prometheus_rule_carries_the_alert_groups() -> None:
    groups = load(ALERTS)["groups"]
    rule = load(RULE)
    assert rule["kind"] == "PrometheusRule"
    assert rule["spec"]["groups"] == groups
    # Selected by kube-prometheus-stack's Prometheus the way the ServiceMonitor is.
    monitor = load(K8S / "monitoring" / "servicemonitor.yaml")
    assert rule["metadata"]["labels"]["release"] == monitor["metadata"]["labels"]["release"]
    rendered = next(d for d in kustomized() if d["kind"] == "PrometheusRule")
    assert rendered["spec"]["groups"] == groups
    assert rendered["metadata"]["namespace"] == "inspection"


def test_prometheus_rule_groups_pass_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian prometheus")
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump({"groups": load(RULE)["spec"]["groups"]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_configmap_carries_the_dashboard() -> None:
    source = DASHBOARD.read_text()
    for configmap in (
        load(DASHBOARD_CONFIGMAP),
        next(
            d
            for d in kustomized()
            if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "inspection-grafana-dashboard"
        ),
    ):
        assert configmap["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert configmap["data"] == {DASHBOARD.name: source}  # byte for byte
    # The panels use the datasource uid kube-prometheus-stack's Grafana has.
    dash = json.loads(source)
    uids = {p["datasource"]["uid"] for p in dash["panels"] if "datasource" in p}
    assert uids == {"prometheus"}


# ---------------------------------------------------------- prometheus-adapter


def adapter_rules() -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = load(ADAPTER_VALUES)["rules"]["custom"]
    return rules


def test_adapter_serves_the_hpa_pods_metric_per_pod() -> None:
    hpa = load(K8S / "hpa.yaml")
    wanted = {m["pods"]["metric"]["name"] for m in hpa["spec"]["metrics"] if m["type"] == "Pods"}
    assert wanted == {"inspection_in_flight_requests"}
    served = {}
    for rule in adapter_rules():
        (series,) = metric_names(rule["seriesQuery"])
        assert re.fullmatch(rule["name"]["matches"], series)
        served[rule["name"]["as"]] = series
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"] == {"resource": "pod"}
        assert overrides["namespace"] == {"resource": "namespace"}
    assert wanted <= set(served), f"the HPA reads {wanted}, the adapter serves {set(served)}"
    # the adapter asks the Prometheus that kube-prometheus-stack installs
    values = load(ADAPTER_VALUES)
    release = load(K8S / "monitoring" / "servicemonitor.yaml")["metadata"]["labels"]["release"]
    assert f"//{release}-prometheus." in values["prometheus"]["url"]
    assert values["rules"]["default"] is False


def test_adapter_queries_pass_promtool(tmp_path: Path) -> None:
    # The adapter fills in the series, the HPA's label matchers and `pod`.
    promtool = tool("promtool", "Debian prometheus")
    rules = []
    for n, rule in enumerate(adapter_rules()):
        (series,) = metric_names(rule["seriesQuery"])
        expr = (
            rule["metricsQuery"]
            .replace("<<.Series>>", series)
            .replace("<<.LabelMatchers>>", 'namespace="inspection",pod=~"a|b"')
            .replace("<<.GroupBy>>", "pod")
        )
        assert "<<" not in expr, expr
        rules.append({"record": f"adapter:query_{n}", "expr": expr})
        rules.append({"record": f"adapter:series_{n}", "expr": rule["seriesQuery"]})
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "adapter", "rules": rules}]}))
    result = subprocess.run(
        [promtool, "check", "rules", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr
