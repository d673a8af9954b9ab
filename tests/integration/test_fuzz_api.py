"""Schemathesis fuzzes the running server from its own OpenAPI schema: no
5xx, and every response matches what the schema documents.

The operations are driven with hypothesis directly (schemathesis' pytest
plugin does not run on this pytest), a bounded number of examples each."""

from __future__ import annotations

from pathlib import Path

import pytest

schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is in the dev extra")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from tests.helpers.onnx_models import write_toy_artifact  # noqa: E402
from tests.helpers.server import run_server  # noqa: E402

EXAMPLES = 25


def test_api_conforms_to_its_schema(tmp_path: Path) -> None:
    write_toy_artifact(tmp_path / "models")
    with run_server(tmp_path / "models" / "toy", tmp_path, admin_key="admin") as s:
        schema = schemathesis.openapi.from_url(f"{s.base}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert len(operations) >= 8
        for op in operations:

            @given(case=op.as_strategy())
            @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
            def check(case: object) -> None:
                # Any bytes fit "format: binary", but not every byte string is
                # an image a camera could send: refusing one with a 400 and
                # a reason is right, so "schema-valid data is accepted" is
                # not checked; every other check is (no 5xx among them).
                case.call_and_validate(excluded_checks=[positive_data_acceptance])  # type: ignore[attr-defined]

            check()
        assert s.proc.poll() is None
        assert "Exception in ASGI application" not in s.logs()
