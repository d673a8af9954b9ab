"""The server end to end: a real uvicorn process on 127.0.0.1, a real
onnxruntime session on a small contract-valid model, httpx as the client."""

from __future__ import annotations

import base64
import concurrent.futures
import shutil
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import cv2
import httpx
import numpy as np
import pytest

from service.artifact import write_artifact
from service.contract import METADATA_FILE, MODEL_FILE, InputSpec
from tests.helpers.onnx_models import colour_distance_model, metadata_for, write_toy_artifact
from tests.helpers.server import Server, assert_api_error, run_server
from tests.helpers.synthetic import encode, encode_png, good_image, part_png
from tests.unit.test_preprocessing import _png_bomb

# The toy model's errors are squared distances from black in normalised
# units; these thresholds make the synthetic good part pass and a dark
# defect fail in the tiles it touches.
THRESHOLDS = {"eps0": 3.0, "tiles": (3.0,) * 9}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root, name="toy", version=1, **THRESHOLDS)  # type: ignore[arg-type]
    return root / "toy"


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    # Batching set explicitly: on the CPU provider the default is one image a run.
    with run_server(models, tmp_path_factory.mktemp("logs"), max_batch_size="8") as s:
        yield s


def _inspect(base: str, data: bytes, ctype: str = "image/png", **params: str) -> httpx.Response:
    return httpx.post(
        f"{base}/v1/inspect",
        content=data,
        headers={"content-type": ctype},
        params=params,
        timeout=30,
    )


# --- each endpoint -------------------------------------------------------------------


def test_inspect_raw_body(server: Server) -> None:
    r = _inspect(server.base, part_png())
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == {"name": "toy", "version": 1, "family": "pwae"}
    assert body["verdict"] in ("defect_free", "defective")
    assert [t["tile"] for t in body["tiles"]] == list(range(1, 10))
    for t in body["tiles"]:
        assert t["score"] == pytest.approx(t["error"] / t["threshold"])
        assert t["defective"] == (t["score"] > 1)
    assert body["defective_tiles"] == [t["tile"] for t in body["tiles"] if t["defective"]]
    assert body["image"]["threshold"] == THRESHOLDS["eps0"]
    assert set(body["timings_ms"]) == {"decode", "queue", "inference", "total"}
    assert body["heatmap_png_base64"] is None
    assert body["request_id"] == r.headers["x-request-id"]


def test_verdicts_follow_the_threshold_rule(server: Server) -> None:
    good = _inspect(server.base, part_png(1)).json()
    # A part with its lower third burnt black: far from the toy model's normal.
    burnt = good_image(np.random.default_rng(1))
    burnt[200:] = 0
    bad = _inspect(server.base, encode_png(burnt)).json()
    assert good["verdict"] == "defect_free" and good["defective_tiles"] == []
    assert bad["verdict"] == "defective" and bad["defective_tiles"] == [7, 8, 9]


def test_multipart_gives_the_same_result_as_raw(server: Server) -> None:
    data = part_png(2)
    raw = _inspect(server.base, data).json()
    r = httpx.post(f"{server.base}/v1/inspect", files={"file": ("part.png", data, "image/png")})
    assert r.status_code == 200, r.text
    assert r.json()["tiles"] == raw["tiles"]


def test_heatmap_inline_and_as_png(server: Server) -> None:
    data = part_png(3, "blob")
    body = _inspect(server.base, data, heatmap="true").json()
    png = base64.b64decode(body["heatmap_png_base64"])
    img = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (300, 300, 3)
    r = httpx.post(
        f"{server.base}/v1/inspect/heatmap", content=data, headers={"content-type": "image/png"}
    )
    assert r.status_code == 200
    assert r.headers["content-type"] == "image/png"
    assert r.headers["x-verdict"] == body["verdict"]
    assert cv2.imdecode(np.frombuffer(r.content, np.uint8), cv2.IMREAD_COLOR).shape == (300, 300, 3)


