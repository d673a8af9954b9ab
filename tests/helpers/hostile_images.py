"""Image files written to make a decoder allocate more than their header says.

Two files that once took gigabytes of decoder memory, made here so the tests build them themselves:

* :func:`tiff_duplicate_size` (about 1.2 MB): a TIFF whose first directory
  names its width and height twice, 20000x20000 first and 300x300 after.
  The old header parser took the last, libtiff the first: OpenCV decoded
  1.2 GB of pixels (2.4 GB resident with its strip buffer) before the
  service answered ``corrupt``.
* :func:`png_rgba16` (about 0.3 MB): a valid 16-bit RGBA PNG of 6300x6300,
  inside the 40 MP pixel budget, 8 bytes a pixel: 318 MB decoded.

The others cover every other way a header can disagree with itself or with
the data: two IHDRs, an animated PNG, two JPEG frame headers, a frame
header after the first scan, a height left to a DNL marker, multi-page and
over-tiled TIFFs, BMP heights that overflow. All pixel data is zeros, so
gigapixels compress to a few hundred kilobytes: :func:`deflate_zeros`
writes them in milliseconds without compressing them.
"""

from __future__ import annotations

import functools
import re
import struct
import zlib
from collections.abc import Sequence

import cv2
import numpy as np

# --- zeros, compressed fast ----------------------------------------------------------

_BLOCK = 1 << 22  # 4 MiB of zeros per deflate block


@functools.cache
def _zero_blocks() -> tuple[bytes, bytes]:
    """A raw-deflate block of _BLOCK zeros, byte-aligned and independent of
    what came before (a full flush resets the window), and the final block."""
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    block = c.compress(b"\0" * _BLOCK) + c.flush(zlib.Z_FULL_FLUSH)
    end = zlib.compressobj(9, zlib.DEFLATED, -15)
    return block, end.flush(zlib.Z_FINISH)


def deflate_zeros(n: int) -> bytes:
    """A zlib stream that inflates to ``n`` zero bytes (about n / 1000 bytes)."""
    block, final = _zero_blocks()
    whole, rest = divmod(n, _BLOCK)
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    tail = c.compress(b"\0" * rest) + c.flush(zlib.Z_FULL_FLUSH) if rest else b""
    adler = ((n % 65521) << 16) | 1  # adler32 of n zeros: a stays 1, b sums n ones
    return b"\x78\xda" + block * whole + tail + final + struct.pack(">I", adler)


# --- PNG -------------------------------------------------------------------------------

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_CHANNELS = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(width: int, height: int, depth: int = 8, colour: int = 2) -> bytes:
    return png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0))


def png_zeros(
    width: int,
    height: int,
    depth: int = 8,
    colour: int = 2,
    *,
    before_idat: Sequence[bytes] = (),
    header: bytes | None = None,
) -> bytes:
    """A valid PNG of zeros (``header`` replaces its IHDR chunk; ``before_idat``
    are whole chunks put between it and the data)."""
    row = (width * _PNG_CHANNELS[colour] * depth + 7) // 8 + 1  # filter byte first
    idat = png_chunk(b"IDAT", deflate_zeros(row * height))
    head = header if header is not None else ihdr(width, height, depth, colour)
    return PNG_SIGNATURE + head + b"".join(before_idat) + idat + png_chunk(b"IEND", b"")


def png_rgba16(side: int = 6300) -> bytes:
    """The PNG: 16-bit RGBA, side x side (39.7 MP at 6300), about 0.3 MB."""
    return png_zeros(side, side, 16, 6)


def png_two_ihdr(small: int = 300, big: int = 20000) -> bytes:
    """IHDR says small x small; a second IHDR and the data say big x big."""
    return png_zeros(big, big, header=ihdr(small, small), before_idat=[ihdr(big, big)])


def apng(width: int = 300, height: int = 300, frames: int = 2) -> bytes:
    """An animated PNG: OpenCV keeps three full frames for it."""
    actl = png_chunk(b"acTL", struct.pack(">II", frames, 0))
    fctl = png_chunk(b"fcTL", struct.pack(">IIIIIHHBB", 0, width, height, 0, 0, 1, 10, 0, 0))
    return png_zeros(width, height, before_idat=[actl, fctl])


# --- JPEG ------------------------------------------------------------------------------


