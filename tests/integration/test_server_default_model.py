"""The embedded default model (models/bottle-pwae, picked by the server itself:
no --model-dir) behind a real uvicorn process: every endpoint, every bad
input, API keys. test_server_api.py covers the same on a toy model whose
errors a test can predict; this module proves it with the real graph."""

from __future__ import annotations

import base64
import concurrent.futures
from collections.abc import Iterator

import cv2
import httpx
import numpy as np
import pytest

from service.artifact import resolve_version_dir
from service.settings import DEFAULT_MODEL_DIR
from tests.helpers.server import Server, assert_api_error, run_server
from tests.helpers.synthetic import encode, part_png
from tests.unit.test_preprocessing import _png_bomb

KEY = "line-3-camera"
MAX_BODY = 600_000  # two synthetic parts (~170 kB each) fit, a 500x500 noise PNG not


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not (DEFAULT_MODEL_DIR.is_dir() and any(DEFAULT_MODEL_DIR.iterdir())):
        pytest.fail(f"the embedded default model is missing under {DEFAULT_MODEL_DIR}")
    # No model dir: the server's own default. A body limit small enough to
    # test cheaply, and two API keys, so every call below also proves the key path.
    with run_server(
        None,
        tmp_path_factory.mktemp("logs"),
        max_body_bytes=str(MAX_BODY),
        api_keys=f"old-key,{KEY}",
    ) as s:
        yield s


def _post(
    server: Server, path: str, data: bytes, ctype: str = "image/png", **params: str
) -> httpx.Response:
    headers = {"content-type": ctype, "x-api-key": KEY}
    return httpx.post(
        f"{server.base}{path}", content=data, headers=headers, params=params, timeout=60
    )


# --- each endpoint --------------------------------------------------------------------


def test_serves_the_newest_default_version(server: Server) -> None:
    info = httpx.get(f"{server.base}/v1/models", headers={"x-api-key": KEY}).json()
    version_dir = resolve_version_dir(DEFAULT_MODEL_DIR)
    assert info["name"] == DEFAULT_MODEL_DIR.name
    assert info["version"] == int(version_dir.name)
    assert info["provider"] == "CPUExecutionProvider"
    assert len(info["metadata"]["thresholds"]["tiles"]) == 9


def test_inspect_raw_and_multipart_agree(server: Server) -> None:
    data = part_png(1, "scratch")
    raw = _post(server, "/v1/inspect", data)
    assert raw.status_code == 200, raw.text
    body = raw.json()
    assert body["model"]["name"] == DEFAULT_MODEL_DIR.name
    assert body["verdict"] in ("defect_free", "defective")
    assert body["image"]["score"] == pytest.approx(
        body["image"]["error"] / body["image"]["threshold"], rel=1e-6
    )
    assert [t["tile"] for t in body["tiles"]] == list(range(1, 10))
    assert body["defective_tiles"] == [t["tile"] for t in body["tiles"] if t["defective"]]
    # The rule: defect-free only if e0 <= eps0 and every ek <= epsk.
    clean = body["image"]["score"] <= 1 and not body["defective_tiles"]
    assert body["verdict"] == ("defect_free" if clean else "defective")
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}
    form = httpx.post(
        f"{server.base}/v1/inspect",
        files={"file": ("part.png", data, "image/png")},
        headers={"x-api-key": KEY},
        timeout=60,
    ).json()
    assert form["verdict"] == body["verdict"]
    assert form["image"]["error"] == pytest.approx(body["image"]["error"], rel=1e-5)


def test_heatmap_inline_and_as_png(server: Server) -> None:
    data = part_png(2, "blob")
    inline = _post(server, "/v1/inspect", data, heatmap="true").json()
    png = base64.b64decode(inline["heatmap_png_base64"])
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_UNCHANGED)
    assert img.shape == (300, 300, 3)
    r = _post(server, "/v1/inspect/heatmap", data)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.headers["x-verdict"] == inline["verdict"]
    assert cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR).shape == img.shape


def test_batch_fails_only_the_bad_entry(server: Server) -> None:
    files = [  # under MAX_BODY in all
        ("files", ("a.png", part_png(3), "image/png")),
        ("files", ("empty.png", b"", "image/png")),
        ("files", ("b.png", part_png(4, "missing"), "image/png")),
    ]
    r = httpx.post(
        f"{server.base}/v1/inspect/batch", files=files, headers={"x-api-key": KEY}, timeout=60
    )
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [e["filename"] for e in results] == ["a.png", "empty.png", "b.png"]
    assert results[0]["result"] and results[2]["result"]
    assert results[1]["error"]["reason"] == "empty" and results[1]["result"] is None