def test_batch_keeps_order_and_fails_only_the_bad_entry(server: Server) -> None:
    files = [
        ("files", ("a.png", part_png(4), "image/png")),
        ("files", ("b.txt", b"not an image", "text/plain")),
        ("files", ("c.png", part_png(5, "scratch"), "image/png")),
    ]
    r = httpx.post(f"{server.base}/v1/inspect/batch", files=files, timeout=30)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["index"] for x in results] == [0, 1, 2]
    assert [x["filename"] for x in results] == ["a.png", "b.txt", "c.png"]
    assert results[0]["result"]["tiles"] == _inspect(server.base, part_png(4)).json()["tiles"]
    assert results[1]["result"] is None and results[1]["error"]["reason"] == "unsupported_format"
    assert results[2]["result"]["verdict"] in ("defect_free", "defective")


def test_models_health_ready(server: Server) -> None:
    info = httpx.get(f"{server.base}/v1/models").json()
    assert info["provider"] == "CPUExecutionProvider"
    assert info["metadata"]["thresholds"]["eps0"] == THRESHOLDS["eps0"]
    assert len(info["metadata"]["onnx_sha256"]) == 64
    assert httpx.get(f"{server.base}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{server.base}/readyz").json() == {"status": "ready"}


def test_metrics_exposition_passes_promtool(server: Server, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool not installed (scripts/install-system-deps.sh installs it)")
    _inspect(server.base, part_png())
    _inspect(server.base, b"", "image/png")
    text = httpx.get(f"{server.base}/metrics").text
    for name in (
        "inspection_requests_total", "inspection_verdicts_total",
        "inspection_request_duration_seconds_bucket", "inspection_queue_duration_seconds_bucket",
        "inspection_inference_duration_seconds_bucket", "inspection_batch_size_bucket",
        "inspection_rejected_inputs_total", "inspection_tile_score_bucket", "inspection_model_info",
    ):  # fmt: skip
        assert f"\n{name}{{" in text, name
    assert 'inspection_rejected_inputs_total{reason="empty"} 1.0' in text
    assert 'provider="CPUExecutionProvider"' in text
    check = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_openapi_documents_the_api(server: Server) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    for path in (
        "/v1/inspect",
        "/v1/inspect/heatmap",
        "/v1/inspect/batch",
        "/v1/models",
        "/v1/models/reload",
    ):
        assert path in spec["paths"], path
    body = spec["paths"]["/v1/inspect"]["post"]["requestBody"]["content"]
    assert {"image/png", "image/jpeg", "image/bmp", "image/tiff", "multipart/form-data"} <= set(
        body
    )


# --- bad input: a clear 4xx, never a 500 -----------------------------------------------


def test_empty_body(server: Server) -> None:
    assert_api_error(_inspect(server.base, b""), 400, "empty")


def test_text_declared_as_png(server: Server) -> None:
    assert_api_error(_inspect(server.base, b"hello, world"), 400, "unsupported_format")


def test_wrong_content_type(server: Server) -> None:
    assert_api_error(
        _inspect(server.base, b'{"a": 1}', "application/json"), 415, "unsupported_media_type"
    )
    assert_api_error(_inspect(server.base, part_png(), "text/plain"), 415, "unsupported_media_type")


def test_truncated_png(server: Server) -> None:
    data = part_png()
    r = _inspect(server.base, data[: len(data) // 2])
    assert r.status_code == 400
    assert r.json()["error"]["reason"] in ("truncated", "corrupt")


def test_decompression_bomb(server: Server) -> None:
    assert_api_error(_inspect(server.base, _png_bomb(10_000, 10_000)), 400, "too_many_pixels")


def test_one_pixel_image(server: Server) -> None:
    assert_api_error(
        _inspect(server.base, encode(".png", np.zeros((1, 1, 3), np.uint8))), 400, "too_small"
    )


def test_missing_multipart_field(server: Server) -> None:
    r = httpx.post(f"{server.base}/v1/inspect", files={"image": ("a.png", part_png(), "image/png")})
    assert_api_error(r, 400, "missing_file")


def test_bad_query_parameter(server: Server) -> None:
    assert_api_error(_inspect(server.base, part_png(), heatmap="maybe"), 422, "invalid_request")


@pytest.mark.parametrize(
    ("ext", "img", "ctype"),
    [
        (".tiff", np.full((300, 300, 3), 30000, np.uint16), "image/tiff"),
        (".png", np.full((300, 300, 4), 128, np.uint8), "image/png"),
        (".jpg", np.full((600, 800, 3), 128, np.uint8), "image/jpeg"),
        (".bmp", np.full((300, 300, 3), 128, np.uint8), "image/bmp"),
    ],
    ids=["tiff16", "png-rgba", "jpeg", "bmp"],
)
def test_accepted_formats(server: Server, ext: str, img: np.ndarray, ctype: str) -> None:
    r = _inspect(server.base, encode(ext, img), ctype)
    assert r.status_code == 200, r.text


# --- colour follows the metadata ------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "img"),
    [
        (".png", np.full((300, 300), 128, np.uint8)),
        (".tiff", np.full((300, 300), 30000, np.uint16)),
        (".jpg", np.full((600, 800), 128, np.uint8)),
    ],
    ids=["png-grey", "tiff16-grey", "jpeg-grey"],
)
def test_rgb_model_refuses_a_grey_image(server: Server, ext: str, img: np.ndarray) -> None:
    r = _inspect(server.base, encode(ext, img))
    assert_api_error(r, 400, "wrong_colour")
    assert r.json()["error"]["message"] == (
        "the model inspects colour (RGB) images; this image is greyscale"
    )
    text = httpx.get(f"{server.base}/metrics").text
    assert 'inspection_rejected_inputs_total{reason="wrong_colour"}' in text


@pytest.fixture(scope="module")
def grey_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("grey-models")
    model = colour_distance_model()
    meta = metadata_for(model, "grey-toy", 1, **THRESHOLDS)  # type: ignore[arg-type]
    write_artifact(
        root / "grey-toy" / "1", model, meta.model_copy(update={"input": InputSpec(color="grey")})
    )
    with run_server(root / "grey-toy", tmp_path_factory.mktemp("grey-logs")) as s:
        yield s


def test_grey_model_takes_colour_as_its_luma(grey_server: Server) -> None:
    bgr = cv2.cvtColor(good_image(np.random.default_rng(6)), cv2.COLOR_RGB2BGR)
    colour = _inspect(grey_server.base, encode(".png", bgr))
    grey = _inspect(grey_server.base, encode(".png", cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY)))
    assert colour.status_code == 200, colour.text
    assert grey.status_code == 200, grey.text
    # The model sees the same luma either way: the same errors, tile by tile.
    assert colour.json()["image"]["error"] == pytest.approx(grey.json()["image"]["error"])
    assert [t["error"] for t in colour.json()["tiles"]] == pytest.approx(
        [t["error"] for t in grey.json()["tiles"]]
    )


# --- the codec seen against the calibrated one ----------------------------------------


def _mismatches(base: str, fmt: str) -> float:
    text = httpx.get(f"{base}/metrics").text
    line = f'inspection_codec_mismatch_images_total{{format="{fmt}",model="toy",version="1"}} '
    found = [x for x in text.splitlines() if x.startswith(line)]
    return float(found[0].split()[-1]) if found else 0.0


def test_jpeg_to_a_png_calibrated_model_is_flagged_and_counted(server: Server) -> None:
    bgr = cv2.cvtColor(good_image(np.random.default_rng(7)), cv2.COLOR_RGB2BGR)
    ok, jpeg = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, 80])
    assert ok
    before = _mismatches(server.base, "jpeg")
    r = _inspect(server.base, jpeg.tobytes(), "image/jpeg")
    assert r.status_code == 200, r.text
    assert r.json()["input"] == {
        "format": "jpeg",
        "jpeg_quality": 80,
        "calibrated_for": "png",
        "matches_calibration": False,
    }
    assert _mismatches(server.base, "jpeg") == before + 1
    png_before = _mismatches(server.base, "png")
    r = _inspect(server.base, encode(".png", bgr))
    assert r.json()["input"] == {
        "format": "png",
        "jpeg_quality": None,
        "calibrated_for": "png",
        "matches_calibration": True,
    }
    assert _mismatches(server.base, "png") == png_before == 0.0
    assert _mismatches(server.base, "jpeg") == before + 1


