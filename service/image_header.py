"""Image headers, byte by byte: what a file says it is, before any pixel is decoded.

Format, stored size, EXIF orientation, whether it is single-channel, the
sample type the decoder will give, and how much memory the decoder needs
besides the pixels (strip, tile, coefficient and row buffers), for PNG,
JPEG, BMP and TIFF. No OpenCV and no numpy here: this module can be fuzzed
alone (tests/unit/test_image_header.py), and the server reserves decode
memory from what it says before the decoder runs.

Every size-bearing structure of a file is read, not only the first: all
chunks of a PNG (a second IHDR, animation chunks), every marker of a JPEG up
to its end (a second frame header, before or after a scan; a height left to
a DNL marker), every directory of a TIFF (each tag once; a second page; the
strip and tile sizes the decoder allocates buffers for) and a BMP's palette.
A file that says two things about its size is refused, so the size read
here is the size the decoder allocates; :mod:`service.preprocessing` then
has OpenCV decode into an array of exactly that shape, which OpenCV checks
against its own reading of the header before it decodes.

Every refusal is an :class:`~service.rejection.InputRejected`; nothing else
is raised, whatever the bytes.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

from service.contract import CodecFormat
from service.rejection import InputRejected, Reject

DEFAULT_MAX_PIXELS = 40_000_000  # a 4096x3000 camera frame is 12.3 MP

MIB = 2**20
_ITEMSIZE = {"uint8": 1, "uint16": 2, "float32": 4, "float64": 8}


@dataclass(frozen=True)
class Header:
    """What the file header says, before any pixel is decoded."""

    format: str  # png, jpeg, bmp or tiff
    width: int  # as stored
    height: int
    orientation: int = 1  # EXIF: 1 upright, 2..8 mirrored and/or rotated
    grey: bool = False  # single-channel (grey or grey+alpha): decoded to one channel
    dtype: str = "uint8"  # the samples the decoder gives: uint8, uint16, float32, float64
    # Bytes the decoder holds besides the decoded pixels, at most: strip and
    # tile buffers (TIFF), the coefficients of a multi-scan JPEG, row buffers.
    work_bytes: int = 0
    # TIFF: where the orientation tag's value is, and its bytes for "1", so the
    # decoder (libtiff, which rotates by itself) can be handed an upright file.
    orientation_patch: tuple[int, bytes] | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) upright: orientations 5..8 swap the axes."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)

    @property
    def channels(self) -> int:
        """Channels decoded: one for single-channel images, else three (alpha is dropped)."""
        return 1 if self.grey else 3

    @property
    def itemsize(self) -> int:
        return _ITEMSIZE[self.dtype]

    def pixel_bytes(self, factor: int = 1) -> int:
        """Bytes of the decoded pixels, the stored size divided by ``factor``
        (rounded up, as libjpeg does when it decodes scaled down)."""
        w, h = -(-self.width // factor), -(-self.height // factor)
        return w * h * self.channels * self.itemsize


def _corrupt(message: str) -> InputRejected:
    return InputRejected(Reject.CORRUPT, message)


def _unsupported(message: str) -> InputRejected:
    return InputRejected(Reject.UNSUPPORTED_FORMAT, message)


def _truncated(fmt: str) -> InputRejected:
    return InputRejected(Reject.TRUNCATED, f"the {fmt.upper()} header ends early")


def sniff(data: bytes) -> CodecFormat | None:
    """The image format by its signature; None if not one the service reads."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"BM"):
        return "bmp"
    if data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    return None


# --- TIFF structures (TIFF files, and the Exif blocks of JPEG and PNG) ----------------

# type -> struct code; the integer types a size or a count may be stored as.
_TIFF_INT = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TIFF_MAX_ENTRIES = 4096  # libtiff refuses a directory with more
_TIFF_MAX_IFDS = 16


@dataclass(frozen=True)
class _Entry:
    typ: int
    count: int
    at: int  # offset of the entry's value field


