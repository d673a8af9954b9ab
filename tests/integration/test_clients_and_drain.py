"""Hostile and careless clients, and stopping without dropping them:
a deadline for request headers, a cap on open connections, one access-log
line per request, and a drain on SIGTERM. A real server on 127.0.0.1."""

from __future__ import annotations

import contextlib
import hashlib
import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server, raw_connection, read_until_closed, run_server
from tests.helpers.synthetic import encode_png, good_image

GOOD = encode_png(good_image(np.random.default_rng(0)))
REQUEST = b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"


@pytest.fixture(scope="module")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("m")
    write_toy_artifact(root)
    return root / "toy"


def _post(s: Server, data: bytes = GOOD, **kw: object) -> httpx.Response:
    headers = {"content-type": "image/png", **kw.pop("headers", {})}  # type: ignore[dict-item]
    return httpx.post(f"{s.base}/v1/inspect", content=data, headers=headers, timeout=30, **kw)  # type: ignore[arg-type]


def _trickle(
    sock: socket.socket, data: bytes, every_s: float, limit_s: float
) -> tuple[bytes, float]:
    """Send ``data`` a byte every ``every_s``: (the answer, seconds until the server closed)."""
    started = time.monotonic()
    answer = b""
    sock.settimeout(every_s)
    for i in range(len(data)):
        if time.monotonic() - started > limit_s:
            break
        try:
            sock.sendall(data[i : i + 1])
        except OSError:
            break
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:
            break
        if not chunk:
            break
        answer += chunk
    return answer, time.monotonic() - started


def _envelope(answer: bytes) -> dict[str, object]:
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"connection: close" in head.lower(), head
    return json.loads(body)  # type: ignore[no-any-return]


# ------------------------------------------------------------- header deadline


def test_slow_headers_are_cut_off_at_the_deadline(toy: Path, tmp_path: Path) -> None:
    with run_server(toy, tmp_path, header_timeout_s="1") as s:
        # Ten clients at once, each sending its headers a byte every 0.2 s.
        results: list[tuple[bytes, float]] = []

        def slow() -> None:
            with raw_connection(s) as sock:
                results.append(_trickle(sock, REQUEST + b"X-Pad: " + b"a" * 200, 0.2, 10))

        threads = [threading.Thread(target=slow) for _ in range(10)]
        for t in threads:
            t.start()
        # Meanwhile a normal client is served.
        assert _post(s).status_code == 200
        for t in threads:
            t.join(timeout=15)
        assert len(results) == 10
        for answer, took in results:
            assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
            body = _envelope(answer)
            assert body["error"]["reason"] == "header_timeout"  # type: ignore[index]
            assert body["request_id"] is None
            assert 0.9 < took < 3.0, took  # the 1 s deadline, not the client's patience
        # A connection that sends nothing at all is closed too, without an answer.
        with raw_connection(s) as idle:
            assert read_until_closed(idle, 3) == b""
        # Keep-alive: the deadline runs again after each answer, and a prompt
        # client is never cut off.
        with httpx.Client(base_url=s.base, timeout=10) as client:
            for _ in range(3):
                assert client.get("/healthz").status_code == 200
                time.sleep(0.3)
        metrics = httpx.get(f"{s.base}/metrics").text
        assert 'inspection_rejected_inputs_total{reason="header_timeout"} 10.0' in metrics
        assert s.proc.poll() is None


def test_header_deadline_off_is_uvicorns_behaviour(toy: Path, tmp_path: Path) -> None:
    with run_server(toy, tmp_path, header_timeout_s="0") as s, raw_connection(s) as sock:
        sock.sendall(REQUEST[:10])
        assert read_until_closed(sock, 1.5) is None  # still open


# ------------------------------------------------------------- connection cap


def test_idle_connections_beyond_the_cap_make_room(toy: Path, tmp_path: Path) -> None:
    cap = 10
    with run_server(toy, tmp_path, max_connections=str(cap), header_timeout_s="30") as s:
        socks = [raw_connection(s) for _ in range(3 * cap)]
        try:
            time.sleep(0.5)
            # The longest-waiting idle connections were closed to make room;
            # no more than the cap stay open.
            closed = [sock for sock in socks if read_until_closed(sock, 0.05) is not None]
            assert len(closed) >= 2 * cap, len(closed)
            assert set(closed) == set(socks[: len(closed)]), "the oldest go first"
            # A normal client still gets in, and is served.
            assert _post(s).status_code == 200
        finally:
            for sock in socks:
                sock.close()


def test_beyond_the_cap_with_every_connection_busy_is_503(toy: Path, tmp_path: Path) -> None:
    cap = 4
    settings = {"max_connections": str(cap), "read_timeout_s": "20"}
    with run_server(toy, tmp_path, **settings) as s:
        busy = [raw_connection(s) for _ in range(cap)]
        try:
            for sock in busy:  # headers in, the body half-sent: busy with a request
                sock.sendall(REQUEST + f"Content-Length: {len(GOOD)}\r\n\r\n".encode() + GOOD[:100])
            time.sleep(0.5)
            with raw_connection(s) as extra:
                answer = read_until_closed(extra, 3)
            assert answer is not None and answer.startswith(b"HTTP/1.1 503"), answer
            assert _envelope(answer)["error"]["reason"] == "too_many_connections"  # type: ignore[index]
            # The busy ones finish their requests and are answered.
            for sock in busy:
                sock.sendall(GOOD[100:])
            for sock in busy:
                sock.settimeout(10)
                assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        finally:
            for sock in busy:
                sock.close()
        # The cap frees up once they close.
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if _post(s).status_code == 200:
                    break
            time.sleep(0.1)
        else:
            pytest.fail("no request served after the busy connections closed")