def jpeg(
    width: int = 320, height: int = 240, progressive: bool = False, grey: bool = False
) -> bytes:
    img = np.full((height, width) if grey else (height, width, 3), 128, np.uint8)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_PROGRESSIVE, int(progressive)])
    assert ok
    return buf.tobytes()


def jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each marker segment before the first scan's data."""
    out, i = [], 2
    while i + 4 <= len(data):
        marker = data[i + 1]
        out.append((i, marker))
        if marker == 0xDA:
            break
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        i += 2 + length
    return out


def _sof(data: bytes) -> tuple[int, bytes]:
    at = next(i for i, m in jpeg_segments(data) if m in (0xC0, 0xC1, 0xC2))
    (length,) = struct.unpack(">H", data[at + 2 : at + 4])
    return at, data[at : at + 2 + length]


def with_sof_size(segment: bytes, width: int, height: int) -> bytes:
    return segment[:5] + struct.pack(">HH", height, width) + segment[9:]


def jpeg_two_sof(small: int = 300, big: int = 20000) -> bytes:
    """Two frame headers before the scan: small x small, then big x big."""
    data = jpeg(small, small)
    at, sof = _sof(data)
    return data[: at + len(sof)] + with_sof_size(sof, big, big) + data[at + len(sof) :]


def jpeg_sof_after_scan(small: int = 300, big: int = 20000) -> bytes:
    """A progressive JPEG with a second frame header between its scans."""
    data = jpeg(small, small, progressive=True)
    _, sof = _sof(data)
    first_sos = next(i for i, m in jpeg_segments(data) if m == 0xDA)
    # The first marker after the first scan's entropy-coded data.
    (length,) = struct.unpack(">H", data[first_sos + 2 : first_sos + 4])
    after = re.compile(rb"\xff+[^\x00\xff\xd0-\xd7]").search(data, first_sos + 2 + length)
    assert after is not None
    at = after.start()
    return data[:at] + with_sof_size(sof, big, big) + data[at:]


def jpeg_dnl(width: int = 300, height: int = 300) -> bytes:
    """A frame header of height 0: the height is left to a DNL marker after the scan."""
    data = jpeg(width, height)
    at, sof = _sof(data)
    return data[:at] + with_sof_size(sof, width, 0) + data[at + len(sof) :]


def jpeg_with_exif_thumbnail(width: int = 320, height: int = 240, thumb: int = 4000) -> bytes:
    """An APP1 Exif segment holding a JPEG thumbnail whose own frame header says
    thumb x thumb: the parser must skip it as the decoder does."""
    small = jpeg(16, 16)
    at, sof = _sof(small)
    thumbnail = small[:at] + with_sof_size(sof, thumb, thumb) + small[at + len(sof) :]
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 0) + struct.pack(">I", 0)
    body = b"Exif\x00\x00" + tiff + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(body) + 2) + body
    data = jpeg(width, height)
    return data[:2] + app1 + data[2:]


# --- TIFF ------------------------------------------------------------------------------

Entry = tuple[int, int, int, int | bytes]  # tag, type, count, value (or out-of-line bytes)