def test_oversized_body(models: Path, tmp_path: Path) -> None:
    with run_server(models, tmp_path, max_body_bytes="250000") as s:
        big = encode(".png", np.random.default_rng(0).integers(0, 255, (500, 500, 3), np.uint8))
        assert len(big) > 250_000 > len(part_png())
        assert_api_error(_inspect(s.base, big), 413, "payload_too_large")
        # Chunked, with no Content-Length: refused while streaming.
        r = httpx.post(f"{s.base}/v1/inspect", content=iter([big[:200_000], big[200_000:]]),
                       headers={"content-type": "image/png"})  # fmt: skip
        assert r.status_code == 413
        assert _inspect(s.base, part_png()).status_code == 200  # and the server goes on


# --- keys ------------------------------------------------------------------------------


def test_api_keys(models: Path, tmp_path: Path) -> None:
    with run_server(models, tmp_path, api_keys="key-one, key-two", admin_key="admin-key") as s:
        assert_api_error(_inspect(s.base, part_png()), 401, "missing_api_key")
        r = httpx.post(f"{s.base}/v1/inspect", content=part_png(),
                       headers={"content-type": "image/png", "x-api-key": "key-three"})  # fmt: skip
        assert_api_error(r, 403, "invalid_api_key")
        for key in ("key-one", "key-two"):  # two keys at once: rotation
            r = httpx.post(f"{s.base}/v1/inspect", content=part_png(),
                           headers={"content-type": "image/png", "x-api-key": key})  # fmt: skip
            assert r.status_code == 200, r.text
        r = httpx.get(f"{s.base}/v1/models", headers={"authorization": "Bearer key-two"})
        assert r.status_code == 200
        # A client key is no admin key, and the admin key alone is enough for
        # the admin routes; health and metrics need none.
        r = httpx.post(f"{s.base}/v1/models/reload", headers={"x-api-key": "key-one"})
        assert_api_error(r, 403, "invalid_api_key")
        r = httpx.post(f"{s.base}/v1/models/recalibrate", headers={"x-api-key": "key-one"})
        assert_api_error(r, 403, "invalid_api_key")
        r = httpx.post(f"{s.base}/v1/models/reload", headers={"x-api-key": "admin-key"})
        assert r.status_code == 200, r.text
        r = httpx.post(f"{s.base}/v1/models/recalibrate", headers={"x-api-key": "admin-key"})
        assert_api_error(r, 415, "unsupported_media_type")  # past the keys, to the body
        assert httpx.get(f"{s.base}/healthz").status_code == 200
        assert httpx.get(f"{s.base}/metrics").status_code == 200
        assert "key-one" not in s.logs() and "admin-key" not in s.logs()


