"""The server serves the committed OT-prototype artifact, with no change to service/."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.artifact import resolve_version_dir
from service.settings import Settings

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
MODEL = REPO / "models" / "bottle-otproto"


@pytest.mark.slow
def test_server_flags_a_broken_bottle_with_the_ot_model() -> None:
    broken = DATASETS / "mvtec_ad" / "bottle" / "test" / "broken_large"
    if not broken.is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATASETS} (set INSPECTION_DATASETS)")
    image = sorted(broken.glob("*.png"))[0].read_bytes()
    app = create_app(Settings(model_dir=MODEL, providers=("CPUExecutionProvider",)))
    with TestClient(app) as client:
        r = client.post(
            "/v1/inspect", content=image, headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        newest = int(resolve_version_dir(MODEL).name)
        assert body["model"] == {
            "name": "bottle-otproto", "version": newest, "family": "ot_prototypes"
        }  # fmt: skip
        assert body["verdict"] == "defective"
        assert body["defective_tiles"]
        assert len(body["tiles"]) == 9
        heat = client.post(
            "/v1/inspect/heatmap",
            content=image,
            headers={"Content-Type": "application/octet-stream"},
        )
        assert heat.status_code == 200
        assert heat.content.startswith(b"\x89PNG")