def tiff(
    width: int,
    height: int,
    spp: int = 3,
    bps: int = 8,
    *,
    rows_per_strip: int | None = None,
    tile: tuple[int, int] | None = None,
    pixels: tuple[int, int] | None = None,
    override: Sequence[Entry] = (),
    duplicate_first: Sequence[Entry] = (),
    pages: int = 1,
    subfile_types: Sequence[int] | None = None,
) -> bytes:
    """A little-endian TIFF of zeros, deflate-compressed, in strips or tiles
    that all point at the same compressed block of zeros.

    ``pixels`` (width, height) is what one strip holds, where it differs from
    the tags (a tile always holds the tile's size); ``duplicate_first`` are
    entries written before the real ones with the same tags; ``override``
    replaces entries by tag; ``pages`` chains that many copies of the
    directory, the k-th with NewSubfileType ``subfile_types[k]`` where given
    (1: a reduced-resolution copy).
    """
    pw, ph = pixels or (width, height)
    if tile is None:
        rows = rows_per_strip or ph
        block = deflate_zeros(pw * min(rows, ph) * spp * bps // 8)
        pieces = -(-height // rows) if rows < height else 1
    else:
        block = deflate_zeros(tile[0] * tile[1] * spp * bps // 8)
        pieces = -(-width // tile[0]) * -(-height // tile[1])
    photometric = 2 if spp >= 3 else 1
    bits: int | bytes = bps if spp == 1 else struct.pack("<" + "H" * spp, *[bps] * spp)
    offsets: int | bytes = 0 if pieces == 1 else b"\0" * 4 * pieces  # filled in below
    counts: int | bytes = (
        len(block) if pieces == 1 else struct.pack(f"<{pieces}I", *[len(block)] * pieces)
    )
    entries: dict[int, Entry] = {
        256: (256, 4, 1, width),
        257: (257, 4, 1, height),
        258: (258, 3, spp, bits),
        259: (259, 3, 1, 8),  # deflate
        262: (262, 3, 1, photometric),
        277: (277, 3, 1, spp),
        284: (284, 3, 1, 1),
    }
    if spp == 4:
        entries[338] = (338, 3, 1, 2)  # unassociated alpha
    if tile is None:
        entries[273] = (273, 4, pieces, offsets)
        entries[278] = (278, 4, 1, rows)
        entries[279] = (279, 4, pieces, counts)
    else:
        entries[322] = (322, 4, 1, tile[0])
        entries[323] = (323, 4, 1, tile[1])
        entries[324] = (324, 4, pieces, offsets)
        entries[325] = (325, 4, pieces, counts)
    if subfile_types is not None:
        entries[254] = (254, 4, 1, 0)  # set per page below
    for e in override:
        entries[e[0]] = e
    ordered = list(duplicate_first) + sorted(entries.values(), key=lambda e: e[0])
    n = len(ordered)
    ifd_size = 2 + 12 * n + 4
    extra_at = 8 + pages * ifd_size
    extra = bytearray()
    layouts = []
    for tag, typ, count, value in ordered:
        if isinstance(value, bytes):
            layouts.append((tag, typ, count, extra_at + len(extra), tag in (273, 324)))
            extra += value + b"\0" * (len(value) % 2)
        else:
            layouts.append((tag, typ, count, value, tag in (273, 324)))
    block_at = extra_at + len(extra)
    for _tag, _typ, count, at, is_offsets in layouts:
        if is_offsets and count > 1:  # the offsets array: every piece at the block
            start = at - extra_at
            extra[start : start + 4 * count] = struct.pack(f"<{count}I", *[block_at] * count)
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for k in range(pages):
        out += struct.pack("<H", n)
        for tag, typ, count, value, is_offsets in layouts:
            if is_offsets and count == 1:
                value = block_at
            if tag == 254 and subfile_types is not None:
                value = subfile_types[k]
            if typ == 3 and count == 1:
                out += struct.pack("<HHIHH", tag, typ, count, value, 0)
            else:
                out += struct.pack("<HHII", tag, typ, count, value)
        out += struct.pack("<I", 8 + (k + 1) * ifd_size if k + 1 < pages else 0)
    return bytes(out + extra) + block


def tiff_duplicate_size(small: int = 300, big: int = 20000) -> bytes:
    """The TIFF (about 1.2 MB): 20000x20000 RGB of zeros whose first
    directory names its size twice, big first, small last."""
    return tiff(
        small,
        small,
        pixels=(big, big),
        rows_per_strip=big,
        duplicate_first=[(256, 4, 1, big), (257, 4, 1, big)],
    )


# --- BMP -------------------------------------------------------------------------------


def bmp(width: int, height: int, bpp: int = 24, *, rle8_end: bool = False) -> bytes:
    """A BITMAPINFOHEADER BMP of zeros; ``rle8_end``: 8-bit RLE whose data is
    just the end-of-bitmap code (a few bytes for any size)."""
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256)) if bpp <= 8 else b""
    if rle8_end:
        pixels, compression = b"\x00\x01", 1
    else:
        pitch = ((abs(width) * bpp + 31) // 32) * 4
        pixels, compression = b"\0" * (pitch * abs(height)), 0
    offset = 14 + 40 + len(palette)
    dib = struct.pack(
        "<IiiHHIIiiII", 40, width, height, 1, bpp, compression, len(pixels), 2835, 2835, 0, 0
    )
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + dib + palette + pixels