# ----------------------------------------------------------------- access log


def _log_lines(s: Server) -> list[dict[str, object]]:
    lines = []
    for line in s.logs().splitlines():
        if line.strip():
            lines.append(json.loads(line))  # every line is JSON: nothing raw
    return lines


def test_access_log_has_one_line_per_request_and_never_the_key(toy: Path, tmp_path: Path) -> None:
    current, old = "current-key-0123456789abcdef", "retired-key-fedcba9876543210"
    with run_server(toy, tmp_path, api_keys=current) as s:
        ok = _post(s, headers={"x-api-key": current})
        bearer = _post(s, headers={"authorization": f"Bearer {current}"})
        refused = _post(s, headers={"x-api-key": old})
        anonymous = httpx.get(f"{s.base}/healthz")
        corrupt = _post(s, GOOD[:200], headers={"x-api-key": current})
        assert [r.status_code for r in (ok, bearer, refused, anonymous)] == [200, 200, 403, 200]
        time.sleep(0.2)
        text = s.logs()
        lines = _log_lines(s)
    access = {line["request_id"]: line for line in lines if line["logger"] == "service.access"}
    for key in (current, old):
        assert key not in text
    short = {k: hashlib.sha256(k.encode()).hexdigest()[:8] for k in (current, old)}
    expected = [
        (ok, "/v1/inspect", short[current]),
        (bearer, "/v1/inspect", short[current]),
        (refused, "/v1/inspect", short[old]),
        (anonymous, "/healthz", None),
        (corrupt, "/v1/inspect", short[current]),
    ]
    for response, route, key_id in expected:
        line = access[response.headers["x-request-id"]]
        assert line["level"] == "info" and line["message"] == "request"
        assert line["method"] == response.request.method
        assert line["route"] == route
        assert line["status"] == response.status_code
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
        assert line["model"] == "toy" and line["version"] == "1"
        assert line["client"] == "127.0.0.1"
        assert line["key_id"] == key_id


def test_access_log_can_be_turned_off(toy: Path, tmp_path: Path) -> None:
    with run_server(toy, tmp_path, access_log="false") as s:
        assert _post(s).status_code == 200
        time.sleep(0.2)
        assert not [line for line in _log_lines(s) if line["logger"] == "service.access"]


# ---------------------------------------------------------------------- drain


@contextlib.contextmanager
def _slow_posts(s: Server, n: int, body_s: float) -> Iterator[list[httpx.Response | Exception]]:
    """``n`` posts whose bodies take ``body_s`` to arrive, in flight while the block runs."""
    results: list[httpx.Response | Exception] = []
    chunks = [GOOD[i : i + len(GOOD) // 10 + 1] for i in range(0, len(GOOD), len(GOOD) // 10 + 1)]

    def body() -> Iterator[bytes]:
        for chunk in chunks:
            time.sleep(body_s / len(chunks))
            yield chunk

    def post() -> None:
        try:
            results.append(_post(s, body()))
        except Exception as exc:  # counted as unanswered
            results.append(exc)

    threads = [threading.Thread(target=post) for _ in range(n)]
    for t in threads:
        t.start()
    try:
        yield results
    finally:
        for t in threads:
            t.join(timeout=30)


def test_sigterm_drains_then_finishes_in_flight_and_exits_0(toy: Path, tmp_path: Path) -> None:
    drain_s = 2.0
    with run_server(toy, tmp_path, drain_s=str(drain_s), graceful_shutdown_s="10") as s:
        with _slow_posts(s, 8, body_s=drain_s + 1.5) as in_flight:
            time.sleep(0.5)  # all eight have sent their headers
            s.proc.send_signal(signal.SIGTERM)
            sent = time.monotonic()
            # Draining: not ready, and still serving new requests, which are
            # told to close their connections.
            ready = httpx.get(f"{s.base}/readyz", timeout=5)
            assert ready.status_code == 503
            assert ready.json()["error"]["reason"] == "draining"
            fresh = _post(s)
            assert fresh.status_code == 200
            assert fresh.headers["connection"] == "close"
            time.sleep(max(0.0, drain_s + 0.3 - (time.monotonic() - sent)))
            # The drain is over: the listener is closed...
            with pytest.raises(httpx.ConnectError):
                httpx.get(f"{s.base}/healthz", timeout=2)
        # ...but every request in flight at SIGTERM was answered.
        assert len(in_flight) == 8
        assert all(isinstance(r, httpx.Response) and r.status_code == 200 for r in in_flight), [
            r if isinstance(r, Exception) else r.status_code for r in in_flight
        ]
        assert s.proc.wait(timeout=10) == 0
        took = time.monotonic() - sent
        assert took < drain_s + 5, took
        log = s.logs()
    assert "draining" in log and "Application shutdown complete" in log


def test_drain_off_closes_the_listener_at_once(toy: Path, tmp_path: Path) -> None:
    with run_server(toy, tmp_path, drain_s="0") as s:
        s.proc.send_signal(signal.SIGTERM)
        s.proc.wait(timeout=10)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.base}/healthz", timeout=2)
