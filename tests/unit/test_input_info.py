"""The inspect response's ``input`` field: the codec seen against the calibrated one."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.codec import detect_codec
from service.contract import Codec
from service.schemas import InputInfo
from tests.helpers.synthetic import encode


@pytest.mark.parametrize(
    ("seen", "calibrated", "fmt", "quality", "calibrated_for", "matches"),
    [
        (Codec(format="png"), Codec(format="png"), "png", None, "png", True),
        (Codec(format="jpeg", quality=90), Codec(format="png"), "jpeg", 90, "png", False),
        (Codec(format="png"), Codec(format="jpeg", quality=90), "png", None, "jpeg:90", False),
        (Codec(format="jpeg", quality=88), Codec.parse("jpeg:90"), "jpeg", 88, "jpeg:90", True),
        (Codec(format="jpeg", quality=60), Codec.parse("jpeg:90"), "jpeg", 60, "jpeg:90", False),
        (Codec(format="jpeg"), Codec.parse("jpeg:90"), "jpeg", None, "jpeg:90", True),
        (Codec(format="bmp"), Codec(format="tiff"), "bmp", None, "tiff", False),
        (None, Codec(format="png"), "unknown", None, "png", False),
    ],
)
def test_input_info_judges_the_codec(
    seen: Codec | None,
    calibrated: Codec,
    fmt: str,
    quality: int | None,
    calibrated_for: str,
    matches: bool,
) -> None:
    info = InputInfo.judge(seen, calibrated)
    assert info.model_dump() == {
        "format": fmt,
        "jpeg_quality": quality,
        "calibrated_for": calibrated_for,
        "matches_calibration": matches,
    }


def test_input_info_of_real_jpeg_bytes() -> None:
    img = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 75])
    assert ok
    info = InputInfo.judge(detect_codec(buf.tobytes()), Codec.parse("jpeg:75"))
    assert (info.format, info.jpeg_quality, info.matches_calibration) == ("jpeg", 75, True)
    png = InputInfo.judge(detect_codec(encode(".png", img)), Codec.parse("jpeg:75"))
    assert (png.format, png.matches_calibration) == ("png", False)
