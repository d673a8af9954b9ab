"""Decoding and preparing posted images: every format and depth the cameras
send, and a typed refusal for everything else."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service.contract import InputSpec, Normalization
from service.preprocessing import (
    InputRejected,
    Reject,
    decode,
    denormalise,
    image_size,
    normalise,
    prepare,
    resize,
    to_rgb01,
)
from tests.helpers.synthetic import encode, encode_png, good_image


def _bgr(h: int = 300, w: int = 300, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _rejected(data: bytes, reason: Reject, **kw: object) -> InputRejected:
    with pytest.raises(InputRejected) as err:
        prepare(data, **kw)  # type: ignore[arg-type]
    assert err.value.reason == reason, err.value
    return err.value


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_each_format_decodes_to_the_model_input(ext: str) -> None:
    img = _bgr(240, 320)
    out = prepare(encode(ext, img))
    assert out.tensor.shape == (3, 300, 300)
    assert out.tensor.dtype == np.float32
    assert out.rgb.shape == (300, 300, 3) and out.rgb.dtype == np.uint8
    assert out.source_size == (320, 240)
    assert image_size(encode(ext, img))[1:] == (320, 240)


def test_header_sizes_match_decoded_sizes_for_odd_dimensions() -> None:
    img = _bgr(123, 457)
    for ext in (".png", ".jpg", ".bmp", ".tiff"):
        assert image_size(encode(ext, img))[1:] == (457, 123), ext


def test_normalisation_follows_the_spec() -> None:
    spec = InputSpec(normalization=Normalization(mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0)))
    grey = np.full((300, 300, 3), 255, np.uint8)
    t = prepare(encode(".png", grey), spec).tensor
    np.testing.assert_allclose(t[:, 0, 0], [1.0, 3.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(denormalise(t, spec), 1.0, atol=1e-6)


def test_png_round_trip_is_exact_at_model_size() -> None:
    rgb = good_image(np.random.default_rng(0))
    out = prepare(encode_png(rgb))
    np.testing.assert_array_equal(out.rgb, rgb)
    spec = InputSpec()
    np.testing.assert_allclose(out.tensor, normalise(rgb.astype(np.float32) / 255, spec), atol=1e-6)


def test_colour_order_is_rgb() -> None:
    bgr = np.zeros((300, 300, 3), np.uint8)
    bgr[..., 2] = 255  # red in OpenCV's BGR order
    out = prepare(encode(".png", bgr))
    assert out.rgb[0, 0].tolist() == [255, 0, 0]


def test_grey_is_replicated_to_three_channels() -> None:
    grey = np.full((300, 300), 128, np.uint8)
    out = prepare(encode(".png", grey))
    assert out.rgb[5, 5].tolist() == [128, 128, 128]


def test_rgba_drops_alpha() -> None:
    bgra = np.zeros((300, 300, 4), np.uint8)
    bgra[..., 1] = 200
    bgra[..., 3] = 0  # fully transparent: the colour underneath is still the part
    out = prepare(encode(".png", bgra))
    assert out.rgb[0, 0].tolist() == [0, 200, 0]


@pytest.mark.parametrize("ext", [".png", ".tiff"])
def test_sixteen_bit_is_scaled_by_its_own_range(ext: str) -> None:
    img16 = np.full((300, 300), 32768, np.uint16)
    assert decode(encode(ext, img16)).dtype == np.uint16
    out = prepare(encode(ext, img16))
    assert out.rgb[0, 0].tolist() == [128, 128, 128]


def test_sixteen_bit_rgb_tiff() -> None:
    bgr16 = np.zeros((300, 300, 3), np.uint16)
    bgr16[..., 0] = 65535  # blue
    out = prepare(encode(".tiff", bgr16))
    assert out.rgb[0, 0].tolist() == [0, 0, 255]


def test_large_frame_is_shrunk_with_area_filter() -> None:
    # A one-pixel line in a 3000-wide frame survives area averaging as a faint
    # line; nearest-neighbour would drop it or keep it at full strength.
    frame = np.zeros((3000, 3000), np.uint8)
    frame[:, 1500] = 255
    out = prepare(encode(".png", frame))
    column = out.rgb[:, 150, 0]
    assert 20 <= column.min() <= column.max() <= 30  # 255 / 10, rounded


def test_empty_body() -> None:
    _rejected(b"", Reject.EMPTY)


@pytest.mark.parametrize("data", [b"hello, world", b"GIF89a" + b"\0" * 100, b"%PDF-1.7\n"])
def test_not_an_image(data: bytes) -> None:
    _rejected(data, Reject.UNSUPPORTED_FORMAT)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_truncated_files(ext: str) -> None:
    data = encode(ext, _bgr())
    for cut in (len(data) // 2, len(data) - 3):
        with pytest.raises(InputRejected) as err:
            prepare(data[:cut])
        assert err.value.reason in (Reject.TRUNCATED, Reject.CORRUPT), (ext, cut)


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_cut_inside_the_header(ext: str) -> None:
    data = encode(ext, _bgr())
    _rejected(data[:12], Reject.TRUNCATED)


def test_png_cut_before_its_end_chunk_is_truncated() -> None:
    data = encode_png(good_image(np.random.default_rng(0)))
    _rejected(data[:-12], Reject.TRUNCATED)


def test_corrupt_png_body() -> None:
    data = bytearray(encode_png(good_image(np.random.default_rng(0))))
    data[100:400] = b"\xff" * 300
    _rejected(bytes(data), Reject.CORRUPT)


def _png_bomb(width: int, height: int) -> bytes:
    """A real, valid PNG of zeros that inflates to width*height bytes."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    z = zlib.compressobj(9)
    row = b"\0" * (width + 1)  # filter byte + grey pixels
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_from_its_header() -> None:
    bomb = _png_bomb(10_000, 10_000)  # 100 MP of zeros in about 100 kB
    assert len(bomb) < 200_000
    err = _rejected(bomb, Reject.TOO_MANY_PIXELS, max_pixels=40_000_000)
    assert "10000x10000" in err.message


