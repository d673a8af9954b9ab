"""The decoder's memory is bounded by the header: crafted files are refused
before any pixel is decoded, accepted ones decode within the bytes their
plan reserves, and concurrent decodes share one budget."""

from __future__ import annotations

import asyncio
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.contract import InputSpec, TileGrid
from service.decode_budget import (
    DecodeBudget,
    DecodeBusy,
    DecodeTooLarge,
    default_decode_memory,
)
from service.image_header import Header, read_header
from service.inspection import Inspector
from service.preprocessing import DecodePlan, decode, plan_prepare, prepare
from service.rejection import InputRejected, Reject
from tests.helpers import hostile_images as hostile
from tests.helpers.memory import decode_peak
from tests.helpers.synthetic import encode

ROOT = Path(__file__).resolve().parents[2]
MB = 2**20


@pytest.fixture
def no_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """OpenCV's decoders fail the test if called: the refusal came first."""

    def called(*_: object, **__: object) -> None:
        raise AssertionError("the decoder ran")

    for name in ("imread", "imdecode", "imcount"):
        monkeypatch.setattr(cv2, name, called)


REFUSED = {
    "TIFF naming its size twice": (hostile.tiff_duplicate_size, Reject.CORRUPT),
    "PNG with two IHDRs": (hostile.png_two_ihdr, Reject.CORRUPT),
    "animated PNG": (hostile.apng, Reject.UNSUPPORTED_FORMAT),
    "JPEG with two frame headers": (hostile.jpeg_two_sof, Reject.CORRUPT),
    "JPEG with a frame header after a scan": (hostile.jpeg_sof_after_scan, Reject.CORRUPT),
    "JPEG with its height in a DNL": (hostile.jpeg_dnl, Reject.UNSUPPORTED_FORMAT),
    "TIFF of 300x300 in 16000x16000 tiles": (
        lambda: hostile.tiff(300, 300, tile=(16000, 16000), pixels=(16000, 16000)),
        Reject.CORRUPT,
    ),
    "TIFF of 300 rows in strips of 800000": (
        lambda: hostile.tiff(300, 300, rows_per_strip=800_000),
        Reject.CORRUPT,
    ),
    "TIFF of two pages": (lambda: hostile.tiff(300, 300, pages=2), Reject.UNSUPPORTED_FORMAT),
    "BMP of 2^31 rows": (lambda: hostile.bmp(300, -(2**31), 8, rle8_end=True), Reject.CORRUPT),
    "RLE BMP of 60000x60000 in 1 kB": (
        lambda: hostile.bmp(60000, 60000, 8, rle8_end=True),
        Reject.TOO_MANY_PIXELS,
    ),
    "grey BMP for a colour model": (
        lambda: hostile.bmp(3000, 3000, 8, rle8_end=True),
        Reject.WRONG_COLOUR,
    ),
}


@pytest.mark.usefixtures("no_decoding")
@pytest.mark.parametrize("name", list(REFUSED))
def test_crafted_files_are_refused_before_decoding(name: str) -> None:
    make, reason = REFUSED[name]
    with pytest.raises(InputRejected) as err:
        prepare(make())
    assert err.value.reason == reason, err.value


def test_opencv_refuses_a_size_the_header_did_not_say() -> None:
    """The second line: were the parser wrong, OpenCV compares its own
    reading of the header with the array it is to decode into, and refuses
    before it allocates the pixels."""
    data = hostile.png_zeros(4000, 4000)  # 48 MB of pixels
    lie = Header("png", 300, 300, work_bytes=0)
    before = _hwm()
    with pytest.raises(InputRejected) as err:
        prepare(data, plan=DecodePlan(lie, 1, 0))
    assert err.value.reason == Reject.CORRUPT
    assert "OpenCV refused the PNG" in err.value.message and "size" in err.value.message
    assert _hwm() - before < 16 * MB
    deep = Header("png", 4000, 4000, dtype="uint16")
    with pytest.raises(InputRejected) as err:
        prepare(data, plan=DecodePlan(deep, 1, 0))
    assert "type" in err.value.message


def _hwm() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError


# Accepted files whose decoders hold the most for their size. Each decodes
# in a fresh process; its peak must stay within its plan.
ACCEPTED = {
    "16-bit RGBA PNG (smaller)": lambda: hostile.png_rgba16(3000),
    "16-bit RGB TIFF in one strip": lambda: hostile.tiff(3000, 3000, bps=16),
    "8-bit RGB TIFF in one strip, rotated": lambda: hostile.tiff(
        3000, 2000, override=[(274, 3, 1, 6)]
    ),
    "8-bit RGB TIFF in 512x512 tiles": lambda: hostile.tiff(2048, 2048, tile=(512, 512)),
    "16-bit RGBA TIFF in strips of 64 rows": lambda: hostile.tiff(
        3000, 3000, spp=4, bps=16, rows_per_strip=64
    ),
    "progressive JPEG": lambda: hostile.jpeg(3000, 3000, progressive=True),
    "baseline JPEG": lambda: hostile.jpeg(3000, 3000),
    "RLE BMP of 4000x3000 in 1 kB": lambda: _colour_rle_bmp(4000, 3000),
}


