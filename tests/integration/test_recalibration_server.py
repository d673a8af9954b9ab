"""Recalibration from the line against a real server: POST /v1/models/recalibrate
on a toy model, and the CLI on a copy of the real default model followed by
a SIGHUP reload, with real MVTec AD bottle images where they are available."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.artifact import resolve_version_dir
from service.contract import METADATA_FILE, MODEL_FILE
from service.settings import DEFAULT_MODEL_DIR
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.server import Server, assert_api_error, run_server
from tests.helpers.synthetic import part_png

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLE_GOOD = DATASETS / "mvtec_ad" / "bottle" / "train" / "good"
ADMIN = "plant-admin"
PARTS = [part_png(seed) for seed in range(30)]


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root, name="toy", version=1, eps0=3.0, tiles=(3.0,) * 9)
    return root / "toy"


@pytest.fixture(scope="module")
def server(models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    with run_server(models, tmp_path_factory.mktemp("logs"), admin_key=ADMIN) as s:
        yield s


def _files(model_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(model_dir)): p.read_bytes() for p in model_dir.rglob("*") if p.is_file()
    }


def _recalibrate(
    server: Server,
    images: list[bytes],
    key: str | None = ADMIN,
    names: list[str] | None = None,
    **fields: str,
) -> httpx.Response:
    names = names or [f"part-{i:03d}.png" for i in range(len(images))]
    files = [("files", (n, d, "image/png")) for n, d in zip(names, images, strict=True)]
    data = {"operator": "J. Smith", **fields}
    headers = {"x-api-key": key} if key else {}
    return httpx.post(
        f"{server.base}/v1/models/recalibrate",
        files=files,
        data=data,
        headers=headers,
        timeout=120,
    )


def test_refusals_answer_in_the_error_envelope_and_write_nothing(
    server: Server, models: Path
) -> None:
    before = _files(models)
    assert_api_error(_recalibrate(server, PARTS, key=None), 401, "missing_api_key")
    assert_api_error(_recalibrate(server, PARTS, key="wrong"), 403, "invalid_api_key")
    r = _recalibrate(server, PARTS[:5] * 4)  # 20 files, 5 distinct
    assert_api_error(r, 400, "too_few_images")
    assert "5 distinct images (15 exact duplicates dropped)" in r.json()["error"]["message"]
    names = [f"part-{i:03d}.png" for i in range(12)]
    r = _recalibrate(server, [*PARTS[:11], PARTS[11][:700]], names=names)
    assert_api_error(r, 400, "invalid_image")
    assert "part-011.png" in r.json()["error"]["message"]
    assert_api_error(_recalibrate(server, PARTS, codec="gif:3"), 400, "invalid_codec")
    assert_api_error(_recalibrate(server, PARTS, target_fpr="1.5"), 400, "invalid_target")
    assert_api_error(_recalibrate(server, PARTS, target_fpr="often"), 400, "invalid_target")
    # found by schemathesis: the smallest float overflowed 1/target into a 500
    assert_api_error(_recalibrate(server, PARTS, target_fpr="5e-324"), 400, "invalid_target")
    assert_api_error(_recalibrate(server, PARTS, operator=" "), 400, "invalid_operator")
    r = httpx.post(
        f"{server.base}/v1/models/recalibrate",
        content=PARTS[0],
        headers={"x-api-key": ADMIN, "content-type": "image/png"},
    )
    assert_api_error(r, 415, "unsupported_media_type")
    assert _files(models) == before
    info = httpx.get(f"{server.base}/v1/models").json()
    assert info["version"] == 1


def test_recalibrate_writes_and_serves_the_next_version(server: Server, models: Path) -> None:
    old_info = httpx.get(f"{server.base}/v1/models").json()
    old_files = _files(models / "1")
    r = _recalibrate(server, [*PARTS, PARTS[0]], target_fpr="0.05")
    assert r.status_code == 200, r.text
    body = r.json()
    summary = body["calibration"]
    assert body["model"]["version"] == 2
    assert summary["images"] == 30 and summary["duplicates_dropped"] == 1
    assert summary["parent_version"] == 1 and summary["codec"] == "png"
    assert summary["promised_fpr"] <= 0.05 and summary["warning"] is None
    assert summary["old_thresholds"] == [3.0] * 10
    assert summary["new_thresholds"] != summary["old_thresholds"]

    # The server now serves it: same graph, new thresholds, the line's record.
    info = httpx.get(f"{server.base}/v1/models").json()
    meta = info["metadata"]
    assert info["version"] == 2 and info["path"].endswith("/2")
    assert meta["onnx_sha256"] == old_info["metadata"]["onnx_sha256"]
    assert meta["thresholds"]["eps0"] == summary["new_thresholds"][0]
    assert meta["calibration"]["source"] == "line"
    assert meta["calibration"]["operator"] == "J. Smith"
    assert meta["calibration"]["holdout_images"] == 30
    assert meta["evaluation"] is None
    onnx = (models / "2" / MODEL_FILE).read_bytes()
    assert hashlib.sha256(onnx).hexdigest() == meta["onnx_sha256"]
    # The parent stays as it was, for a rollback.
    assert _files(models / "1") == old_files
    # Inspections go to the new version.
    r = httpx.post(
        f"{server.base}/v1/inspect", content=PARTS[3], headers={"content-type": "image/png"}
    )
    assert r.status_code == 200 and r.json()["model"]["version"] == 2


def test_openapi_documents_the_form(server: Server) -> None:
    spec = httpx.get(f"{server.base}/openapi.json").json()
    op = spec["paths"]["/v1/models/recalibrate"]["post"]
    schema = op["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert set(schema["required"]) == {"files", "operator"}


# --- the CLI on the real default model, then SIGHUP ------------------------------------


def test_cli_on_real_bottle_images_then_sighup(tmp_path: Path) -> None:
    if not BOTTLE_GOOD.is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATASETS} (set INSPECTION_DATASETS)")
    served = resolve_version_dir(DEFAULT_MODEL_DIR)
    model_dir = tmp_path / "models" / DEFAULT_MODEL_DIR.name
    model_dir.mkdir(parents=True)
    shutil.copytree(served, model_dir / served.name)
    parent_files = _files(model_dir / served.name)
    images = sorted(BOTTLE_GOOD.glob("*.png"))[-24:]
    assert len(images) == 24

    with run_server(model_dir, tmp_path) as server:
        before = httpx.get(f"{server.base}/v1/models").json()
        assert before["version"] == int(served.name)
        cmd = [
            sys.executable, "-m", "service.recalibrate", "--model-dir", str(model_dir),
            "--images", *map(str, images), "--operator", "line 3 QA", "--target-fpr", "0.05",
        ]  # fmt: skip
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        new_version = int(served.name) + 1
        assert f"version {new_version}" in done.stdout and "24 distinct" in done.stdout

        server.proc.send_signal(signal.SIGHUP)
        deadline = time.monotonic() + 60
        info = before
        while time.monotonic() < deadline and info["version"] != new_version:
            time.sleep(0.5)
            info = httpx.get(f"{server.base}/v1/models").json()
        assert info["version"] == new_version, server.logs()
        meta, old = info["metadata"], before["metadata"]
        assert meta["onnx_sha256"] == old["onnx_sha256"]
        assert meta["thresholds"] != old["thresholds"]
        assert meta["calibration"]["source"] == "line"
        assert meta["calibration"]["parent_version"] == int(served.name)
        assert meta["calibration"]["holdout_images"] == 24
        assert meta["training_data"] == old["training_data"]
        # Inspections go to the new version.
        r = httpx.post(
            f"{server.base}/v1/inspect",
            content=images[0].read_bytes(),
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200 and r.json()["model"]["version"] == new_version
    assert _files(model_dir / served.name) == parent_files
    assert (model_dir / str(new_version) / METADATA_FILE).is_file()


def _served_version(server: Server) -> int:
    return int(httpx.get(f"{server.base}/v1/models", timeout=10).json()["version"])


def _wait_for_version(server: Server, version: int, seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _served_version(server) == version:
            return
        time.sleep(0.2)
    raise AssertionError(f"still serving {_served_version(server)}, not {version}: {server.logs()}")


def test_a_polling_server_serves_a_recalibration_without_a_signal_and_rolls_back(
    tmp_path: Path,
) -> None:
    root = tmp_path / "models"
    write_toy_artifact(root, name="toy", version=1, eps0=3.0, tiles=(3.0,) * 9)
    model_dir = root / "toy"
    images = tmp_path / "good"
    images.mkdir()
    for i, data in enumerate(PARTS[:20]):
        (images / f"part-{i:02d}.png").write_bytes(data)
    with run_server(model_dir, tmp_path, model_poll_s="0.2") as server:
        assert _served_version(server) == 1
        cli = [sys.executable, "-m", "service.recalibrate", "--model-dir", str(model_dir),
               "--images", str(images), "--operator", "J. Smith"]  # fmt: skip
        done = subprocess.run(cli, cwd=REPO, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        _wait_for_version(server, 2)
        # A broken newer version: the served one stays, and the failure is
        # reported once, not on every poll.
        broken = model_dir / "3"
        shutil.copytree(model_dir / "2", broken)
        (broken / MODEL_FILE).write_bytes(b"not a graph")
        time.sleep(2.0)  # ten polls
        assert _served_version(server) == 2
        metrics = httpx.get(f"{server.base}/metrics", timeout=10).text
        assert 'inspection_model_reloads_total{result="failure"} 1.0' in metrics
        # Rolling back is removing versions: the server follows the newest.
        shutil.rmtree(broken)
        shutil.rmtree(model_dir / "2")
        _wait_for_version(server, 1)
        r = httpx.post(
            f"{server.base}/v1/inspect",
            content=PARTS[0],
            headers={"content-type": "image/png"},
            timeout=30,
        )
        assert r.status_code == 200 and r.json()["model"]["version"] == 1