@dataclass(frozen=True)
class _Tiff:
    data: bytes
    order: str  # "<" or ">"
    big: bool  # BigTIFF: 8-byte counts and offsets

    @property
    def inline(self) -> int:
        return 8 if self.big else 4

    def unpack(self, fmt: str, at: int) -> tuple[int, ...]:
        size = struct.calcsize(self.order + fmt)
        if at < 0 or at + size > len(self.data):
            raise _truncated("tiff")
        return struct.unpack_from(self.order + fmt, self.data, at)

    def directory(self, offset: int) -> tuple[dict[int, _Entry], int]:
        """The entries of the directory at ``offset``, by tag, and the next
        directory's offset (0: none). A tag named twice is refused."""
        if self.big:
            (count,) = self.unpack("Q", offset)
            first, size = offset + 8, 20
        else:
            (count,) = self.unpack("H", offset)
            first, size = offset + 2, 12
        if count > _TIFF_MAX_ENTRIES:
            raise _corrupt(f"a TIFF directory of {count} entries (libtiff reads at most 4096)")
        end = first + count * size
        if end + self.inline > len(self.data):
            raise _truncated("tiff")
        entries: dict[int, _Entry] = {}
        for k in range(count):
            at = first + k * size
            tag, typ = struct.unpack_from(self.order + "HH", self.data, at)
            (n,) = struct.unpack_from(self.order + ("Q" if self.big else "I"), self.data, at + 4)
            if tag in entries:
                raise _corrupt(f"the TIFF directory at byte {offset} names tag {tag} twice")
            entries[tag] = _Entry(typ, n, at + (12 if self.big else 8))
        (following,) = self.unpack("Q" if self.big else "I", end)
        return entries, following

    def value_at(self, entry: _Entry) -> int:
        """Where an entry's values are: in the entry where they fit, else at its offset."""
        size = struct.calcsize(_TIFF_INT.get(entry.typ, "B")) * entry.count
        if size <= self.inline:
            return entry.at
        (at,) = self.unpack("Q" if self.big else "I", entry.at)
        return at

    def values(self, tag: int, entry: _Entry, limit: int = 16) -> list[int]:
        """The integers an entry holds (at most ``limit`` of them)."""
        code = _TIFF_INT.get(entry.typ)
        if code is None:
            raise _corrupt(f"TIFF tag {tag} of type {entry.typ}")
        if not 1 <= entry.count <= limit:
            raise _corrupt(f"TIFF tag {tag} holds {entry.count} values")
        values = list(self.unpack(code * entry.count, self.value_at(entry)))
        if min(values) < 0:
            raise _corrupt(f"TIFF tag {tag} is negative")
        return values

    def one(self, tags: dict[int, _Entry], tag: int, default: int | None = None) -> int:
        """A single-valued tag; ``default`` where it is absent (None: required)."""
        entry = tags.get(tag)
        if entry is None:
            if default is None:
                raise _corrupt(f"the TIFF has no tag {tag}")
            return default
        return self.values(tag, entry, limit=1)[0]


def _tiff_open(data: bytes) -> tuple[_Tiff, int]:
    """The structure and its first directory's offset."""
    if len(data) < 8:
        raise _truncated("tiff")
    order = "<" if data[:2] == b"II" else ">"
    big = data[2:4] in (b"+\x00", b"\x00+")
    tiff = _Tiff(data, order, big)
    if big:
        bytesize, _zero, first = tiff.unpack("HHQ", 4)
        if bytesize != 8:
            raise _corrupt("a BigTIFF whose offsets are not 8 bytes")
    else:
        (first,) = tiff.unpack("I", 4)
    return tiff, first


_ORIENTATION_TAG = 274


