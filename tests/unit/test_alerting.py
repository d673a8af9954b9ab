"""Alerting as files: every alert in docker/prometheus/alerts.yml has a
``promtool test rules`` case that makes it fire and one where it stays
silent, and a runbook section in docs/runbooks.md; Alertmanager's
configuration, rendered by docker/alertmanager/render.sh from the receiver a
plant sets in the environment, passes ``amtool check-config``.

That a real Prometheus' alert reaches a real receiver through a real
Alertmanager is tests/integration/test_alerting.py.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.helpers.deploy import DOCKER, REPO, tool

ALERTS = DOCKER / "prometheus" / "alerts.yml"
RULE_TESTS = DOCKER / "prometheus" / "tests" / "alerts_test.yml"
ALERTMANAGER = DOCKER / "alertmanager"
RUNBOOKS = REPO / "docs" / "runbooks.md"
# The drift group's cases are generated from synthetic score histograms in
# tests/unit/test_deploy_files.py.
GENERATED_ELSEWHERE = REPO / "tests" / "unit" / "test_deploy_files.py"
DRIFT_GROUP = "inspection-drift"


def run(cmd: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, **kw)


def rules() -> dict[str, tuple[str, dict[str, Any]]]:
    """alert name -> (group name, rule)."""
    doc = yaml.safe_load(ALERTS.read_text())
    return {r["alert"]: (g["name"], r) for g in doc["groups"] for r in g["rules"] if "alert" in r}


def promtool_test(tmp_path: Path, spec: dict[str, Any]) -> str:
    """``promtool test rules`` on ``spec`` against alerts.yml without its
    annotations (the cases compare labels); '' on success, else the output."""
    promtool = tool("promtool", "Debian prometheus")
    doc = yaml.safe_load(ALERTS.read_text())
    for group in doc["groups"]:
        for rule in group["rules"]:
            rule.pop("annotations", None)
    (tmp_path / "alerts.yml").write_text(yaml.safe_dump(doc))
    (tmp_path / "alerts_test.yml").write_text(yaml.safe_dump(spec, sort_keys=False))
    result = run([promtool, "test", "rules", "alerts_test.yml"], cwd=tmp_path)
    return "" if result.returncode == 0 else result.stdout + result.stderr


def test_alert_rules_pass_their_promtool_tests(tmp_path: Path) -> None:
    spec = yaml.safe_load(RULE_TESTS.read_text())
    assert spec["rule_files"] == ["alerts.yml"]
    failure = promtool_test(tmp_path, spec)
    assert not failure, failure


def test_promtool_rule_tests_can_fail(tmp_path: Path) -> None:
    # An expectation the rules do not meet is reported: the harness can fail.
    spec = yaml.safe_load(RULE_TESTS.read_text())
    case = next(t for t in spec["tests"] if t["name"] == "clients turned away for 5 minutes")
    for check in case["alert_rule_test"]:
        check["exp_alerts"] = []
    spec["tests"] = [case]
    assert "InspectionOverloaded" in promtool_test(tmp_path, spec)


def fired_in_generated_cases() -> set[str]:
    """Alerts that test_deploy_files.py expects to fire for some model:
    ``fired(NAME, "60m", "model")``, NAME a string or a constant of that file."""
    text = GENERATED_ELSEWHERE.read_text()
    constants = dict(re.findall(r'^([A-Z_]+) = "(\w+)"$', text, re.M))
    calls = re.findall(r'fired\(\s*(?:"(\w+)"|([A-Z_]+))\s*,\s*"[^"]*"\s*,\s*"', text)
    return {literal or constants[const] for literal, const in calls}


def test_every_alert_has_a_case_that_fires_it_and_one_that_does_not() -> None:
    fires: set[str] = set()
    silent: set[str] = set()
    for case in yaml.safe_load(RULE_TESTS.read_text())["tests"]:
        for check in case["alert_rule_test"]:
            (fires if check["exp_alerts"] else silent).add(check["alertname"])
    generated = fired_in_generated_cases()
    untested = [
        name
        for name, (group, _) in rules().items()
        if not (name in generated if group == DRIFT_GROUP else name in fires and name in silent)
    ]
    assert not untested, f"alerts without a firing and a silent promtool case: {untested}"
    unknown = (fires | silent) - set(rules())
    assert not unknown, f"cases for alerts that do not exist: {unknown}"


def runbook_sections() -> dict[str, str]:
    """``## Name`` heading -> its text, from docs/runbooks.md."""
    text = RUNBOOKS.read_text()
    parts = re.split(r"^## +(.+?) *$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts), 2)}


def test_every_alert_links_its_runbook_section() -> None:
    sections = runbook_sections()
    for name, (_, rule) in rules().items():
        assert rule["labels"]["severity"] in ("critical", "warning"), name
        annotations = rule.get("annotations", {})
        assert annotations.get("summary"), name
        # the anchor GitHub and most Markdown renderers give `## Name`
        assert annotations.get("runbook_url") == f"docs/runbooks.md#{name.lower()}", name
        assert name in sections, f"docs/runbooks.md has no section '## {name}'"
        body = sections[name]
        for part in ("What it means", "How to check", "What to do"):
            assert f"**{part}.**" in body, f"{name}: runbook lacks '{part}'"
    stale = set(sections) - set(rules()) - {"Alerts at a glance"}
    assert not stale, f"runbook sections for alerts that do not exist: {stale}"


def test_runbook_table_lists_each_alert_with_its_for() -> None:
    # The overview table at the top of docs/runbooks.md matches the rules.
    table = runbook_sections()["Alerts at a glance"]
    for name, (_, rule) in rules().items():
        row = next((line for line in table.splitlines() if f"[{name}]" in line), None)
        assert row is not None, f"{name} missing from the overview table"
        assert f"| {rule.get('for', '0s')} |" in row, f"{name}: 'for' in the table is stale"
        assert f"| {rule['labels']['severity']} |" in row, name


def test_prometheus_sends_alerts_to_the_compose_alertmanager() -> None:
    prometheus = yaml.safe_load((DOCKER / "prometheus" / "prometheus.yml").read_text())
    (am,) = prometheus["alerting"]["alertmanagers"]
    assert am["static_configs"][0]["targets"] == ["alertmanager:9093"]
    compose = yaml.safe_load((DOCKER / "compose.yaml").read_text())
    svc = compose["services"]["alertmanager"]
    assert re.fullmatch(r"prom/alertmanager:v0\.\d+\.\d+", svc["image"]), "pin the image"
    assert "./alertmanager:/etc/alertmanager:ro" in svc["volumes"]
    assert svc["entrypoint"][:2] == ["/bin/sh", "/etc/alertmanager/render.sh"]
    rendered = svc["entrypoint"][3]
    assert f"--config.file={rendered}" in svc["command"]
    assert any(t.startswith(str(Path(rendered).parent)) for t in svc["tmpfs"])
    # every variable render.sh reads is passed from docker/.env
    script = (ALERTMANAGER / "render.sh").read_text()
    read = set(re.findall(r"\$\{?(ALERT_[A-Z_]+)", script))
    assert read and read <= set(svc["environment"]), read - set(svc["environment"])
    example = (DOCKER / ".env.example").read_text()
    assert all(name in example for name in read), "document them in docker/.env.example"
    docs = (REPO / "docs" / "deployment.md").read_text()
    assert all(name in docs for name in read), "document them in docs/deployment.md"


def render(tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    sh = shutil.which("sh")
    assert sh is not None
    clean = {k: v for k, v in os.environ.items() if not k.startswith("ALERT_")}
    return run(
        [sh, str(ALERTMANAGER / "render.sh"), str(ALERTMANAGER / "alertmanager.yml"),
         str(tmp_path / "alertmanager.yml")],
        env={**clean, **env},
    )  # fmt: skip


def amtool_check(path: Path) -> subprocess.CompletedProcess[str]:
    amtool = tool("amtool", "Debian prometheus-alertmanager")
    return run([amtool, "check-config", str(path)])


def test_committed_alertmanager_config_is_valid() -> None:
    result = amtool_check(ALERTMANAGER / "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    config = yaml.safe_load((ALERTMANAGER / "alertmanager.yml").read_text())
    route = config["route"]
    assert route["receiver"] == "plant"
    # sane: the first notice within seconds, not minutes; repeats in hours
    seconds = {"s": 1, "m": 60, "h": 3600}
    wait = int(route["group_wait"][:-1]) * seconds[route["group_wait"][-1]]
    repeat = int(route["repeat_interval"][:-1]) * seconds[route["repeat_interval"][-1]]
    assert wait <= 30 and repeat >= 3600


def test_rendered_config_carries_the_plant_receiver(tmp_path: Path) -> None:
    # Values with the characters YAML and shells trip over arrive intact.
    url = 'https://hooks.example.plant/alerts?token=a\'b&x="y"'
    password = "p@ss'w\"ord $HOME \\n"
    result = render(
        tmp_path,
        ALERT_WEBHOOK_URL=url,
        ALERT_SMTP_SMARTHOST="mail.plant.local:25",
        ALERT_EMAIL_TO="maintenance@plant.local, qa@plant.local",
        ALERT_EMAIL_FROM="inspection@plant.local",
        ALERT_SMTP_USERNAME="inspection",
        ALERT_SMTP_PASSWORD=password,
        ALERT_SMTP_REQUIRE_TLS="false",
    )
    assert result.returncode == 0, result.stderr
    assert "reach no one" not in result.stderr
    out = tmp_path / "alertmanager.yml"
    assert amtool_check(out).returncode == 0, amtool_check(out).stdout
    assert out.stat().st_mode & 0o077 == 0, "the rendered file holds a password: owner only"
    (receiver,) = yaml.safe_load(out.read_text())["receivers"]
    assert receiver["name"] == "plant"
    (hook,) = receiver["webhook_configs"]
    assert hook == {"url": url, "send_resolved": True}
    (mail,) = receiver["email_configs"]
    assert mail["to"] == "maintenance@plant.local, qa@plant.local"
    assert mail["smarthost"] == "mail.plant.local:25"
    assert mail["auth_password"] == password
    assert mail["require_tls"] is False


def test_rendered_config_with_only_a_webhook_or_nothing(tmp_path: Path) -> None:
    result = render(tmp_path, ALERT_WEBHOOK_URL="http://10.0.0.5:8080/alert")
    assert result.returncode == 0, result.stderr
    (receiver,) = yaml.safe_load((tmp_path / "alertmanager.yml").read_text())["receivers"]
    assert set(receiver) == {"name", "webhook_configs"}
    # nothing set: a valid configuration that notifies no one, and says so
    result = render(tmp_path)
    assert result.returncode == 0, result.stderr
    assert "reach no one" in result.stderr
    assert amtool_check(tmp_path / "alertmanager.yml").returncode == 0


@pytest.mark.parametrize(
    ("env", "complaint"),
    [
        ({"ALERT_SMTP_SMARTHOST": "mail:25", "ALERT_EMAIL_FROM": "a@b"}, "ALERT_EMAIL_TO"),
        (
            {
                "ALERT_SMTP_SMARTHOST": "mail:25",
                "ALERT_EMAIL_TO": "a@b",
                "ALERT_EMAIL_FROM": "c@d",
                "ALERT_SMTP_REQUIRE_TLS": "no",
            },
            "ALERT_SMTP_REQUIRE_TLS",
        ),
        ({"ALERT_WEBHOOK_URL": "http://a/\nb"}, "line break"),
    ],
)
def test_render_refuses_an_incomplete_receiver(
    tmp_path: Path, env: dict[str, str], complaint: str
) -> None:
    result = render(tmp_path, **env)
    assert result.returncode != 0
    assert complaint in result.stderr
    assert not (tmp_path / "alertmanager.yml").exists()
