"""The benchmarks' load generator against a real server: it counts what it sends.

bench/loadgen.py speaks HTTP/1.1 on raw sockets to stay cheap on shared
cores; these tests hold it to what the server really answered (its own
request counter in /metrics) and to the schedule it promises.
"""

from __future__ import annotations

import re
from collections.abc import Iterator

import httpx
import pytest

from bench import loadgen
from bench.http_load import cpu_s, drive, rss_mb, serving
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server
from tests.helpers.synthetic import part_png


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root, eps0=3.0, tiles=(3.0,) * 9)
    with serving(root / "toy", max_queue="256") as s:
        yield s


def _served(server: Server) -> float:
    """The server's own count of 200 answers on /v1/inspect."""
    text = httpx.get(f"{server.base}/metrics").text
    total = 0.0
    for m in re.finditer(r"^inspection_requests_total\{([^}]*)\} (\S+)$", text, re.M):
        if 'endpoint="/v1/inspect"' in m.group(1) and 'status="200"' in m.group(1):
            total += float(m.group(2))
    return total


def test_closed_loop_counts_every_answer(server: Server) -> None:
    before = _served(server)
    result = loadgen.closed_loop(loadgen.Target(server.base, part_png()), 4, 30.0, 40)
    assert result.codes == {200: 40} and not result.errors
    assert len(result.latencies_ms) == 40 and min(result.latencies_ms) > 0
    assert _served(server) - before == 40


def test_open_loop_keeps_its_schedule(server: Server) -> None:
    before = _served(server)
    result = loadgen.open_loop(loadgen.Target(server.base, part_png()), 20.0, 1.5)
    # Due at 0, 1/20, ... < 1.5 s: 30 requests, all answered.
    assert result.codes == {200: 30} and not result.errors
    assert _served(server) - before == 30


def test_refused_requests_are_counted_not_hidden(server: Server) -> None:
    target = loadgen.Target(server.base, b"not an image")
    result = loadgen.closed_loop(target, 2, 30.0, 6)
    assert result.codes == {400: 6} and result.latencies_ms == []


def test_drive_reports_cpu_per_image(server: Server) -> None:
    row = drive(server, part_png(), 2, 30.0, 20)
    assert row["status_codes"] == {"200": 20}
    assert row["server_cpu_ms_per_image"] > 0 and row["client_cpu_ms_per_image"] > 0
    assert cpu_s(server) > 0 and rss_mb(server) > 10
