"""The drift metrics: the rule score of good parts, the count of good parts near
the threshold, and the calibration reference of the version in service.

A real app (TestClient) serves the toy colour-distance graph of
tests/helpers/onnx_models.py through onnxruntime. A uniform grey image has the
same error e(v) on the whole image and on every tile, so the thresholds alone
decide which score is the largest and where it lies.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pydantic import ValidationError

from service.app import create_app
from service.contract import Normalization
from service.settings import Settings
from tests.helpers.onnx_models import write_toy_artifact
from tests.helpers.synthetic import encode_png

ADMIN = "admin-key-for-tests"
NEAR, FAR, BAD = 200, 180, 255  # grey levels


def grey_error(level: int) -> float:
    """The toy graph's error of a uniform grey image: mean squared normalised value."""
    norm = Normalization()
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    x = (np.float32(level) / np.float32(255) - mean) / std
    return float((x * x).mean())


E = grey_error(NEAR)
# Image score e/(3E), tiles e/(1.5E), but tile 5 e/(E/0.9): the rule's score of
# a grey-200 image is 0.9, set by tile 5, while its whole-image score is 0.33.
EPS0 = 3 * E
TILES = (1.5 * E,) * 4 + (E / 0.9,) + (1.5 * E,) * 4


def expected_score(level: int) -> float:
    return 0.9 * grey_error(level) / E


def png(level: int) -> bytes:
    return encode_png(np.full((300, 300, 3), level, np.uint8))


def samples(client: TestClient) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, keyed by (name, sorted labels)."""
    text = client.get("/metrics").text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    return metrics.get((name, tuple(sorted(labels.items()))))


def serve(model_dir: Path, **settings: object) -> TestClient:
    app = create_app(
        Settings(model_dir=model_dir, providers=("CPUExecutionProvider",), **settings)  # type: ignore[arg-type]
    )
    return TestClient(app)


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    write_toy_artifact(tmp_path, name="toy", version=1, eps0=EPS0, tiles=TILES)
    return tmp_path / "toy"


def inspect(client: TestClient, level: int) -> dict[str, object]:
    r = client.post("/v1/inspect", content=png(level), headers={"content-type": "image/png"})
    assert r.status_code == 200, r.text
    body: dict[str, object] = r.json()
    return body


def test_the_images_score_where_the_test_needs_them() -> None:
    # The premises of the tests below, so a change of the toy graph shows here.
    assert expected_score(FAR) < 0.8 <= expected_score(NEAR) < 1.0 < expected_score(BAD)
    assert grey_error(NEAR) / EPS0 < 0.8


@pytest.mark.parametrize(("near", "counted"), [(0.8, 1), (0.5, 3), (0.95, 0)])
def test_good_scores_and_near_threshold_images_are_recorded(
    toy: Path, near: float, counted: int
) -> None:
    with serve(toy, near_threshold=near) as client:
        answers = [inspect(client, level) for level in (NEAR, FAR, BAD, FAR)]
        m = samples(client)
    verdicts = [a["verdict"] for a in answers]
    assert verdicts == ["defect_free", "defect_free", "defective", "defect_free"]
    # the response's own scores: the rule's score is the largest, here tile 5's
    near_answer = answers[0]
    tile_scores = [t["score"] for t in near_answer["tiles"]]  # type: ignore[attr-defined]
    assert max(tile_scores) == pytest.approx(0.9, rel=1e-4)
    assert near_answer["image"]["score"] == pytest.approx(0.3, abs=0.04)  # type: ignore[index]

    labels = {"model": "toy", "version": "1"}
    # only the three defect-free images, each with its rule score (not e0/eps0)
    assert value(m, "inspection_good_score_count", **labels) == 3
    total = expected_score(NEAR) + 2 * expected_score(FAR)
    assert value(m, "inspection_good_score_sum", **labels) == pytest.approx(total, rel=1e-4)
    assert value(m, "inspection_good_score_bucket", **labels, le="0.5") == 0
    assert value(m, "inspection_good_score_bucket", **labels, le="0.55") == 2  # the two FAR
    assert value(m, "inspection_good_score_bucket", **labels, le="0.85") == 2
    assert value(m, "inspection_good_score_bucket", **labels, le="0.95") == 3
    assert value(m, "inspection_good_score_bucket", **labels, le="+Inf") == 3
    assert value(m, "inspection_near_threshold_images_total", **labels) == counted
    # the defective image went to the verdicts, not to the good scores
    assert value(m, "inspection_verdicts_total", **labels, verdict="defective") == 1


def test_series_exist_at_zero_before_the_first_good_part(toy: Path) -> None:
    # so that rates and the near-threshold share read 0, not "no data"
    with serve(toy) as client:
        inspect(client, BAD)
        m = samples(client)
    labels = {"model": "toy", "version": "1"}
    assert value(m, "inspection_good_score_count", **labels) == 0
    assert value(m, "inspection_near_threshold_images_total", **labels) == 0


def test_reference_score_follows_the_version_in_service(tmp_path: Path) -> None:
    root, toy = tmp_path, tmp_path / "toy"
    write_toy_artifact(root, name="toy", version=1, reference_score=0.4)
    with serve(toy, admin_key=ADMIN) as client:
        m = samples(client)
        assert value(m, "inspection_calibration_reference_score", model="toy", version="1") == (
            pytest.approx(0.4)
        )

        write_toy_artifact(root, name="toy", version=2, reference_score=0.6)
        r = client.post("/v1/models/reload", headers={"x-api-key": ADMIN})
        assert r.status_code == 200, r.text
        m = samples(client)
        refs = {k: v for k, v in m.items() if k[0] == "inspection_calibration_reference_score"}
        assert refs == {
            (
                "inspection_calibration_reference_score",
                (("model", "toy"), ("version", "2")),
            ): pytest.approx(0.6)
        }

        # an artifact calibrated without a reference: no gauge at all
        write_toy_artifact(root, name="toy", version=3, reference_score=None)
        r = client.post("/v1/models/reload", headers={"x-api-key": ADMIN})
        assert r.status_code == 200, r.text
        m = samples(client)
        assert not [k for k in m if k[0] == "inspection_calibration_reference_score"]
        info = [k for k in m if k[0] == "inspection_model_info"]
        assert len(info) == 1 and ("version", "3") in info[0][1]


@pytest.mark.parametrize("bad", ["0", "1", "1.5", "-0.2"])
def test_near_threshold_setting_must_lie_strictly_between_0_and_1(
    monkeypatch: pytest.MonkeyPatch, bad: str
) -> None:
    monkeypatch.setenv("INSPECTION_NEAR_THRESHOLD", bad)
    with pytest.raises(ValidationError, match="near_threshold"):
        Settings()


def test_near_threshold_setting_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSPECTION_NEAR_THRESHOLD", raising=False)
    assert Settings().near_threshold == 0.8
    monkeypatch.setenv("INSPECTION_NEAR_THRESHOLD", "0.9")
    assert Settings().near_threshold == 0.9
