"""The header parser on its own: real headers, crafted ones, and fuzzed bytes.

Whatever the bytes, ``read_header`` answers a header that agrees with itself
or raises InputRejected, and nothing else.
"""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from service.image_header import Header, image_size, read_header, sniff
from service.rejection import InputRejected, Reject
from tests.helpers import hostile_images as hostile
from tests.helpers.synthetic import encode

ROOT = Path(__file__).resolve().parents[2]


def _img(h: int = 48, w: int = 64, channels: int = 3, dtype: type = np.uint8) -> np.ndarray:
    shape = (h, w) if channels == 1 else (h, w, channels)
    top = 65535 if dtype == np.uint16 else 255
    return np.random.default_rng(0).integers(0, top, shape).astype(dtype)


def _agrees(head: Header) -> None:
    """Everything a header says is consistent with everything else it says."""
    assert head.format in ("png", "jpeg", "bmp", "tiff")
    assert head.width > 0 and head.height > 0
    assert 1 <= head.orientation <= 8
    w, h = head.size
    assert {w, h} == {head.width, head.height}
    assert (w, h) == (
        (head.height, head.width) if head.orientation >= 5 else (head.width, head.height)
    )
    assert head.channels in (1, 3) and head.channels == (1 if head.grey else 3)
    assert head.itemsize in (1, 2, 4, 8)
    assert head.pixel_bytes() == head.width * head.height * head.channels * head.itemsize
    assert 0 < head.pixel_bytes(8) <= head.pixel_bytes()
    assert head.work_bytes >= 0
    if head.orientation_patch is not None:
        assert head.format == "tiff"


def test_no_opencv_and_no_numpy() -> None:
    probe = "import sys, service.image_header; print(sorted({'cv2', 'numpy'} & set(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# --- real files ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext", "channels", "dtype", "grey", "expected"),
    [
        (".png", 3, np.uint8, False, "uint8"),
        (".png", 1, np.uint8, True, "uint8"),
        (".png", 4, np.uint8, False, "uint8"),
        (".png", 3, np.uint16, False, "uint16"),
        (".png", 1, np.uint16, True, "uint16"),
        (".jpg", 3, np.uint8, False, "uint8"),
        (".jpg", 1, np.uint8, True, "uint8"),
        (".bmp", 3, np.uint8, False, "uint8"),
        (".bmp", 1, np.uint8, True, "uint8"),  # a grey palette
        (".tiff", 3, np.uint8, False, "uint8"),
        (".tiff", 1, np.uint8, True, "uint8"),
        (".tiff", 3, np.uint16, False, "uint16"),
        (".tiff", 1, np.uint16, True, "uint16"),
        (".tiff", 4, np.uint16, False, "uint16"),
        (".tiff", 3, np.float32, False, "float32"),
    ],
)
def test_headers_of_every_format_and_depth(
    ext: str, channels: int, dtype: type, grey: bool, expected: str
) -> None:
    img = _img(37, 53, channels, dtype)
    if dtype == np.float32:
        img = img.astype(np.float32) / 255
    head = read_header(encode(ext, img))
    _agrees(head)
    assert (head.format, head.width, head.height) == (ext[1:].replace("jpg", "jpeg"), 53, 37)
    assert head.grey is grey
    assert head.dtype == expected
    assert image_size(encode(ext, img)) == (head.format, 53, 37)


def test_a_colour_bmp_palette_is_colour() -> None:
    data = bytearray(hostile.bmp(64, 32, 8))
    palette = 14 + 40
    data[palette + 4 * 7 : palette + 4 * 7 + 3] = b"\x10\x20\x30"
    assert not read_header(bytes(data)).grey
    assert read_header(hostile.bmp(64, 32, 8)).grey


def test_negative_bmp_height_is_top_down_not_a_size() -> None:
    head = read_header(hostile.bmp(300, -200))
    assert (head.width, head.height) == (300, 200)


def test_progressive_jpeg_counts_every_coefficient() -> None:
    baseline = read_header(hostile.jpeg(1024, 768))
    progressive = read_header(hostile.jpeg(1024, 768, progressive=True))
    # 4:2:0 luma and two quarter-size chromas, 2 bytes each: 3 bytes a pixel.
    extra = progressive.work_bytes - baseline.work_bytes
    assert 1024 * 768 * 3 <= extra <= 1024 * 768 * 3 * 1.05


