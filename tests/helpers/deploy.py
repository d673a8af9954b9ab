"""Shared bits of the deployment checks (tests/*/test_deploy_*.py)."""

from __future__ import annotations

import functools
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "inspection.json"
# ServiceMonitor and PrometheusRule CRDs, vendored from one prometheus-operator release.
OPERATOR_CRDS = REPO / "tests" / "vendor" / "prometheus-operator-crds"
ADAPTER_VALUES = K8S / "monitoring" / "prometheus-adapter-values.yaml"


def tool(name: str, why: str) -> str:
    """Path of a command-line tool, from PATH or this Python's venv; skip if absent."""
    found = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if found is None:
        pytest.skip(f"{name} is not installed ({why}); scripts/test.sh installs it")
    return found


# Grafana's template variables, replaced by values PromQL accepts so that the
# panel queries can be parsed and checked the way Prometheus will see them.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "1h",
    "$model": ".*",
    "$version": ".*",
    "$endpoint": ".*",
    "$tile": ".*",
}


def grafana_to_promql(expr: str) -> str:
    for var, value in sorted(GRAFANA_VARIABLES.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace(var, value)
    leftover = re.findall(r"\$\w+", expr)
    assert not leftover, f"unknown Grafana variable(s) {leftover} in {expr!r}"
    return expr


_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"')
_LABEL_MATCHERS = re.compile(r"\{[^}]*\}")
_BY_CLAUSE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_IDENT = re.compile(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b")


def metric_names(expr: str) -> set[str]:
    """The project's metric names a PromQL expression reads (those starting ``inspection_``)."""
    stripped = _BY_CLAUSE.sub(" ", _LABEL_MATCHERS.sub(" ", _STRINGS.sub('""', expr)))
    return {m for m in _IDENT.findall(stripped) if m.startswith("inspection_")}


def dashboard_metric_names() -> dict[str, set[str]]:
    """Every project metric name the deployment reads, with where it is read."""
    import json

    import yaml

    where: dict[str, set[str]] = {}

    def add(source: str, expr: str) -> None:
        for name in metric_names(expr):
            where.setdefault(name, set()).add(source)

    dash = json.loads(DASHBOARD.read_text())
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            add(f"panel {panel['title']!r}", target["expr"])
    for ann in dash["annotations"]["list"]:
        add(f"annotation {ann['name']!r}", ann.get("expr", ""))
    for var in dash["templating"]["list"]:
        add(f"variable ${var['name']}", var["definition"])
    alerts = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    for group in alerts["groups"]:
        for rule in group["rules"]:
            add(f"alert {rule['alert']}", rule["expr"])
    hpa = yaml.safe_load((K8S / "hpa.yaml").read_text())
    for metric in hpa["spec"]["metrics"]:
        if metric["type"] == "Pods":
            add("k8s/hpa.yaml", metric["pods"]["metric"]["name"])
    for rule in yaml.safe_load(ADAPTER_VALUES.read_text())["rules"]["custom"]:
        add("prometheus-adapter rule", rule["seriesQuery"])
    return where


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_ready(base_url: str, proc: object, timeout: float, log: Path | None = None) -> None:
    """Poll /readyz until 200; fail early, with the log, if the process died."""
    import time

    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:  # type: ignore[attr-defined]
            tail = log.read_text()[-4000:] if log and log.exists() else ""
            pytest.fail(f"server exited with {proc.returncode} before ready:\n{tail}")  # type: ignore[attr-defined]
        try:
            if httpx.get(f"{base_url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    tail = log.read_text()[-4000:] if log and log.exists() else ""
    pytest.fail(f"{base_url}/readyz not ready after {timeout:.0f} s:\n{tail}")


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every dashboard panel target, annotation and alert."""
    import json

    import yaml

    dash = json.loads(DASHBOARD.read_text())
    out = [
        (f"panel {p['title']!r}", t["expr"]) for p in dash["panels"] for t in p.get("targets", [])
    ]
    out += [
        (f"annotation {a['name']!r}", a["expr"]) for a in dash["annotations"]["list"] if "expr" in a
    ]
    alerts = yaml.safe_load((DOCKER / "prometheus" / "alerts.yml").read_text())
    out += [(f"alert {r['alert']}", r["expr"]) for g in alerts["groups"] for r in g["rules"]]
    return out


_MATCHER_LABEL = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")
_GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")


def label_names(expr: str) -> set[str]:
    """Label names a PromQL expression matches on or groups by (``le`` aside)."""
    names: set[str] = set()
    for matchers in _LABEL_MATCHERS.findall(_STRINGS.sub('""', expr)):
        names |= set(_MATCHER_LABEL.findall(matchers))
    for group in _GROUPING.findall(expr):
        names |= {n.strip() for n in group.split(",") if n.strip()}
    return names - {"le", "job", "instance"}


def _strict(schema: Any) -> Any:
    """A CRD schema that refuses unknown fields, as ``kubectl apply
    --validate=strict`` does: the API server would otherwise drop them
    silently (pruning), so a misspelt key would pass unnoticed."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@functools.cache
def operator_crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> the strict openAPIV3Schema of each served version
    of the vendored Prometheus Operator CRDs."""
    import yaml

    schemas = {}
    for path in sorted(OPERATOR_CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        spec = crd["spec"]
        for version in spec["versions"]:
            if version["served"]:
                key = (f"{spec['group']}/{version['name']}", spec["names"]["kind"])
                schemas[key] = _strict(version["schema"]["openAPIV3Schema"])
    return schemas


def validate_operator_crd(doc: dict[str, Any]) -> None:
    """Validate a ServiceMonitor or PrometheusRule against its CRD's schema;
    raises jsonschema.ValidationError (or KeyError for a kind or version the
    vendored CRDs do not serve)."""
    import jsonschema

    schema = operator_crd_schemas()[(doc["apiVersion"], doc["kind"])]
    jsonschema.Draft7Validator(schema).validate(doc)
