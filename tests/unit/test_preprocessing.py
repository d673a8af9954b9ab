"""Decoding and preparing posted images: every format and depth the cameras
send, and a typed refusal for everything else."""

from __future__ import annotations

import struct
import zlib

import cv2
import numpy as np
import pytest

from service.codec import detect_codec
from service.contract import InputSpec, Normalization
from service.image_header import image_size
from service.preprocessing import (
    as_input_colour,
    decode,
    denormalise,
    is_greyscale,
    normalise,
    prepare,
    resize,
    to_rgb01,
)
from service.rejection import InputRejected, Reject
from tests.helpers.synthetic import encode, encode_png, good_image

GREY = InputSpec(color="grey")


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
    out = prepare(encode(".png", grey), GREY)
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
    out = prepare(encode(ext, img16), GREY)
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
    out = prepare(encode(".png", frame), GREY)
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
    spec = InputSpec(
        color="grey" if len(shape) == 2 else "RGB",
        normalization=Normalization(mean=(0.3, 0.5, 0.7), std=(0.2, 0.25, 0.3)),
    )
    img = np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8)
    got = prepare(encode(".png", img), spec)
    rgb01 = to_rgb01(resize(img, spec.width, spec.height))
    np.testing.assert_array_equal(got.tensor, normalise(rgb01, spec))
    np.testing.assert_array_equal(got.rgb, (rgb01 * 255.0 + 0.5).astype(np.uint8))
    assert got.tensor.dtype == np.float32 and got.tensor.flags.c_contiguous


# --- one view of the input: EXIF orientation ----------------------------------------


def _exif(orientation: int, order: bytes = b"MM") -> bytes:
    """An Exif block (a TIFF structure) whose IFD0 holds only the orientation tag."""
    e = ">" if order == b"MM" else "<"
    tiff = order + struct.pack(e + "HI", 42, 8) + struct.pack(e + "H", 1)
    tiff += struct.pack(e + "HHIHH", 0x0112, 3, 1, orientation, 0) + struct.pack(e + "I", 0)
    return tiff


def _jpeg_with_orientation(bgr: np.ndarray, orientation: int, order: bytes = b"MM") -> bytes:
    """A JPEG of ``bgr`` (stored as is) with an APP1 Exif segment right after SOI."""
    body = b"Exif\x00\x00" + _exif(orientation, order)
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    data = encode(".jpg", bgr)
    return data[:2] + app1 + data[2:]


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _tiff_with_orientation(img: np.ndarray, orientation: int) -> bytes:
    """An uncompressed 8-bit grey or RGB TIFF (one strip) with tag 274 set."""
    h, w = img.shape[:2]
    spp = 1 if img.ndim == 2 else img.shape[2]
    pixels = img.tobytes()
    entries = [
        (256, w), (257, h), (258, 8), (259, 1), (262, 1 if spp == 1 else 2), (273, 0),
        (274, orientation), (277, spp), (278, h), (279, len(pixels)),
    ]  # fmt: skip
    data_at = 8 + 2 + 12 * len(entries) + 4
    out = b"II*\x00" + struct.pack("<IH", 8, len(entries))
    for tag, value in entries:
        if tag in (273, 279):
            out += struct.pack("<HHII", tag, 4, 1, data_at if tag == 273 else value)
        else:
            out += struct.pack("<HHIHH", tag, 3, 1, value, 0)
    return out + struct.pack("<I", 0) + pixels


def _upright(h: int, w: int) -> np.ndarray:
    """A smooth colour image (JPEG keeps it well) that no flip or rotation maps onto
    itself: red grows to the right, green downwards, a dark block near the top-left."""
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    bgr = np.stack([np.full((h, w), 128.0), 40 + 180 * y / h, 40 + 180 * x / w], axis=-1)
    bgr[h // 8 : h // 3, w // 8 : w // 3] = 20
    return bgr.astype(np.uint8)


# stored pixels = STORE[o](upright): what a camera holding the part in orientation o writes
STORE = {
    2: lambda a: a[:, ::-1],
    3: lambda a: np.rot90(a, 2),
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, 1),  # displayed = stored turned 90 degrees clockwise
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", [3, 6, 8, 2, 4, 5, 7])
@pytest.mark.parametrize(("h", "w"), [(300, 300), (700, 1000), (1000, 700)])
def test_jpeg_exif_orientation_is_applied_at_every_size(orientation: int, h: int, w: int) -> None:
    # (700, 1000) and (1000, 700) go through the reduced (DCT-scaled) decode,
    # 300x300 through the full one: both must give the same, upright view.
    upright = _upright(h, w)
    stored = np.ascontiguousarray(STORE[orientation](upright))
    data = _jpeg_with_orientation(stored, orientation)
    out = prepare(data)  # never refused: the size check is on the upright size
    assert out.source_size == (w, h)
    assert image_size(data) == ("jpeg", w, h)
    want = prepare(encode(".png", upright)).rgb.astype(np.float32)
    unturned = prepare(encode(".png", stored)).rgb.astype(np.float32)
    got = out.rgb.astype(np.float32)
    assert np.abs(got - want).mean() < 3.0  # JPEG loss on a smooth image
    assert np.abs(unturned - want).mean() > 20.0  # the check can tell a wrong view


@pytest.mark.parametrize("order", [b"MM", b"II"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_orientation_agrees_with_opencvs_own_exif_handling(
    orientation: int, order: bytes
) -> None:
    stored = _upright(240, 320)
    data = _jpeg_with_orientation(stored, orientation, order)
    reference = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)  # applies EXIF
    np.testing.assert_array_equal(decode(data), reference)


def test_png_exif_chunk_orientation_is_applied() -> None:
    upright = _upright(200, 300)
    png = encode(".png", np.ascontiguousarray(STORE[6](upright)))
    at = 8 + 25  # after the signature and IHDR: eXIf must come before IDAT
    data = png[:at] + _png_chunk(b"eXIf", _exif(6)) + png[at:]
    assert image_size(data) == ("png", 300, 200)
    np.testing.assert_array_equal(decode(data), upright)
    assert prepare(data).source_size == (300, 200)


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_tiff_orientation_tag_is_applied_once(orientation: int) -> None:
    # OpenCV's TIFF decoder applies tag 274 itself; the header check must agree
    # and the pixels must not be turned a second time.
    upright = _upright(200, 300)
    data = _tiff_with_orientation(
        np.ascontiguousarray(STORE[orientation](upright)[..., ::-1]), orientation
    )  # the TIFF holds RGB
    assert image_size(data) == ("tiff", 300, 200)
    np.testing.assert_array_equal(decode(data), upright)


def test_broken_exif_is_ignored_not_refused() -> None:
    img = _upright(300, 300)
    body = b"Exif\x00\x00MM\x00*\x00\x00\xff\xff"  # IFD offset far past the end
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    data = encode(".jpg", img)
    assert decode(data[:2] + app1 + data[2:]).shape == (300, 300, 3)
    assert decode(_jpeg_with_orientation(img, 9)).shape == (300, 300, 3)  # out of range: 1


# --- colour follows the metadata ----------------------------------------------------


def _grey_alpha_png(h: int = 300, w: int = 300) -> bytes:
    """PNG colour type 4 (grey + alpha), which OpenCV cannot write."""
    rows = b"".join(b"\x00" + bytes([90, 255] * w) for _ in range(h))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 4, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows))
        + _png_chunk(b"IEND", b"")
    )