def _colour_rle_bmp(w: int, h: int) -> bytes:
    data = bytearray(hostile.bmp(w, h, 8, rle8_end=True))
    data[14 + 40 + 4 : 14 + 40 + 7] = b"\x10\x20\x30"  # one colour: a colour palette
    return bytes(data)


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_accepted_files_decode_within_their_plan(name: str) -> None:
    peak = decode_peak(ACCEPTED[name](), timeout=120)
    assert peak.outcome == "accepted", peak
    assert peak.planned_bytes > 0
    # The plan holds what the decode took (1 MB for the allocator's rounding) ...
    assert peak.peak_bytes <= peak.planned_bytes + MB, peak
    # ... and is no wild overestimate (the file copy and untouched buffers count).
    assert peak.planned_bytes <= 2 * peak.peak_bytes + 32 * MB, peak


def test_the_two_issue_14_files() -> None:
    """The TIFF that took 2.3 GB before its refusal takes nothing; the 16-bit
    RGBA PNG of 6300x6300 (40 MP, inside the pixel budget) takes its 3-channel
    16-bit pixels, 238 MB, no longer twice that and its alpha (608 MB)."""
    tiff = decode_peak(hostile.tiff_duplicate_size(), timeout=120)
    assert tiff.outcome == "corrupt" and tiff.peak_bytes < 8 * MB, tiff
    png = decode_peak(hostile.png_rgba16(6300), timeout=120)
    assert png.outcome == "accepted", png
    assert png.peak_bytes <= png.planned_bytes + MB <= 260 * MB, png


def test_opencv_pixel_limit_is_set_before_cv2_is_imported() -> None:
    probe = r"""
import sys
from service.decode_budget import limit_opencv_pixels
assert limit_opencv_pixels(1_000_000)
import cv2, numpy as np
from tests.helpers.hostile_images import png_zeros
assert not limit_opencv_pixels(1_000_000)  # too late now: cv2 has read it
try:
    cv2.imdecode(np.frombuffer(png_zeros(1200, 1000), np.uint8), cv2.IMREAD_UNCHANGED)
except cv2.error as exc:
    print("refused", "CV_IO_MAX_IMAGE_PIXELS" in str(exc))
"""
    env = {"PATH": "/usr/bin:/bin"}
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "refused True", out.stderr


def test_the_server_entry_point_imports_no_opencv_before_its_settings() -> None:
    """``python -m service`` sets OpenCV's limit from the settings, so nothing
    it imports at module level may import cv2 (it would read the limit first)."""
    probe = "import sys, service.__main__; print('cv2' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert out.stdout.strip() == "False", out.stderr


def test_plan_counts_the_orientation_copy_and_the_jpeg_scale() -> None:
    plain = hostile.tiff(2000, 1000)
    turned = hostile.tiff(2000, 1000, override=[(274, 3, 1, 6)])  # one more tag: 12 bytes
    upright, rotated = plan_prepare(plain), plan_prepare(turned)
    extra = rotated.peak_bytes - upright.peak_bytes - (len(turned) - len(plain))
    assert extra == 2000 * 1000 * 3
    assert rotated.header.size == (1000, 2000)
    big = plan_prepare(hostile.jpeg(4000, 3000))
    assert big.factor == 8  # decoded at 500x375 for the 300x300 model
    assert big.peak_bytes < 32 * MB


# --- the shared budget -----------------------------------------------------------------


def test_default_budget_follows_the_pixel_budget() -> None:
    assert default_decode_memory(40_000_000) == 640_000_000


def test_budget_grants_refuses_and_queues_first_come_first_served() -> None:
    async def run() -> None:
        budget = DecodeBudget(100, wait_s=5)
        a = await budget.acquire(60)
        assert budget.in_use == 60
        with pytest.raises(DecodeTooLarge):
            await budget.acquire(101)  # could never fit: at once, no wait
        order: list[str] = []

        async def later(name: str, n: int) -> None:
            r = await budget.acquire(n)
            order.append(name)
            await asyncio.sleep(0.01)
            r.release()

        tasks = [asyncio.create_task(later("big", 90)), asyncio.create_task(later("small", 10))]
        await asyncio.sleep(0.05)
        # The small one would fit now, but waits behind the big one: no starvation.
        assert order == [] and budget.waiting == 2
        a.release()
        await asyncio.gather(*tasks)
        assert order == ["big", "small"]
        assert budget.in_use == 0 and budget.peak == 100

    asyncio.run(run())


def test_budget_refuses_after_its_wait_and_forgets_the_waiter() -> None:
    async def run() -> None:
        budget = DecodeBudget(100, wait_s=0.1)
        held = await budget.acquire(80)
        started = time.monotonic()
        with pytest.raises(DecodeBusy) as err:
            await budget.acquire(30)
        assert 0.09 <= time.monotonic() - started < 1
        assert "decode memory budget" in str(err.value)
        assert budget.waiting == 0 and budget.in_use == 80
        held.release()
        held.release()  # once only
        assert budget.in_use == 0

    asyncio.run(run())


