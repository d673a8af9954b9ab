"""Scrapes and probes stay out of the request-facing metrics: the
in-flight gauge, the HPA's per-pod metric on Kubernetes, reads 0 at idle
however often Prometheus scrapes and the kubelet probes, and the latency
histogram behind the dashboard's latency panels holds only real requests;
both are still counted in inspection_requests_total. A real server on
127.0.0.1."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server, run_server
from tests.helpers.synthetic import encode_png, good_image

GOOD = encode_png(good_image(np.random.default_rng(0)))
INTERNAL = ("/metrics", "/healthz", "/readyz")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root)
    with run_server(root / "toy", tmp_path_factory.mktemp("log")) as s:
        yield s


def samples(base: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = httpx.get(f"{base}/metrics", timeout=10).text
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def in_flight(base: str) -> float:
    return samples(base)[("inspection_in_flight_requests", frozenset())]


def by_endpoint(got: dict[tuple[str, frozenset[tuple[str, str]]], float], name: str) -> set[str]:
    return {dict(labels)["endpoint"] for n, labels in got if n == name}


def test_in_flight_reads_0_at_idle_after_scrapes_and_probes(server: Server) -> None:
    assert in_flight(server.base) == 0
    # Many at once, as several Prometheus replicas and the kubelet would.
    with ThreadPoolExecutor(8) as pool:
        codes = list(
            pool.map(
                lambda path: httpx.get(f"{server.base}{path}", timeout=10).status_code,
                INTERNAL * 8,
            )
        )
    assert set(codes) == {200}
    for _ in range(5):
        assert in_flight(server.base) == 0  # the scrape reading it does not count itself
    r = httpx.post(f"{server.base}/v1/inspect", content=GOOD, headers={"content-type": "image/png"})
    assert r.status_code == 200
    got = samples(server.base)
    assert got[("inspection_in_flight_requests", frozenset())] == 0
    # The latency histogram: real requests only; the request count: all of them.
    timed = by_endpoint(got, "inspection_request_duration_seconds_count")
    assert "/v1/inspect" in timed and not timed & set(INTERNAL), timed
    counted = by_endpoint(got, "inspection_requests_total")
    assert {"/v1/inspect", *INTERNAL} <= counted, counted


def test_in_flight_counts_a_request_being_handled(server: Server) -> None:
    # A body that takes a second to arrive keeps one request in flight.
    chunks = [GOOD[i : i + len(GOOD) // 5 + 1] for i in range(0, len(GOOD), len(GOOD) // 5 + 1)]
    started = threading.Event()

    def body() -> Iterator[bytes]:
        started.set()
        for chunk in chunks:
            time.sleep(0.2)
            yield chunk

    answers: list[int] = []
    post = threading.Thread(
        target=lambda: answers.append(
            httpx.post(
                f"{server.base}/v1/inspect",
                content=body(),
                headers={"content-type": "image/png"},
                timeout=30,
            ).status_code
        )
    )
    post.start()
    try:
        assert started.wait(10)
        time.sleep(0.3)
        assert in_flight(server.base) == 1
    finally:
        post.join(timeout=30)
    assert answers == [200]
    assert in_flight(server.base) == 0