def test_health_ready_metrics(server: Server) -> None:
    assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/readyz").json() == {"status": "ready"}
    text = httpx.get(f"{server.base}/metrics").text
    info = [line for line in text.splitlines() if line.startswith("inspection_model_info{")]
    assert len(info) == 1 and info[0].endswith(" 1.0"), info
    assert f'model="{DEFAULT_MODEL_DIR.name}"' in info[0]
    assert 'provider="CPUExecutionProvider"' in info[0]


def test_concurrent_clients_get_their_own_results(server: Server) -> None:
    images = [part_png(20 + i, "blob" if i % 2 else None) for i in range(4)]
    single = [_post(server, "/v1/inspect", d).json() for d in images]

    def call(i: int) -> tuple[int, httpx.Response]:
        return i % 4, _post(server, "/v1/inspect", images[i % 4])

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(call, range(32)))
    assert [r.status_code for _, r in answers] == [200] * 32
    # On the CPU provider the server runs one image at a time by default.
    assert {r.json()["batch_size"] for _, r in answers} == {1}
    for i, r in answers:
        got = r.json()
        assert got["verdict"] == single[i]["verdict"]
        assert got["image"]["error"] == pytest.approx(single[i]["image"]["error"], rel=1e-4)
        for a, b in zip(got["tiles"], single[i]["tiles"], strict=True):
            assert a["error"] == pytest.approx(b["error"], rel=1e-4)


# --- bad input: a clear 4xx with a reason, never a 500 ---------------------------------------


BAD_INPUTS = {
    "empty body": (b"", "image/png", 400, ("empty",)),
    "text": (b"hello, world", "image/png", 400, ("unsupported_format",)),
    "truncated png": (part_png()[:5000], "image/png", 400, ("truncated", "corrupt")),
    "wrong content type": (part_png(), "text/plain", 415, ("unsupported_media_type",)),
    "json": (b'{"image": 1}', "application/json", 415, ("unsupported_media_type",)),
    "oversized body": (
        encode(".png", np.random.default_rng(0).integers(0, 255, (500, 500, 3), np.uint8)),
        "image/png",
        413,
        ("payload_too_large",),
    ),
    "decompression bomb": (_png_bomb(10_000, 10_000), "image/png", 400, ("too_many_pixels",)),
    "1x1 image": (encode(".png", np.zeros((1, 1, 3), np.uint8)), "image/png", 400, ("too_small",)),
    # The default model (bottle) is RGB: a grey image is refused, not judged.
    "grey image": (
        encode(".png", np.full((300, 300), 128, np.uint8)),
        "image/png",
        400,
        ("wrong_colour",),
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS), ids=list(BAD_INPUTS))
def test_bad_input(server: Server, case: str) -> None:
    data, ctype, status, reasons = BAD_INPUTS[case]
    if case == "oversized body":
        assert len(data) > MAX_BODY
    assert_api_error(_post(server, "/v1/inspect", data, ctype), status, *reasons)


@pytest.mark.parametrize(
    ("ext", "img", "ctype"),
    [
        (".tiff", np.full((300, 300, 3), 30000, np.uint16), "image/tiff"),
        (".png", np.full((300, 300, 4), 128, np.uint8), "image/png"),
    ],
    ids=["tiff16", "png-rgba"],
)
def test_odd_but_valid_images_are_inspected(
    server: Server, ext: str, img: np.ndarray, ctype: str
) -> None:
    r = _post(server, "/v1/inspect", encode(ext, img), ctype)
    assert r.status_code == 200, r.text
    assert r.json()["verdict"] in ("defect_free", "defective")


def test_missing_and_wrong_api_key(server: Server) -> None:
    plain = {"content-type": "image/png"}
    r = httpx.post(f"{server.base}/v1/inspect", content=part_png(), headers=plain)
    assert_api_error(r, 401, "missing_api_key")
    r = httpx.post(
        f"{server.base}/v1/inspect", content=part_png(), headers={**plain, "x-api-key": "nope"}
    )
    assert_api_error(r, 403, "invalid_api_key")
    r = httpx.get(f"{server.base}/v1/models", headers={"authorization": "Bearer old-key"})
    assert r.status_code == 200  # the key being rotated out still works
    assert "old-key" not in server.logs() and KEY not in server.logs()