# --- concurrency and overload -------------------------------------------------------------


def test_concurrent_clients_get_their_own_results(server: Server) -> None:
    images = [part_png(10 + i, "blob" if i % 2 else None) for i in range(8)]
    single = [_inspect(server.base, d).json() for d in images]

    def call(i: int) -> tuple[int, httpx.Response]:
        return i % 8, _inspect(server.base, images[i % 8])

    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(call, range(64)))
    assert all(r.status_code == 200 for _, r in answers), {r.status_code for _, r in answers}
    for i, r in answers:
        got = r.json()
        assert got["verdict"] == single[i]["verdict"]
        for a, b in zip(got["tiles"], single[i]["tiles"], strict=True):
            assert a["error"] == pytest.approx(b["error"], rel=1e-5)
    assert max(r.json()["batch_size"] for _, r in answers) > 1  # batches really formed


def test_full_queue_answers_503_with_retry_after(models: Path, tmp_path: Path) -> None:
    with run_server(models, tmp_path, max_queue="1", max_batch_size="1") as s:
        frame = encode(".jpg", np.random.default_rng(0).integers(0, 255, (900, 900, 3), np.uint8))

        def call(_: int) -> httpx.Response:
            return _inspect(s.base, frame, "image/jpeg")

        with concurrent.futures.ThreadPoolExecutor(32) as pool:
            answers = list(pool.map(call, range(96)))
        codes = [r.status_code for r in answers]
        assert set(codes) <= {200, 503}, codes
        assert 503 in codes and 200 in codes
        full = next(r for r in answers if r.status_code == 503)
        assert full.headers["retry-after"] == "1"
        assert full.json()["error"]["reason"] == "queue_full"
        assert (
            'inspection_rejected_inputs_total{reason="queue_full"}'
            in httpx.get(f"{s.base}/metrics").text
        )