def test_exif_thumbnail_is_not_the_image() -> None:
    head = read_header(hostile.jpeg_with_exif_thumbnail(320, 240, thumb=4000))
    assert (head.width, head.height) == (320, 240)


def test_tiff_orientation_patch_points_at_the_tag() -> None:
    data = hostile.tiff(40, 30, override=[(274, 3, 1, 6)])
    head = read_header(data)
    assert head.orientation == 6 and head.size == (30, 40)
    assert head.orientation_patch is not None
    at, value = head.orientation_patch
    assert data[at : at + 2] == struct.pack("<H", 6) and value == struct.pack("<H", 1)
    patched = data[:at] + value + data[at + len(value) :]
    assert read_header(patched).orientation == 1


def test_tiff_of_several_pages_is_refused_but_thumbnails_are_not_pages() -> None:
    data = hostile.tiff(40, 30, pages=2)
    with pytest.raises(InputRejected) as err:
        read_header(data)
    assert err.value.reason == Reject.UNSUPPORTED_FORMAT and "2 pages" in err.value.message
    # A second directory marked as a reduced-resolution copy (a thumbnail) is
    # not a second page; a first one so marked is not the image.
    assert read_header(hostile.tiff(40, 30, pages=2, subfile_types=[0, 1])).width == 40
    with pytest.raises(InputRejected) as err:
        read_header(hostile.tiff(40, 30, pages=2, subfile_types=[1, 0]))
    assert "reduced-resolution" in err.value.message


# --- crafted files: each refused from its header ----------------------------------------

HOSTILE = {
    "tiff_duplicate_size": (hostile.tiff_duplicate_size, Reject.CORRUPT, "names tag 256 twice"),
    "png_two_ihdr": (hostile.png_two_ihdr, Reject.CORRUPT, "second IHDR"),
    "apng": (hostile.apng, Reject.UNSUPPORTED_FORMAT, "animated"),
    "jpeg_two_sof": (hostile.jpeg_two_sof, Reject.CORRUPT, "second JPEG frame header"),
    "jpeg_sof_after_scan": (hostile.jpeg_sof_after_scan, Reject.CORRUPT, "second JPEG frame"),
    "jpeg_dnl": (hostile.jpeg_dnl, Reject.UNSUPPORTED_FORMAT, "DNL"),
    "tiff_pages": (lambda: hostile.tiff(300, 300, pages=3), Reject.UNSUPPORTED_FORMAT, "3 pages"),
    "tiff_tile_16000": (
        lambda: hostile.tiff(300, 300, tile=(16000, 16000), pixels=(16, 16)),
        Reject.CORRUPT,
        "tiles of 16000x16000",
    ),
    "tiff_strip_800000": (
        lambda: hostile.tiff(300, 300, rows_per_strip=800_000),
        Reject.CORRUPT,
        "strips or tiles",
    ),
    "tiff_loop": (lambda: _tiff_loop(), Reject.CORRUPT, "loop"),
    "bmp_height_int_min": (
        lambda: hostile.bmp(300, -(2**31), 8, rle8_end=True),
        Reject.CORRUPT,
        "size",
    ),
    "bmp_negative_width": (lambda: hostile.bmp(-300, 300), Reject.CORRUPT, "size"),
    "png_zero_width": (
        lambda: hostile.png_zeros(1, 1, header=hostile.ihdr(0, 300)),
        Reject.CORRUPT,
        "size",
    ),
    "png_bad_depth": (lambda: hostile.png_zeros(8, 8, 16, 3), Reject.CORRUPT, "bit depth"),
}


def _tiff_loop() -> bytes:
    """Two directories, the second pointing back at the first."""
    data = bytearray(hostile.tiff(40, 30, pages=2))
    (count,) = struct.unpack_from("<H", data, 8)
    second = 8 + 2 + 12 * count + 4
    struct.pack_into("<I", data, second + 2 + 12 * count, 8)
    return bytes(data)


@pytest.mark.parametrize("name", list(HOSTILE))
def test_crafted_file_refused_from_its_header(name: str) -> None:
    make, reason, words = HOSTILE[name]
    with pytest.raises(InputRejected) as err:
        read_header(make())
    assert err.value.reason == reason, err.value
    assert words in err.value.message