def test_pixel_budget_is_configurable() -> None:
    data = encode(".png", _bgr(400, 400))
    _rejected(data, Reject.TOO_MANY_PIXELS, max_pixels=100_000)
    assert prepare(data, max_pixels=160_000).tensor.shape == (3, 300, 300)


@pytest.mark.parametrize(("h", "w"), [(1, 1), (99, 300), (300, 99)])
def test_smaller_than_one_tile(h: int, w: int) -> None:
    err = _rejected(encode(".png", _bgr(h, w)), Reject.TOO_SMALL)
    assert "100x100" in err.message


def test_exactly_one_tile_is_enough() -> None:
    assert prepare(encode(".png", _bgr(100, 100))).tensor.shape == (3, 300, 300)


def test_header_lying_about_size_is_corrupt() -> None:
    data = bytearray(encode(".png", _bgr(300, 300)))
    data[16:24] = struct.pack(">II", 200, 200)  # IHDR says 200x200; CRC now wrong too
    with pytest.raises(InputRejected) as err:
        prepare(bytes(data))
    assert err.value.reason == Reject.CORRUPT


def test_large_jpeg_is_decoded_scaled_down_like_the_area_filter() -> None:
    rng = np.random.default_rng(0)
    small = cv2.cvtColor(good_image(rng), cv2.COLOR_RGB2BGR)
    big = cv2.resize(small, (2400, 2400), interpolation=cv2.INTER_LINEAR)
    data = encode(".jpg", big)
    assert decode(data, target=(300, 300)).shape == (300, 300, 3)  # 1/8 in the DCT domain
    assert decode(data, target=(1000, 1000)).shape == (1200, 1200, 3)  # 1/2
    assert decode(data).shape == (2400, 2400, 3)
    out = prepare(data)
    assert out.source_size == (2400, 2400)
    full = cv2.resize(decode(data), (300, 300), interpolation=cv2.INTER_AREA)
    reference = cv2.cvtColor(full, cv2.COLOR_BGR2RGB).astype(np.float32)
    assert np.abs(out.rgb.astype(np.float32) - reference).mean() < 2.0  # grey levels


@pytest.mark.parametrize("shape", [(300, 300), (300, 300, 3), (300, 300, 4), (640, 480, 3)])
def test_eight_bit_lookup_equals_the_float_path_bit_for_bit(shape: tuple[int, ...]) -> None:
    spec = InputSpec(normalization=Normalization(mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3)))
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = prepare(encode(".png", img), spec)
    rgb01 = to_rgb01(resize(img, spec.width, spec.height))
    np.testing.assert_array_equal(got.tensor, normalise(rgb01, spec))
    np.testing.assert_array_equal(got.rgb, (rgb01 * 255.0 + 0.5).astype(np.uint8))
    assert got.tensor.dtype == np.float32 and got.tensor.flags.c_contiguous