GREY_IMAGES = {
    "png": encode(".png", np.full((300, 300), 90, np.uint8)),
    "png16": encode(".png", np.full((300, 300), 30000, np.uint16)),
    "png-grey-alpha": _grey_alpha_png(),
    "jpeg": encode(".jpg", np.full((300, 300), 90, np.uint8)),
    "jpeg-large": encode(".jpg", np.full((1200, 1600), 90, np.uint8)),  # reduced decode
    "bmp": encode(".bmp", np.full((300, 300), 90, np.uint8)),
    "tiff": encode(".tiff", np.full((300, 300), 90, np.uint8)),
}


@pytest.mark.parametrize("name", list(GREY_IMAGES))
def test_rgb_model_refuses_single_channel_images(name: str) -> None:
    data = GREY_IMAGES[name]
    assert is_greyscale(data)
    err = _rejected(data, Reject.WRONG_COLOUR)
    assert err.message == "the model inspects colour (RGB) images; this image is greyscale"


@pytest.mark.parametrize("name", list(GREY_IMAGES))
def test_grey_model_takes_single_channel_images(name: str) -> None:
    out = prepare(GREY_IMAGES[name], GREY)
    assert out.tensor.shape == (3, 300, 300)
    assert (out.rgb == out.rgb[..., :1]).all()  # replicated to the graph's three channels


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_colour_images_are_not_greyscale(ext: str) -> None:
    data = encode(ext, _bgr())
    assert not is_greyscale(data)
    assert prepare(data).tensor.shape == (3, 300, 300)  # an RGB model takes them


def test_grey_model_takes_the_luma_of_colour_images() -> None:
    bgr = _bgr(300, 300, seed=3)
    out = prepare(encode(".png", bgr), GREY)
    luma = np.round(bgr @ np.array([0.114, 0.587, 0.299])).astype(np.int16)  # BT.601
    assert np.abs(out.rgb[..., 0].astype(np.int16) - luma).max() <= 1
    assert (out.rgb == out.rgb[..., :1]).all()
    want = normalise(np.repeat(out.rgb[..., :1], 3, axis=2).astype(np.float32) / 255, GREY)
    np.testing.assert_allclose(out.tensor, want, atol=1e-6)


@pytest.mark.parametrize(
    "data",
    [
        encode(".png", np.zeros((300, 300, 4), np.uint8)),  # RGBA
        encode(".tiff", np.full((300, 300, 3), 40000, np.uint16)),  # 16-bit RGB
        encode(".jpg", _upright(1200, 1600)),  # reduced decode
    ],
    ids=["rgba", "tiff16", "jpeg-large"],
)
def test_grey_model_converts_every_colour_format(data: bytes) -> None:
    out = prepare(data, GREY)
    assert (out.rgb == out.rgb[..., :1]).all()


def test_grey_and_colour_views_of_a_grey_part_agree() -> None:
    # A grey image and the same pixels saved as colour give a grey model one input.
    grey = cv2.cvtColor(_upright(300, 300), cv2.COLOR_BGR2GRAY)
    as_grey = prepare(encode(".png", grey), GREY)
    as_colour = prepare(encode(".png", cv2.cvtColor(grey, cv2.COLOR_GRAY2BGR)), GREY)
    np.testing.assert_array_equal(as_grey.tensor, as_colour.tensor)


def test_as_input_colour_follows_the_spec() -> None:
    rgb = good_image(np.random.default_rng(0))
    assert as_input_colour(rgb, InputSpec()) is rgb
    grey = as_input_colour(rgb, GREY)
    np.testing.assert_array_equal(grey, prepare(encode_png(rgb), GREY).rgb)


# --- the codec the image came in ----------------------------------------------------


@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_prepared_image_carries_its_codec(ext: str) -> None:
    data = encode(ext, _bgr())
    out = prepare(data)
    assert out.codec == detect_codec(data)
    assert out.codec is not None
    assert out.codec.format == {".jpg": "jpeg", ".tiff": "tiff"}.get(ext, ext[1:])
