#!/usr/bin/env python3
"""Write the Kubernetes copies of the alerts and the dashboard from their one source.

    python scripts/render-k8s-monitoring.py          # (re)write the files
    python scripts/render-k8s-monitoring.py --check  # exit 1 if they are out of date

docker/prometheus/alerts.yml -> k8s/monitoring/prometheusrule.yaml (a
PrometheusRule whose spec.groups are the alert groups as they are), and
docker/grafana/dashboards/inspection.json -> k8s/monitoring/grafana-dashboard.yaml
(a ConfigMap labelled ``grafana_dashboard: "1"`` for Grafana's dashboard
sidecar, carrying the JSON byte for byte). kustomize loads no file outside
k8s/, hence the copies; tests/unit/test_k8s_monitoring.py fails when they
differ from what this script writes. Plain Python and PyYAML; the output
depends only on the two sources, so running it twice changes nothing.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
ALERTS = REPO / "docker" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "docker" / "grafana" / "dashboards" / "inspection.json"
OUT = REPO / "k8s" / "monitoring"
RULE = OUT / "prometheusrule.yaml"
DASHBOARD_CONFIGMAP = OUT / "grafana-dashboard.yaml"
COMMAND = "python scripts/render-k8s-monitoring.py"

LABELS = {
    "app.kubernetes.io/name": "inspection-server",
    "app.kubernetes.io/part-of": "inspection",
}


class _Dumper(yaml.SafeDumper):
    """Lists indented under their key, as in the hand-written manifests, and
    multi-line strings (PromQL, the dashboard JSON) as literal blocks."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        super().increase_indent(flow, False)


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _header(source: Path, what: str) -> str:
    rel = source.relative_to(REPO)
    return (
        f"# GENERATED from {rel} by\n#   {COMMAND}\n"
        f"# Do not edit: edit {rel} and run it again.\n# {what}\n"
    )


def _dump(header: str, doc: dict[str, Any]) -> str:
    text = header + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=100, allow_unicode=True)
    assert yaml.safe_load(text) == doc, "the YAML written does not read back the same"
    return text


def prometheus_rule() -> str:
    alerts = yaml.safe_load(ALERTS.read_text())
    doc = {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PrometheusRule",
        "metadata": {
            "name": "inspection-server",
            # `release`: what kube-prometheus-stack's Prometheus selects rules
            # by, as for the ServiceMonitor.
            "labels": {**LABELS, "release": "kube-prometheus-stack"},
        },
        "spec": {"groups": alerts["groups"]},
    }
    what = (
        "The same alerts for the Prometheus Operator (CRD monitoring.coreos.com/v1);\n"
        "# the ServiceMonitor's job is `inspection-server` too, as the expressions expect."
    )
    return _dump(_header(ALERTS, what), doc)


def dashboard_configmap() -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "inspection-grafana-dashboard",
            # Grafana's dashboard sidecar (kube-prometheus-stack's default label,
            # searched in every namespace) loads it; the panels' datasource uid
            # `prometheus` is the stack's default Prometheus datasource.
            "labels": {**LABELS, "grafana_dashboard": "1"},
        },
        "data": {DASHBOARD.name: DASHBOARD.read_text()},
    }
    what = "The same dashboard, as a ConfigMap for Grafana's dashboard sidecar."
    return _dump(_header(DASHBOARD, what), doc)


def render() -> dict[Path, str]:
    """What each generated file must hold."""
    return {RULE: prometheus_rule(), DASHBOARD_CONFIGMAP: dashboard_configmap()}


def _shown(path: Path) -> str:
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)


def stale() -> list[Path]:
    """The generated files that differ from what render() writes (or are missing)."""
    return [p for p, text in render().items() if not p.is_file() or p.read_text() != text]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if stale")
    args = parser.parse_args(argv)
    if args.check:
        out_of_date = stale()
        for path in out_of_date:
            print(f"{_shown(path)} is out of date: run `{COMMAND}`", file=sys.stderr)
        return 1 if out_of_date else 0
    for path, text in render().items():
        if not path.is_file() or path.read_text() != text:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {_shown(path)}")
        else:
            print(f"{_shown(path)} is up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
