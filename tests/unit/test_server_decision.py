"""The threshold rule, the heatmap and the settings, without a server."""

from __future__ import annotations

import numpy as np
import pytest

from service.contract import Thresholds
from service.decision import DEFECT_FREE, DEFECTIVE, decide
from service.heatmap import overlay, to_png
from service.settings import Settings

EPS = Thresholds(eps0=2.0, tiles=(1.0,) * 9)


def test_all_under_threshold_is_defect_free() -> None:
    d = decide(1.0, np.full(9, 0.5), EPS)
    assert d.verdict == DEFECT_FREE
    assert d.defective_tiles == ()
    assert d.image_score == 0.5


def test_at_the_threshold_is_still_defect_free() -> None:
    # The paper's rule: defect-free only if e0 <= eps0 and every ek <= epsk.
    assert decide(2.0, np.full(9, 1.0), EPS).verdict == DEFECT_FREE


def test_one_tile_over_makes_the_image_defective() -> None:
    tiles = np.full(9, 0.5)
    tiles[4] = 1.01
    d = decide(0.1, tiles, EPS)
    assert d.verdict == DEFECTIVE
    assert d.defective_tiles == (5,)  # 1-based: the centre tile
    assert d.tile_scores[4] == pytest.approx(1.01)


def test_whole_image_over_alone_makes_it_defective() -> None:
    d = decide(2.5, np.full(9, 0.1), EPS)
    assert d.verdict == DEFECTIVE and d.defective_tiles == ()


def test_tile_count_must_match() -> None:
    with pytest.raises(ValueError, match="8 tile errors for 9 thresholds"):
        decide(0.1, np.zeros(8), EPS)


def test_overlay_marks_defective_tiles_red() -> None:
    rgb = np.full((300, 300, 3), 128, np.uint8)
    amap = np.zeros((300, 300), np.float32)
    amap[100:200, 100:200] = 10.0
    out = overlay(rgb, amap, threshold=1.0, defective_tiles=(5,))
    assert out.shape == (300, 300, 3) and out.dtype == np.uint8
    border = out[101, 150]  # on tile 5's thick outline
    assert border[0] == 255 and border[1] == 0 and border[2] == 0
    inside_hot = out[150, 150].astype(int)
    cold = out[50, 50].astype(int)
    assert inside_hot[0] > cold[0] and inside_hot[2] < cold[2]  # red where the error is
    assert to_png(out).startswith(b"\x89PNG")


def test_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSPECTION_API_KEYS", "key-a, key-b,,key-c")
    monkeypatch.setenv("INSPECTION_PROVIDERS", "CPUExecutionProvider")
    monkeypatch.setenv("INSPECTION_PORT", "9001")
    monkeypatch.setenv("INSPECTION_INTRA_OP_SPINNING", "true")
    s = Settings()
    assert s.intra_op_spinning is True
    assert [k.get_secret_value() for k in s.api_keys] == ["key-a", "key-b", "key-c"]
    assert s.providers == ("CPUExecutionProvider",)
    assert s.port == 9001
    assert "key-a" not in repr(s)  # keys never print


def test_settings_defaults_serve_the_embedded_model(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "INSPECTION_HOST",
        "INSPECTION_PORT",
        "INSPECTION_MODEL_DIR",
        "INSPECTION_API_KEYS",
    ):
        monkeypatch.delenv(name, raising=False)
    s = Settings(_env_file=None)  # type: ignore[call-arg]
    assert (s.host, s.port) == ("127.0.0.1", 8000)
    assert s.model_dir.parts[-2:] == ("models", "bottle-pwae")
    assert s.api_keys == ()
    assert s.providers[0] == "CUDAExecutionProvider"  # CUDA first where onnxruntime has it
    assert s.intra_op_spinning is False  # the cores are shared with decoding and HTTP


def test_score_is_the_largest_of_image_and_tile_scores() -> None:
    # The rule's one number (service.calibration.rule_score): above 1 is defective.
    tiles = np.full(9, 0.5)
    tiles[2] = 0.9
    d = decide(1.0, tiles, EPS)  # image 0.5, tile 3 0.9
    assert d.score == pytest.approx(0.9) and d.verdict == DEFECT_FREE
    d = decide(3.0, tiles, EPS)  # image 1.5 beats every tile
    assert d.score == pytest.approx(1.5) and d.verdict == DEFECTIVE
    d = decide(2.0, np.full(9, 1.0), EPS)  # exactly at the threshold: still good
    assert d.score == 1.0 and d.verdict == DEFECT_FREE