def _exif_orientation(block: bytes) -> int:
    """The orientation in an Exif block (a TIFF structure); 1 where there is
    none or it cannot be read: broken metadata does not refuse a good image."""
    if block[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    try:
        tiff, first = _tiff_open(block)
        tags, _ = tiff.directory(first)
        value = tiff.one(tags, _ORIENTATION_TAG, 1)
    except (InputRejected, struct.error, IndexError):
        return 1
    return value if 1 <= value <= 8 else 1


# Photometric interpretations: 0, 1 grey; 2 RGB; 3 palette; 32844/32845 LogLuv.
_LOGLUV = (32844, 32845)
_GIB = 2**30
_TIFF_SMALL_TILE = 1024 * 1024  # pixels: any image may come in tiles or strips this large


def _tiff_header(data: bytes) -> Header:
    tiff, offset = _tiff_open(data)
    directories: list[dict[int, _Entry]] = []
    seen: set[int] = set()
    while offset:
        if offset in seen:
            raise _corrupt("the TIFF's directories form a loop")
        if len(directories) == _TIFF_MAX_IFDS:
            raise _unsupported(f"a TIFF of more than {_TIFF_MAX_IFDS} directories")
        seen.add(offset)
        entries, offset = tiff.directory(offset)
        directories.append(entries)
    if not directories:
        raise _corrupt("the TIFF has no image directory")

    def reduced(tags: dict[int, _Entry]) -> bool:
        # NewSubfileType bit 0, or the old SubfileType 2: a reduced-resolution
        # copy of another image in the file (a thumbnail, a pyramid level).
        return bool(tiff.one(tags, 254, 0) & 1) or tiff.one(tags, 255, 1) == 2

    tags = directories[0]
    if reduced(tags):
        raise _unsupported("the TIFF's first image is a reduced-resolution copy of another")
    pages = 1 + sum(not reduced(t) for t in directories[1:])
    if pages > 1:
        raise _unsupported(f"a TIFF of {pages} pages; send one image per request")

    w, h = tiff.one(tags, 256), tiff.one(tags, 257)
    if w == 0 or h == 0:
        raise _corrupt(f"the header gives a size of {w}x{h}")
    photometric = tiff.one(tags, 262)
    spp = tiff.one(tags, 277, 1)
    if not 1 <= spp <= 4:
        raise _unsupported(f"a TIFF of {spp} samples per pixel")
    bits_all = tiff.values(258, tags[258], limit=spp) if 258 in tags else [1]
    formats = tiff.values(339, tags[339], limit=spp) if 339 in tags else [1]
    if len(set(bits_all)) != 1 or len(set(formats)) != 1:
        raise _unsupported("a TIFF whose samples differ in size or type")
    bits, sample_format = bits_all[0], formats[0]
    dtype = _tiff_dtype(photometric, spp, bits, sample_format)

    orientation = tiff.one(tags, _ORIENTATION_TAG, 1)
    patch = None
    if _ORIENTATION_TAG in tags and orientation != 1:
        entry = tags[_ORIENTATION_TAG]
        code = _TIFF_INT[entry.typ]  # one() has checked it is an integer type
        patch = (tiff.value_at(entry), struct.pack(tiff.order + code, 1))
    tiled = 322 in tags or 323 in tags
    tile = (tiff.one(tags, 322), tiff.one(tags, 323)) if tiled else None
    work = _tiff_work(
        w, h, spp, bits, dtype, tile,
        tiff.one(tags, 278, 0xFFFFFFFF), photometric, tiff.one(tags, 284, 1),
        tiff.one(tags, 259, 1),
    )  # fmt: skip
    return Header(
        "tiff",
        w,
        h,
        orientation if 1 <= orientation <= 8 else 1,
        photometric in (0, 1),
        dtype,
        work,
        patch,
    )


def _tiff_dtype(photometric: int, spp: int, bits: int, sample_format: int) -> str:
    """The sample type OpenCV's TIFF decoder gives (its readHeader's rules),
    of those the service converts; the others are refused here."""
    if photometric in _LOGLUV and spp == 3:
        return "float32"
    if bits > 8 and (photometric > 2 or spp not in (1, 3, 4)):
        bits = 8  # decoded through libtiff's RGBA reader
    signed = sample_format == 2
    if bits in (1, 8) or (bits == 4 and photometric == 3):
        if sample_format == 3 or signed:
            raise _unsupported(f"TIFF samples of {bits} bits, format {sample_format}")
        return "uint8"
    if bits in (10, 12, 14, 16):
        if sample_format == 3 or signed:
            raise _unsupported(f"TIFF samples of {bits} bits, format {sample_format}")
        return "uint16"
    if bits in (32, 64) and sample_format == 3:
        if spp not in (1, 3):  # OpenCV decodes float samples only as they are stored
            raise _unsupported(f"floating-point TIFF of {spp} samples per pixel")
        return "float32" if bits == 32 else "float64"
    raise _unsupported(f"TIFF samples of {bits} bits, format {sample_format}")


def _tiff_work(
    w: int,
    h: int,
    spp: int,
    bits: int,
    dtype: str,
    tile: tuple[int, int] | None,
    rows_per_strip: int,
    photometric: int,
    planar: int,
    compression: int,
) -> int:
    """The buffers OpenCV's TIFF decoder allocates (its readData), and libtiff's
    one strip or tile of decoded samples: a tile or a strip may be larger than
    the image, and OpenCV sizes its buffer by them, not by the image."""
    if tile is not None:
        tw, th = tile
        if tw == 0 or th == 0:
            raise _corrupt(f"TIFF tiles of {tw}x{th}")
    else:
        tw = w
        th = h if rows_per_strip in (0, 0xFFFFFFFF) else rows_per_strip
    # A strip or tile a few times the image (a small image in 256x256 tiles)
    # is common; one far larger only makes the decoder allocate for it.
    if tw * th > max(4 * w * h, _TIFF_SMALL_TILE):
        raise _corrupt(f"TIFF strips or tiles of {tw}x{th} for an image of {w}x{h}")
    dst_bits = _ITEMSIZE[dtype] * 8
    ncn, nbits = spp, bits
    # OpenCV reads a single strip of over 0.95 GiB row by row, on these conditions
    # (and for 4 samples only with associated alpha: not counted on here).
    one_strip = (
        tile is None
        and th == h
        and photometric in (0, 1, 2)
        and planar != 2
        and spp in (1, 3)
        and bits in (8, 16)
    )
    rgba = False
    if dst_bits == 8:
        if not (tw * th * 4 >= _GIB * 95 // 100 and one_strip):
            ncn, nbits, rgba = 4, 8, True  # read through libtiff's RGBA reader
        else:
            th = 1  # row by row
    elif dst_bits == 16 and tw * th * ncn * max(1, bits // 8) >= _GIB * 95 // 100 and one_strip:
        th = 1
    buffer = th * -(-(ncn * tw * nbits) // 8)
    if buffer >= _GIB:
        raise _unsupported(f"TIFF strips or tiles of {buffer} bytes (OpenCV reads under 1 GiB)")
    unpacked = th * -(-(ncn * tw * dst_bits) // 8) if nbits < dst_bits else 0
    # libtiff's RGBA reader decodes a strip or tile into its own buffer first;
    # the other paths decode into OpenCV's.
    rows = min(rows_per_strip or h, h) if tile is None else tile[1]
    decoded = rows * -(-(spp * (tile[0] if tile else w) * bits) // 8)
    jpeg = decoded if compression in (6, 7) else 0  # libjpeg's own buffers in libtiff
    return buffer + unpacked + (decoded if rgba else 0) + jpeg + MIB


# --- PNG -----------------------------------------------------------------------------

_PNG_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}
_PNG_MAX_CHUNKS = 100_000
_PNG_ANIMATION = (b"acTL", b"fcTL", b"fdAT")


def _png_header(data: bytes) -> Header:
    n = len(data)
    if n < 16:
        raise _truncated("png")
    if data[12:16] != b"IHDR" or data[8:12] != b"\x00\x00\x00\x0d":
        raise _corrupt("the PNG does not start with a 13-byte IHDR chunk")
    if n < 33:
        raise _truncated("png")
    w, h, depth, colour, compression, filtering, interlace = struct.unpack_from(
        ">IIBBBBB", data, 16
    )
    if not (0 < w < 2**31 and 0 < h < 2**31):
        raise _corrupt(f"the header gives a size of {w}x{h}")
    if depth not in _PNG_DEPTHS.get(colour, ()):
        raise _corrupt(f"PNG colour type {colour} at bit depth {depth}")
    if compression or filtering or interlace > 1:
        raise _corrupt("PNG compression, filter or interlace method unknown")
    orientation, exif_seen, idat, ended = 1, False, False, False
    i, chunks = 33, 1
    while i + 8 <= n:
        length, kind = struct.unpack_from(">I4s", data, i)
        chunks += 1
        if length >= 2**31 or chunks > _PNG_MAX_CHUNKS:
            raise _corrupt(f"PNG chunk {chunks} at byte {i}")
        end = i + 12 + length
        if kind == b"IHDR":
            raise _corrupt(f"a second IHDR chunk at byte {i}")
        if kind in _PNG_ANIMATION:
            raise _unsupported("an animated PNG; send one still image")
        if kind == b"IEND":
            ended = True
            break
        if kind == b"IDAT":
            idat = True
        elif kind == b"eXIf" and not idat and not exif_seen:  # before the image data, if at all
            orientation, exif_seen = _exif_orientation(data[i + 8 : min(end - 4, n)]), True
        i = end
    if not ended:
        raise InputRejected(Reject.TRUNCATED, "the PNG has no end chunk (file cut off?)")
    if not idat:
        raise _corrupt("the PNG has no image data")
    # libpng's current and previous rows (at most 8 bytes a pixel), zlib's window.
    work = 2 * (8 * w + 64) + MIB
    return Header(
        "png", w, h, orientation, colour in (0, 4), "uint16" if depth == 16 else "uint8", work
    )


# --- JPEG ----------------------------------------------------------------------------

# Frame headers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) are not frames.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC9, 0xCA, 0xCB}
_JPEG_HIERARCHICAL = {0xC5, 0xC6, 0xC7, 0xCD, 0xCE, 0xCF, 0xDE, 0xDF}
_JPEG_PROGRESSIVE = {0xC2, 0xCA}
# The next marker after entropy-coded data: 0xFF then neither a stuffed 0x00
# nor a restart marker (D0-D7); a fill byte (0xFF) is skipped by the walk.
# A literal first byte: the regex engine skips to each 0xFF at C speed.
_JPEG_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7]")


@dataclass(frozen=True)
class _Frame:
    at: int
    width: int
    height: int
    sampling: tuple[tuple[int, int], ...]  # (h, v) per component
    progressive: bool


def _jpeg_frame(data: bytes, at: int, marker: int, length: int) -> _Frame:
    if marker in _JPEG_HIERARCHICAL:
        raise _unsupported(f"a hierarchical JPEG (frame marker 0x{marker:02X})")
    if length < 8:
        raise _corrupt("JPEG frame header too short")
    precision, h, w, nf = struct.unpack_from(">BHHB", data, at + 4)
    if length != 8 + 3 * nf:
        raise _corrupt("JPEG frame header length does not match its components")
    if precision != 8:
        raise _unsupported(f"{precision}-bit JPEG samples (the decoder reads 8-bit)")
    if h == 0:
        raise _unsupported("a JPEG whose height is given after the scan (DNL)")
    if w == 0:
        raise _corrupt("the JPEG frame header gives a width of 0")
    if nf not in (1, 3, 4):
        raise _unsupported(f"a JPEG of {nf} components")
    sampling = tuple((data[at + 11 + 3 * c] >> 4, data[at + 11 + 3 * c] & 15) for c in range(nf))
    if any(not (1 <= hs <= 4 and 1 <= vs <= 4) for hs, vs in sampling):
        raise _corrupt("JPEG sampling factors outside 1..4")
    return _Frame(at, w, h, sampling, marker in _JPEG_PROGRESSIVE)


def _jpeg_work(frame: _Frame, multi_scan: bool) -> int:
    """libjpeg's memory besides the output: row buffers, and for a file of
    several scans (progressive, or components in separate scans) every
    coefficient of the image, 2 bytes each, whatever the output scale."""
    w, h = frame.width, frame.height
    hmax = max(hs for hs, _ in frame.sampling)
    vmax = max(vs for _, vs in frame.sampling)
    work = 64 * w * len(frame.sampling) + MIB
    if multi_scan:
        for hs, vs in frame.sampling:
            cols = -(-(w * hs) // (hmax * 8))
            rows = -(-(h * vs) // (vmax * 8))
            work += -(-cols // hs) * hs * -(-rows // vs) * vs * 128
    return work


def _jpeg_header(data: bytes) -> Header:
    n = len(data)
    i = 2
    orientation: int | None = None
    frame: _Frame | None = None
    multi_scan, scans = False, 0
    while True:
        if i + 2 > n:
            raise InputRejected(Reject.TRUNCATED, "the JPEG ends before its end marker")
        if data[i] != 0xFF:
            raise _corrupt(f"JPEG marker expected at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker == 0xD9:  # end of image
            break
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        if marker in (0x00, 0xD8):
            raise _corrupt(f"JPEG marker 0x{marker:02X} out of place at byte {i}")
        if i + 4 > n:
            raise _truncated("jpeg")
        (length,) = struct.unpack_from(">H", data, i + 2)
        end = i + 2 + length
        if length < 2:
            raise _corrupt(f"JPEG segment of length {length} at byte {i}")
        if end > n:
            raise _truncated("jpeg")
        if marker == 0xE1 and orientation is None and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[i + 10 : end])
        elif marker in _JPEG_SOF or marker in _JPEG_HIERARCHICAL:
            if frame is not None:
                raise _corrupt(f"a second JPEG frame header at byte {i} (the first at {frame.at})")
            frame = _jpeg_frame(data, i, marker, length)
        elif marker == 0xDC:
            raise _unsupported("a JPEG whose height is given after the scan (DNL)")
        elif marker == 0xDA:  # start of scan: entropy-coded data up to the next marker
            if frame is None:
                raise _corrupt("JPEG has no frame header")
            if length < 3:
                raise _corrupt("JPEG scan header too short")
            # As libjpeg decides it at the first scan: one scan of every component
            # decodes row by row; anything else keeps all coefficients.
            scans += 1
            multi_scan = (
                multi_scan or scans > 1 or frame.progressive or data[i + 4] < len(frame.sampling)
            )
            found = _JPEG_NEXT_MARKER.search(data, end)
            if found is None:
                raise InputRejected(Reject.TRUNCATED, "the JPEG ends inside its scan data")
            i = found.start()
            continue
        i = end
    if frame is None:
        raise _corrupt("JPEG has no frame header")
    return Header(
        "jpeg",
        frame.width,
        frame.height,
        orientation or 1,
        len(frame.sampling) == 1,
        "uint8",
        _jpeg_work(frame, multi_scan),
    )


# --- BMP -----------------------------------------------------------------------------

# (bits per pixel, compression) OpenCV's BMP decoder reads: 0 none, 1 RLE8, 2 RLE4, 3 bitfields.
_BMP_MODES = {(1, 0), (4, 0), (8, 0), (24, 0), (32, 0), (16, 0), (16, 3), (32, 3), (4, 2), (8, 1)}


def _bmp_header(data: bytes) -> Header:
    if len(data) < 26:
        raise _truncated("bmp")
    (dib,) = struct.unpack_from("<I", data, 14)
    palette_at = 14 + dib
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes, 3-byte palette entries
        w, h, _planes, bpp = struct.unpack_from("<HHHH", data, 18)
        compression, used, entry = 0, 0, 3
        if bpp not in (1, 4, 8, 24, 32):
            raise _unsupported(f"a {bpp}-bit OS/2 BMP")
    elif 36 <= dib < 2**31:  # BITMAPINFOHEADER and its successors
        if len(data) < 50:
            raise _truncated("bmp")
        w, h, _planes, bpp, compression = struct.unpack_from("<iiHHI", data, 18)
        (used,) = struct.unpack_from("<i", data, 46)
        entry = 4
        if (bpp, compression) not in _BMP_MODES:
            raise _unsupported(f"a {bpp}-bit BMP of compression {compression}")
        if not 0 <= used <= 256:
            raise _corrupt(f"a BMP palette of {used} colours")
        if (bpp, compression) == (16, 3):
            if len(data) < palette_at + 12:
                raise _truncated("bmp")
            masks = struct.unpack_from("<III", data, palette_at)
            if masks not in ((0x7C00, 0x3E0, 0x1F), (0xF800, 0x7E0, 0x1F)):
                raise _unsupported("a 16-bit BMP with colour masks other than 5-5-5 or 5-6-5")
    else:
        raise _corrupt(f"a BMP header of {dib} bytes")
    if w <= 0 or h == 0 or h == -(2**31):
        raise _corrupt(f"the header gives a size of {w}x{h}")
    grey = False
    if bpp <= 8:
        # OpenCV decodes a palette image to one channel where every colour of
        # its palette (the full 2^bpp entries, zeros beyond those stored) is grey.
        count = used or 1 << bpp
        if len(data) < palette_at + count * entry:
            raise _truncated("bmp")
        colours = [data[palette_at + k * entry : palette_at + k * entry + 3] for k in range(count)]
        grey = all(c[0] == c[1] == c[2] for c in colours)
    # abs: a negative height means top-down rows. OpenCV's row buffers.
    return Header("bmp", w, abs(h), 1, grey, "uint8", 8 * w + 64 * 1024)


# --- all formats ---------------------------------------------------------------------


def read_header(data: bytes) -> Header:
    """Format, stored size, EXIF orientation, channels, sample type and the
    decoder's working memory, from the file's structure alone."""
    if not data:
        raise InputRejected(Reject.EMPTY, "the request carried no image bytes")
    fmt = sniff(data)
    if fmt is None:
        raise InputRejected(Reject.UNSUPPORTED_FORMAT, "not a PNG, JPEG, BMP or TIFF image")
    parse = {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header, "tiff": _tiff_header}
    try:
        return parse[fmt](data)
    except (struct.error, IndexError) as exc:  # a structure cut off where no check caught it
        raise _truncated(fmt) from exc


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; the size upright, as
    the image is inspected (EXIF orientation applied)."""
    head = read_header(data)
    return (head.format, *head.size)


_PNG_IEND = b"IEND\xae\x42\x60\x82"


def check_complete(fmt: str, data: bytes) -> None:
    """Refuse a file cut off before its end.

    libjpeg and libpng can hand back a partly grey image from a cut-off
    file with only a warning; a part photographed half is not inspected.
    """
    if fmt == "png" and _PNG_IEND not in data[-64:]:
        raise InputRejected(Reject.TRUNCATED, "the PNG has no end chunk (file cut off?)")
    if fmt == "jpeg" and data.rfind(b"\xff\xd9", max(0, len(data) - 4096)) < 0:
        raise InputRejected(Reject.TRUNCATED, "the JPEG has no end marker (file cut off?)")
    if fmt == "bmp" and len(data) >= 6:
        (declared,) = struct.unpack("<I", data[2:6])
        if declared > len(data):
            raise InputRejected(
                Reject.TRUNCATED, f"the BMP declares {declared} bytes but has {len(data)}"
            )
