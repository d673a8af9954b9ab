"""Schemathesis holds the running server to its own OpenAPI schema with every
check (`--checks all`): no 5xx; every answer as documented (status, content
type, headers, body); schema-valid data accepted, the schema's example
images inspected (200); data that breaks the schema refused; keys enforced
where the schema declares them, and declared where they are enforced.

As CI runs it, twice over: through the Python API (hypothesis drives each
operation, positive and negative data, a bounded number of examples;
schemathesis' pytest plugin does not run on this pytest) and through the
`schemathesis run` CLI; once with API keys configured and sent, once
without client keys. Both read tests/integration/schemathesis.toml, which
says which refusals are the documented answer to schema-valid bytes that
are still no image.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

import tests.integration.fuzz_hooks  # noqa: E402, F401  (BMP and TIFF bodies)
from tests.helpers.deploy import REPO  # noqa: E402
from tests.helpers.onnx_models import write_toy_artifact  # noqa: E402
from tests.helpers.server import Server, run_server  # noqa: E402

CONFIG = Path(__file__).with_name("schemathesis.toml")
CLIENT_KEY = "fuzz-client-key"
ADMIN_KEY = "fuzz-admin-key"
MAX_BATCH_FILES = 4  # small, so the coverage phase's maxItems + 1 stays cheap
EXAMPLES = 20  # per operation and generation mode (Python API)
CLI_EXAMPLES = 25  # per operation and phase (CLI)
CLI = Path(sys.executable).with_name("schemathesis")


@pytest.fixture(params=[True, False], ids=["keys", "no-client-keys"])
def keyed(request: pytest.FixtureRequest) -> bool:
    """Whether the server has client keys (INSPECTION_API_KEYS)."""
    return bool(request.param)


@pytest.fixture
def server(keyed: bool, tmp_path: Path) -> Iterator[Server]:
    write_toy_artifact(tmp_path / "models")
    keys = {"api_keys": f"another-key,{CLIENT_KEY}"} if keyed else {}
    with run_server(
        tmp_path / "models" / "toy", tmp_path,
        admin_key=ADMIN_KEY, max_batch_files=str(MAX_BATCH_FILES), **keys,
    ) as s:  # fmt: skip
        yield s


@pytest.fixture
def fuzz_env(monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """The keys the config file names, for both runs."""
    env = {"FUZZ_CLIENT_KEY": CLIENT_KEY, "FUZZ_ADMIN_KEY": ADMIN_KEY}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def _python_api_run(server: Server) -> list[str]:
    config = schemathesis.Config.from_path(CONFIG)
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json", config=config)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 9
    statuses: list[str] = []
    for op in operations:
        raw = op.definition.raw
        # Negative data needs something to break: parameters, a body or a key.
        takes = any(k in raw for k in ("parameters", "requestBody", "security"))
        modes = list(GenerationMode) if takes else [GenerationMode.POSITIVE]
        strategies = [op.as_strategy(generation_mode=mode) for mode in modes]
        # The schema's own examples: for the image routes, real images of
        # every type they take, which the config requires be answered 2xx.
        strategies += op.get_strategies_from_examples()
        for strategy in strategies:

            @given(case=strategy)
            @settings(
                max_examples=EXAMPLES,
                deadline=None,
                database=None,
                suppress_health_check=list(HealthCheck),
            )
            def check(case: Any) -> None:
                response = case.call_and_validate()
                statuses.append(f"{case.method} {case.path} {response.status_code}")

            check()
    return statuses


def _success_path(server: Server) -> None:
    """The multipart bodies, whose binary parts OpenAPI gives no way to
    exemplify: real images, held to every check, and answered 200."""
    config = schemathesis.Config.from_path(CONFIG)
    schema = schemathesis.openapi.from_url(f"{server.base}/openapi.json", config=config)
    png = httpx.get(f"{server.base}/docs/examples/part.png").content
    jpeg = httpx.get(f"{server.base}/docs/examples/part.jpg").content
    headers = {"X-API-Key": CLIENT_KEY}
    for path, body in (
        ("/v1/inspect", {"file": jpeg}),
        ("/v1/inspect/heatmap", {"file": png}),
        ("/v1/inspect/batch", {"files": [png, jpeg]}),
    ):
        case = schema[path]["POST"].Case(body=body, media_type="multipart/form-data")
        response = case.call_and_validate(headers=headers)
        assert response.status_code == 200, (path, response.text)
        if path.endswith("batch"):
            assert [r["error"] for r in response.json()["results"]] == [None, None]


def _cli_run(server: Server, fuzz_env: dict[str, str], reports: Path) -> tuple[int, str]:
    env = {
        **os.environ,
        **fuzz_env,
        "SCHEMATHESIS_HOOKS": "tests.integration.fuzz_hooks",
        "PYTHONPATH": str(REPO),
    }
    # --seed: a failure in CI can be replayed as it happened.
    args = [
        str(CLI), "--config-file", str(CONFIG), "run", f"{server.base}/openapi.json",
        "--checks", "all", "--max-examples", str(CLI_EXAMPLES), "--seed", "14",
        "--workers", "1", "--no-color", "--report", "junit", "--report-dir", str(reports),
    ]  # fmt: skip
    # Run in the test's own directory: the CLI keeps a cache of past
    # failures (.schemathesis/) where it runs, and the repository is no place for it.
    done = subprocess.run(
        args, cwd=reports.parent, env=env, capture_output=True, text=True, timeout=180,
        check=False,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


def test_api_conforms_to_its_schema(
    keyed: bool, server: Server, fuzz_env: dict[str, str], tmp_path: Path
) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    assert ("ClientKey" in spec["components"]["securitySchemes"]) == keyed
    batch = spec["paths"]["/v1/inspect/batch"]["post"]
    assert ("security" in batch) == keyed
    files = batch["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"]
    assert files["files"]["maxItems"] == MAX_BATCH_FILES

    started = time.monotonic()
    statuses = _python_api_run(server)
    _success_path(server)
    python_s = time.monotonic() - started
    # The success path was taken through the examples, not by chance.
    for route in ("/v1/inspect", "/v1/inspect/heatmap"):
        assert f"POST {route} 200" in statuses, route
    # Keys were enforced where declared, and only there.
    refused = {"POST /v1/inspect 401", "POST /v1/inspect 403"} & set(statuses)
    assert bool(refused) == keyed, refused

    if not CLI.exists():
        pytest.skip(f"no schemathesis CLI beside {sys.executable}")
    started = time.monotonic()
    rc, output = _cli_run(server, fuzz_env, tmp_path / "reports")
    cli_s = time.monotonic() - started
    print(f"schemathesis: Python API {python_s:.1f} s, CLI {cli_s:.1f} s")
    assert rc == 0, output[-6000:]
    assert server.proc.poll() is None
    assert "Exception in ASGI application" not in server.logs()
