"""The embedded default model through HTTP gives the offline evaluation's
verdicts on real MVTec AD bottle test images."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from service.artifact import resolve_version_dir
from tests.helpers.server import Server, run_server

REPO = Path(__file__).resolve().parents[2]
DATASETS = Path(os.environ.get("INSPECTION_DATASETS", REPO.parent / "shared" / "datasets"))
BOTTLE = DATASETS / "mvtec_ad" / "bottle"
DEFAULT_MODEL = REPO / "models" / "bottle-pwae"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    if not (BOTTLE / "test").is_dir():
        pytest.skip(f"MVTec AD bottle not found under {DATASETS} (set INSPECTION_DATASETS)")
    with run_server(DEFAULT_MODEL, tmp_path_factory.mktemp("logs")) as s:
        yield s


def _offline() -> list[dict[str, object]]:
    path = resolve_version_dir(DEFAULT_MODEL) / "evaluation.json"
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def test_http_verdicts_equal_offline_verdicts(server: Server) -> None:
    records = _offline()
    good = [r for r in records if r["label"] == "defect_free"]
    bad = [r for r in records if r["label"] == "defective"]
    # Both verdicts on both kinds of part, where the offline run had them.
    chosen = good[:4] + bad[:6]
    chosen += [r for r in records if r["verdict"] != r["label"]][:3]
    assert {r["verdict"] for r in chosen} == {"defect_free", "defective"}
    for rec in chosen:
        data = (BOTTLE / str(rec["image"])).read_bytes()
        r = httpx.post(
            f"{server.base}/v1/inspect",
            content=data,
            headers={"content-type": "image/png"},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["verdict"] == rec["verdict"], rec["image"]
        assert body["image"]["error"] == pytest.approx(rec["e0"], rel=1e-3, abs=1e-6)
        tiles = [t["error"] for t in body["tiles"]]
        assert tiles == pytest.approx(rec["tile_errors"], rel=1e-3, abs=1e-6)


def test_the_default_model_is_served_with_its_metadata(server: Server) -> None:
    info = httpx.get(f"{server.base}/v1/models").json()
    assert info["family"] == "pwae"
    meta = info["metadata"]
    assert meta["training_data"]["category"] == "bottle"
    assert meta["evaluation"]["metrics"]["image_auroc"] > 0.5
    cal = meta["calibration"]
    assert cal["target_fpr"] == 0.01
    # Calibrated with a promise on new good parts: --holdout auto held out
    # the 99 of 209 good bottles a 1% promise needs, which the record says,
    # with the scales it used.
    assert cal["method"] == "conformal-max-normalised-error"
    assert cal["holdout_images"] == cal["images_for_target"] == 99
    assert cal["promised_fpr"] == pytest.approx(0.01)
    assert meta["training_data"]["train_images"] == 110
    eps = [meta["thresholds"]["eps0"], *meta["thresholds"]["tiles"]]
    assert eps == pytest.approx([cal["score_threshold"] * s for s in cal["scales"]])
