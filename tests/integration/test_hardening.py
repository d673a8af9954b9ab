"""Faults a plant will see: a model that fails at run time, a model file that
vanishes, clients that hang up or trickle bytes. Each ends with the server
still answering."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.contract import MODEL_FILE
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server, raw_connection, read_until_closed, run_server
from tests.helpers.synthetic import encode_png, good_image

GOOD = encode_png(good_image(np.random.default_rng(0)))
WHITE = encode_png(np.full((300, 300, 3), 255, np.uint8))  # blue channel normalises to 2.64


def _post(s: Server, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{s.base}/v1/inspect", content=data, headers={"content-type": "image/png"}, timeout=30
    )


def _still_serving(s: Server) -> None:
    assert s.proc.poll() is None
    assert _post(s, GOOD).status_code == 200
    assert httpx.get(f"{s.base}/readyz").status_code == 200


def test_inference_error_is_a_clean_500_and_the_server_goes_on(tmp_path: Path) -> None:
    write_toy_artifact(tmp_path / "m", fail_above=2.5)
    with run_server(tmp_path / "m" / "toy", tmp_path) as s:
        r = _post(s, WHITE)
        assert r.status_code == 500
        assert r.json()["error"]["reason"] == "inference_failed"
        assert "Gather" in r.json()["error"]["message"]
        _still_serving(s)


def test_model_file_deleted_while_serving_then_reload(tmp_path: Path) -> None:
    version = write_toy_artifact(tmp_path / "m")
    with run_server(tmp_path / "m" / "toy", tmp_path, admin_key="admin") as s:
        (version / MODEL_FILE).unlink()
        _still_serving(s)  # the session is in memory
        r = httpx.post(f"{s.base}/v1/models/reload", headers={"x-api-key": "admin"})
        assert r.status_code == 409
        assert "model.onnx: missing file" in r.json()["error"]["message"]
        _still_serving(s)
        # The operator puts a good version in place: the reload takes it.
        write_toy_artifact(tmp_path / "m", version=2)
        r = httpx.post(f"{s.base}/v1/models/reload", headers={"x-api-key": "admin"})
        assert r.status_code == 200 and r.json()["version"] == 2
        _still_serving(s)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("m")
    write_toy_artifact(root)
    with run_server(root / "toy", tmp_path_factory.mktemp("logs"), read_timeout_s="2") as s:
        yield s  # type: ignore[misc]


def test_client_disconnecting_mid_upload(server: Server) -> None:
    for _ in range(5):
        with raw_connection(server) as sock:
            sock.sendall(
                b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                b"Content-Length: 100000\r\n\r\n" + GOOD[:5000]
            )
    time.sleep(0.5)
    _still_serving(server)
    assert "Exception in ASGI application" not in server.logs()


def test_slow_client_is_cut_off_by_the_read_timeout(server: Server) -> None:
    with raw_connection(server) as sock:
        sock.sendall(
            b"POST /v1/inspect HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 1000\r\n\r\n"
        )
        started = time.monotonic()
        answer = b""
        sock.settimeout(0.2)
        while time.monotonic() - started < 10 and b"\r\n\r\n" not in answer:
            try:
                sock.sendall(b"x")  # one byte a second
            except OSError:
                break
            with contextlib.suppress(TimeoutError):
                answer += sock.recv(4096)
            time.sleep(0.8)
        took = time.monotonic() - started
        # The body may follow the headers in a later segment: read to the
        # end (the server closes the connection after a 408), at most 2 s.
        answer += read_until_closed(sock, 2) or b""
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"read_timeout" in answer
    assert took < 6  # the 2 s limit, not the client's patience
    # Meanwhile, and after, others are served.
    _still_serving(server)