def test_budget_cancelled_waiter_leaves_no_trace() -> None:
    async def run() -> None:
        budget = DecodeBudget(100, wait_s=5)
        held = await budget.acquire(100)
        waiter = asyncio.create_task(budget.acquire(50))
        await asyncio.sleep(0.01)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert budget.waiting == 0
        held.release()
        assert budget.in_use == 0

    asyncio.run(run())


def test_reservation_outlives_a_cancelled_request_until_the_decoder_is_done() -> None:
    """A client hanging up does not free the decode's bytes while the pool
    thread still decodes: they go back when it is done."""
    data = hostile.png_rgba16(3000)
    spec, grid = InputSpec(), TileGrid()
    meta: Any = SimpleNamespace(input=spec, grid=grid)
    inspector = Inspector(None, None, 40_000_000, 1)  # type: ignore[arg-type]
    budget = inspector.decode_budget

    async def run() -> None:
        plan = plan_prepare(data, spec, grid)
        reservation = await budget.acquire(plan.peak_bytes)
        task = asyncio.create_task(inspector._prepare(data, meta, plan, reservation))
        await asyncio.sleep(0.02)  # the decode is running in the pool
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert budget.in_use == plan.peak_bytes  # still decoding
        for _ in range(200):
            if budget.in_use == 0:
                break
            await asyncio.sleep(0.05)
        assert budget.in_use == 0

    try:
        asyncio.run(run())
    finally:
        inspector.close()


def test_header_plan_of_a_grey_image_for_a_grey_model() -> None:
    grey = InputSpec(color="grey")
    plan = plan_prepare(hostile.bmp(3000, 3000, 8, rle8_end=True), grey)
    assert plan.header.grey and plan.header.channels == 1
    assert read_header(hostile.bmp(3000, 3000, 8, rle8_end=True)).pixel_bytes() == 9_000_000
    assert prepare(hostile.bmp(3000, 3000, 8, rle8_end=True), grey).tensor.shape == (3, 300, 300)
    assert np.isfinite(prepare(hostile.png_rgba16(400)).tensor).all()


@settings(max_examples=300, deadline=None)
@given(
    st.binary(max_size=1024),
    st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"BM", b"II*\x00"]),
)
def test_plans_never_raise_anything_but_a_refusal(rest: bytes, signature: bytes) -> None:
    try:
        plan = plan_prepare(signature + rest, InputSpec(color="grey"), max_pixels=10**12)
    except InputRejected:
        return
    assert plan.peak_bytes >= plan.header.pixel_bytes(plan.factor) + len(signature + rest)


def _grey_alpha_png(depth: int) -> bytes:
    """A grey+alpha PNG (OpenCV's IMREAD_UNCHANGED gives it as BGRA)."""
    rng = np.random.default_rng(3)
    samples = rng.integers(0, 2**depth, (40, 30, 2)).astype(">u2" if depth == 16 else np.uint8)
    rows = b"".join(b"\0" + r.tobytes() for r in samples)
    ihdr = hostile.png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30, 40, depth, 4, 0, 0, 0))
    idat = hostile.png_chunk(b"IDAT", zlib.compress(rows))
    return hostile.PNG_SIGNATURE + ihdr + idat + hostile.png_chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("ext", "shape", "dtype"),
    [
        (".png", (40, 30, 3), np.uint8),
        (".png", (40, 30, 4), np.uint8),
        (".png", (40, 30), np.uint8),
        (".png", (40, 30, 3), np.uint16),
        (".png", (40, 30, 4), np.uint16),
        (".png", (40, 30), np.uint16),
        (".jpg", (40, 30, 3), np.uint8),
        (".jpg", (40, 30), np.uint8),
        (".bmp", (40, 30, 3), np.uint8),
        (".bmp", (40, 30), np.uint8),
        (".tiff", (40, 30, 3), np.uint8),
        (".tiff", (40, 30, 4), np.uint8),
        (".tiff", (40, 30), np.uint16),
        (".tiff", (40, 30, 4), np.uint16),
        (".tiff", (40, 30, 3), np.float32),
        ("grey+alpha", (40, 30), np.uint8),
        ("grey+alpha", (40, 30), np.uint16),
    ],
)
def test_decoding_into_the_planned_array_gives_the_pixels_opencv_gives(
    ext: str, shape: tuple[int, ...], dtype: type
) -> None:
    """The same samples as OpenCV's own IMREAD_UNCHANGED, less the alpha."""
    if ext == "grey+alpha":
        data = _grey_alpha_png(16 if dtype == np.uint16 else 8)
    else:
        top = 1.0 if dtype == np.float32 else np.iinfo(dtype).max
        img = (np.random.default_rng(2).random(shape) * top).astype(dtype)
        data = encode(ext, img)
    ours = decode(data)
    theirs = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if theirs.ndim == 3 and ours.ndim == 2:  # grey+alpha, given as BGRA
        theirs = theirs[..., 0]
    elif theirs.ndim == 3:
        theirs = theirs[..., :3]
    assert ours.dtype == theirs.dtype
    np.testing.assert_array_equal(ours, theirs)
