"""Every error the server can produce, the framework's own included, answers
in one envelope ({"error": {reason, message}, "request_id"}) and is counted
in inspection_rejected_inputs_total{reason}. A real uvicorn on 127.0.0.1."""

from __future__ import annotations

import concurrent.futures
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from service.errors import BUSY
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server, assert_api_error, run_server
from tests.helpers.synthetic import encode, part_png


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root, name="toy", version=1)
    return root / "toy"


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models, tmp_path_factory.mktemp("logs"), max_batch_files="3") as s:
        yield s


def _rejected(base: str, reason: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    m = re.search(rf'^inspection_rejected_inputs_total{{reason="{reason}"}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


def _counted(base: str, reason: str, call: object) -> httpx.Response:
    before = _rejected(base, reason)
    r = call()  # type: ignore[operator]
    assert _rejected(base, reason) == before + 1, reason
    assert isinstance(r, httpx.Response)
    return r


def test_unknown_path_is_404_in_the_envelope(server: Server) -> None:
    r = _counted(server.base, "not_found", lambda: httpx.get(f"{server.base}/v1/nothing"))
    assert_api_error(r, 404, "not_found")
    assert "/v1/nothing" in r.json()["error"]["message"]


def test_wrong_method_is_405_with_allow(server: Server) -> None:
    r = _counted(server.base, "method_not_allowed", lambda: httpx.get(f"{server.base}/v1/inspect"))
    assert_api_error(r, 405, "method_not_allowed")
    assert r.headers["allow"] == "POST"


def test_two_files_where_one_is_taken_is_413(server: Server) -> None:
    files = [
        ("file", ("a.png", part_png(), "image/png")),
        ("file", ("b.png", part_png(), "image/png")),
    ]
    r = _counted(
        server.base,
        "too_many_files",
        lambda: httpx.post(f"{server.base}/v1/inspect", files=files, timeout=30),
    )
    assert_api_error(r, 413, "too_many_files")


def test_batch_over_the_file_limit_is_413(server: Server) -> None:
    files = [("files", (f"{i}.png", part_png(i), "image/png")) for i in range(4)]
    r = _counted(
        server.base,
        "too_many_files",
        lambda: httpx.post(f"{server.base}/v1/inspect/batch", files=files, timeout=30),
    )
    assert_api_error(r, 413, "too_many_files")
    assert "INSPECTION_MAX_BATCH_FILES" in r.json()["error"]["message"]


def test_malformed_multipart_is_400(server: Server) -> None:
    def call() -> httpx.Response:
        return httpx.post(
            f"{server.base}/v1/inspect",
            content=b'--x\r\nContent-Disposition: form-data; name="file"\r\n\r\nabc',
            headers={"content-type": "multipart/form-data"},  # no boundary
            timeout=30,
        )

    r = _counted(server.base, "invalid_multipart", call)
    assert_api_error(r, 400, "invalid_multipart")


def test_invalid_query_parameter_is_422_in_the_envelope(server: Server) -> None:
    def call() -> httpx.Response:
        return httpx.post(
            f"{server.base}/v1/inspect",
            params={"heatmap": "perhaps"},
            content=part_png(),
            headers={"content-type": "image/png"},
            timeout=30,
        )

    r = _counted(server.base, "invalid_request", call)
    assert_api_error(r, 422, "invalid_request")
    assert "heatmap" in r.json()["error"]["message"]


def test_batch_that_finds_the_queue_full_everywhere_is_503(tmp_path: Path) -> None:
    """A batch none of whose images found room answers 503 with Retry-After, like
    one image; one where some did answers 200 and says Retry-After for the rest.

    The default P-WAE model, whose inference (tens of ms on the CPU) is slower
    than decoding a small image, keeps a one-image queue full under 24 clients."""
    frame = encode(".jpg", np.random.default_rng(0).integers(0, 255, (300, 300, 3), np.uint8))
    pair = [("files", (f"{i}.jpg", frame, "image/jpeg")) for i in range(2)]
    with run_server(None, tmp_path, max_queue="1", max_batch_size="1") as s:

        def single(_: int) -> httpx.Response:
            return httpx.post(
                f"{s.base}/v1/inspect", content=frame, headers={"content-type": "image/jpeg"},
                timeout=60,
            )  # fmt: skip

        def batch(_: int) -> httpx.Response:
            return httpx.post(f"{s.base}/v1/inspect/batch", files=pair, timeout=60)

        seen_503 = False
        for _ in range(5):  # bounded: each round keeps the queue full with 24 clients
            with concurrent.futures.ThreadPoolExecutor(32) as pool:
                load = [pool.submit(single, i) for i in range(48)]
                answers = list(pool.map(batch, range(8)))
                concurrent.futures.wait(load)
            for r in answers:
                if r.status_code == 503:
                    assert_api_error(r, 503, "queue_full", "decode_busy")
                    assert r.headers["retry-after"] == "1"
                    seen_503 = True
                else:
                    assert r.status_code == 200, r.text
                    reasons = [x["error"]["reason"] for x in r.json()["results"] if x["error"]]
                    assert ("retry-after" in r.headers) == bool(BUSY & set(reasons))
            if seen_503:
                break
        assert seen_503, "no batch found the queue full for all its images in 5 rounds"
        assert s.proc.poll() is None
