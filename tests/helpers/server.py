"""A real server for integration tests: ``python -m service`` on 127.0.0.1."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

from tests.helpers.deploy import REPO, free_port, wait_ready


@dataclass
class Server:
    base: str
    proc: subprocess.Popen[bytes]
    log: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")


def assert_api_error(r: httpx.Response, status: int, *reasons: str) -> None:
    """The API's error body: one of ``reasons``, a message, the request id."""
    assert r.status_code == status, r.text
    body = r.json()
    assert body["error"]["reason"] in reasons, body
    assert body["error"]["message"]
    assert body["request_id"] == r.headers["x-request-id"]


@contextlib.contextmanager
def run_server(model_dir: Path | None, log_dir: Path, **settings: str) -> Iterator[Server]:
    """Start the server with INSPECTION_<KEY> settings; SIGTERM it on exit.

    ``model_dir=None`` passes no --model-dir: the server picks its default model.
    The drain on SIGTERM is off (``drain_s=0``) unless a test asks for one, so
    that stopping a server does not wait out the drain.
    """
    settings.setdefault("drain_s", "0")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INSPECTION_")}
    env.update({f"INSPECTION_{k.upper()}": v for k, v in settings.items()})
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as out:
        args = [sys.executable, "-m", "service", "--port", str(port)]
        if model_dir is not None:
            args += ["--model-dir", str(model_dir)]
        proc = subprocess.Popen(
            args,
            cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        wait_ready(base, proc, timeout=60, log=log)
        yield Server(base, proc, log)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def raw_connection(s: Server) -> socket.socket:
    """A plain TCP connection to the server, for clients no HTTP library plays."""
    url = urlparse(s.base)
    return socket.create_connection((url.hostname, url.port), timeout=10)


def read_until_closed(sock: socket.socket, wait_s: float) -> bytes | None:
    """What the server sent before closing, or None if it was still open after ``wait_s``."""
    got = b""
    sock.settimeout(0.05)
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            continue
        except OSError:  # reset
            return got
        if not chunk:
            return got
        got += chunk
    return None
