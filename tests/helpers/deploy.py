"""Shared bits of the deployment checks (tests/*/test_deploy_*.py)."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DOCKER = REPO / "docker"
K8S = REPO / "k8s"
DASHBOARD = DOCKER / "grafana" / "dashboards" / "inspection.json"


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