@pytest.mark.parametrize("cut", [1, 8, 12, 20, 33, 40])
@pytest.mark.parametrize("ext", [".png", ".jpg", ".bmp", ".tiff"])
def test_cut_files_are_refused_as_cut_or_corrupt(ext: str, cut: int) -> None:
    data = encode(ext, _img())[:cut]
    with pytest.raises(InputRejected) as err:
        read_header(data)
    assert err.value.reason in (Reject.TRUNCATED, Reject.CORRUPT, Reject.UNSUPPORTED_FORMAT)


# --- fuzzing -------------------------------------------------------------------------------

SEEDS = [
    encode(".png", _img(9, 7)),
    encode(".png", _img(9, 7, 1, np.uint16)),
    encode(".jpg", _img(9, 7)),
    hostile.jpeg(24, 16, progressive=True),
    hostile.jpeg_with_exif_thumbnail(24, 16, thumb=64),
    encode(".bmp", _img(9, 7)),
    encode(".bmp", _img(9, 7, 1)),
    encode(".tiff", _img(9, 7)),
    encode(".tiff", _img(9, 7, 1, np.uint16)),
    hostile.tiff(12, 10, tile=(16, 16), override=[(274, 3, 1, 8)]),
    hostile.tiff(12, 10, pages=2, subfile_types=[0, 1]),
    hostile.bmp(12, -10, 8, rle8_end=True),
]
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _parse(data: bytes) -> None:
    try:
        head = read_header(data)
    except InputRejected as exc:
        assert isinstance(exc.reason, Reject) and exc.message
        return
    _agrees(head)


@FUZZ
@given(st.binary(max_size=2048))
def test_arbitrary_bytes(data: bytes) -> None:
    _parse(data)


@FUZZ
@given(
    st.sampled_from(["\x89PNG\r\n\x1a\n", "\xff\xd8\xff", "BM", "II*\x00", "MM\x00*", "II+\x00"]),
    st.binary(max_size=512),
)
def test_arbitrary_bytes_behind_a_signature(signature: str, rest: bytes) -> None:
    _parse(signature.encode("latin-1") + rest)


@st.composite
def _mutated(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        kind = draw(st.sampled_from(["set", "cut", "insert", "delete", "word"]))
        at = draw(st.integers(0, max(0, min(len(data) - 1, 400))))
        if kind == "set" and data:
            data[at] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del data[at : at + draw(st.integers(1, 16))]
        elif kind == "word":  # a size, count or offset replaced by an extreme one
            value = draw(st.sampled_from([0, 1, 0x7FFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            data[at : at + 4] = value.to_bytes(4, draw(st.sampled_from(["big", "little"])))
    return bytes(data)


@FUZZ
@given(_mutated())
def test_mutated_real_headers(data: bytes) -> None:
    _parse(data)


@pytest.mark.parametrize(
    ("head", "fmt"),
    [
        (b"\x89PNG\r\n\x1a\n", "png"),
        (b"\xff\xd8\xff\xe0", "jpeg"),
        (b"BM\x00\x00", "bmp"),
        (b"II*\x00", "tiff"),
        (b"MM\x00*", "tiff"),
        (b"GIF89a", None),
        (b"", None),
    ],
)
def test_the_format_is_told_by_its_signature(head: bytes, fmt: str | None) -> None:
    assert sniff(head + b"\x00" * 16) == fmt


def test_mutants_opencv_reads_agree_with_the_header() -> None:
    """Over many mutants of real files, wherever the parser and OpenCV both
    read a size, they read the same one (OpenCV with its default flags:
    what it would allocate)."""
    rng = np.random.default_rng(1)
    checked = 0
    for _ in range(600):
        data = bytearray(SEEDS[rng.integers(len(SEEDS))])
        for _ in range(rng.integers(1, 4)):
            at = int(rng.integers(0, min(len(data), 200)))
            data[at] = int(rng.integers(0, 256))
        try:
            head = read_header(bytes(data))
        except InputRejected:
            continue
        try:
            img = cv2.imdecode(np.frombuffer(bytes(data), np.uint8), cv2.IMREAD_UNCHANGED)
        except cv2.error:  # over OpenCV's own limits, which the header says too
            assert max(head.width, head.height) > 2**20 or head.width * head.height > 2**30
            continue
        if img is None:
            continue
        checked += 1
        stored = (head.height, head.width)
        assert img.shape[:2] in (stored, stored[::-1]), (head, img.shape)  # TIFF rotates itself
    assert checked > 50