# --- reload ------------------------------------------------------------------------------------


def test_reload_good_then_corrupt_keeps_serving(tmp_path: Path) -> None:
    root = tmp_path / "models"
    write_toy_artifact(root, name="toy", version=1, **THRESHOLDS)  # type: ignore[arg-type]
    with run_server(root / "toy", tmp_path, admin_key="admin") as s:
        admin = {"x-api-key": "admin"}
        write_toy_artifact(root, name="toy", version=2, eps0=5.0, tiles=(5.0,) * 9)
        r = httpx.post(f"{s.base}/v1/models/reload", headers=admin, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["version"] == 2
        assert _inspect(s.base, part_png()).json()["model"]["version"] == 2

        corrupt = write_toy_artifact(root, name="toy", version=3)
        with (corrupt / MODEL_FILE).open("ab") as f:
            f.write(b"\0")
        r = httpx.post(f"{s.base}/v1/models/reload", headers=admin, timeout=60)
        assert_api_error(r, 409, "reload_failed")
        assert "sha256 mismatch" in r.json()["error"]["message"]
        body = _inspect(s.base, part_png()).json()
        assert body["model"]["version"] == 2 and body["image"]["threshold"] == 5.0

        (corrupt / METADATA_FILE).write_text("{")  # still broken, differently
        s.proc.send_signal(signal.SIGHUP)  #: the same reload, from the operator's shell
        metrics = ""
        for _ in range(50):
            metrics = httpx.get(f"{s.base}/metrics").text
            if 'inspection_model_reloads_total{result="failure"} 2.0' in metrics:
                break
            import time

            time.sleep(0.1)
        assert 'inspection_model_reloads_total{result="failure"} 2.0' in metrics
        assert 'inspection_model_reloads_total{result="success"} 1.0' in metrics
        assert 'version="2"' in metrics and "inspection_model_info{" in metrics
        assert s.proc.poll() is None


# --- shutdown ----------------------------------------------------------------------------------


def test_sigterm_lets_in_flight_requests_finish(models: Path, tmp_path: Path) -> None:
    frame = encode(".png", np.random.default_rng(0).integers(0, 255, (2048, 2448, 3), np.uint8))
    with run_server(models, tmp_path) as s:
        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            pending = [pool.submit(_inspect, s.base, frame) for _ in range(6)]
            import time

            time.sleep(0.3)  # the uploads are in, decoding is under way
            s.proc.terminate()
            answers = [f.result() for f in pending]
        assert [r.status_code for r in answers] == [200] * 6
        # uvicorn finishes the in-flight work, then re-raises SIGTERM so the
        # exit status says why it stopped.
        assert s.proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "Finished server process" in s.logs()
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{s.base}/healthz", timeout=2)
