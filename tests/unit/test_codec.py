"""The camera's codec: read from the file, and applied as the camera would."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from service.codec import apply_codec, detect_codec, jpeg_quality, same_codec
from service.contract import Codec
from tests.helpers.synthetic import encode_png, good_image


def _png() -> bytes:
    return encode_png(good_image(np.random.default_rng(0)))


@pytest.mark.parametrize("quality", [10, 49, 50, 75, 90, 92, 100])
def test_the_jpeg_quality_is_read_back_from_its_table(quality: int) -> None:
    jpeg = apply_codec(_png(), Codec(format="jpeg", quality=quality))
    assert jpeg.startswith(b"\xff\xd8\xff")
    assert jpeg_quality(jpeg) == quality
    assert detect_codec(jpeg) == Codec(format="jpeg", quality=quality)


def test_a_table_no_libjpeg_quality_makes_is_unknown() -> None:
    jpeg = bytearray(apply_codec(_png(), Codec(format="jpeg", quality=90)))
    at = jpeg.index(b"\xff\xdb") + 5  # the first table's values
    jpeg[at : at + 64] = bytes(range(1, 65))  # a table of another encoder
    assert jpeg_quality(bytes(jpeg)) is None
    assert detect_codec(bytes(jpeg)) == Codec(format="jpeg")


def test_formats_are_told_apart() -> None:
    img = good_image(np.random.default_rng(1))
    for ext, fmt in ((".png", "png"), (".bmp", "bmp"), (".tiff", "tiff")):
        ok, enc = cv2.imencode(ext, img)
        assert ok
        assert detect_codec(enc.tobytes()) == Codec(format=fmt)
    assert detect_codec(b"GIF89a....") is None


def test_lossless_codecs_leave_the_image_as_it_is() -> None:
    png = _png()
    assert apply_codec(png, Codec(format="png")) is png
    assert apply_codec(png, Codec(format="tiff")) is png


def test_jpeg_changes_the_pixels_by_the_quality() -> None:
    png = _png()
    src = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR).astype(np.float32)

    def err(q: int) -> float:
        jpeg = apply_codec(png, Codec(format="jpeg", quality=q))
        return float(np.abs(cv2.imdecode(np.frombuffer(jpeg, np.uint8), 1) - src).mean())

    assert 0 < err(95) < err(75) < err(30)


def test_16_bit_images_are_scaled_down_for_jpeg() -> None:
    img = (np.linspace(0, 65535, 64 * 64 * 3).reshape(64, 64, 3)).astype(np.uint16)
    ok, png16 = cv2.imencode(".png", img)
    assert ok
    jpeg = apply_codec(png16.tobytes(), Codec(format="jpeg", quality=95))
    back = cv2.imdecode(np.frombuffer(jpeg, np.uint8), cv2.IMREAD_UNCHANGED)
    assert back.dtype == np.uint8
    assert abs(float(back.mean()) - float(img.mean()) / 257) < 2


def test_matching_the_calibrated_codec() -> None:
    jpeg90 = Codec(format="jpeg", quality=90)
    assert same_codec(Codec(format="jpeg", quality=92), jpeg90)
    assert not same_codec(Codec(format="jpeg", quality=75), jpeg90)
    assert not same_codec(Codec(format="png"), jpeg90)
    assert not same_codec(Codec(format="jpeg", quality=90), Codec(format="png"))
    assert same_codec(Codec(format="jpeg"), jpeg90)  # another encoder's tables
    assert not same_codec(None, Codec(format="png"))


@pytest.mark.parametrize(
    ("text", "codec"),
    [("png", Codec(format="png")), ("JPG:90", Codec(format="jpeg", quality=90)),
     ("tif", Codec(format="tiff")), ("jpeg", Codec(format="jpeg"))],
)  # fmt: skip
def test_codec_strings(text: str, codec: Codec) -> None:
    assert Codec.parse(text) == codec
    assert Codec.parse(str(codec)) == codec


@pytest.mark.parametrize("text", ["gif", "png:90", "jpeg:0", "jpeg:101", "jpeg:high"])
def test_bad_codec_strings_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        Codec.parse(text)
