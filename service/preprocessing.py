"""Bytes in, model input out: the one preprocessing used by trainer and server.

decode (OpenCV; PNG, JPEG, BMP, TIFF; 8- or 16-bit; grey, RGB or RGBA)
-> upright (EXIF orientation) -> colour as the model's InputSpec says
-> RGB -> resize to the model's input size (area filter when shrinking)
-> scale to [0, 1] -> normalise as the metadata says -> CHW float32.

One view of the input: an image is inspected the way a viewer shows it. The
EXIF orientation (JPEG APP1, PNG eXIf, TIFF tag 274) is always applied, at
every size, and every size check (pixel budget, smallest size, header against
pixels) is on the upright size.

Colour follows the metadata: an RGB model refuses a single-channel image
(grey, or grey with alpha) as ``wrong_colour``; a grey model converts colour
images to luma (ITU-R BT.601, as OpenCV's BGR2GRAY) and, like grey images,
replicates them to the three input channels its graph expects.

Every refusal is an :class:`InputRejected` with a machine-readable ``reason``,
which the server turns into a 4xx answer. The image size is read from the
file header *before* decoding, so a decompression bomb (a few kilobytes that
inflate to gigabytes) is refused without allocating it.
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass
from enum import StrEnum

import cv2
import numpy as np

from service.codec import detect_codec, sniff_format
from service.contract import Codec, InputSpec, Normalization, TileGrid

DEFAULT_MAX_PIXELS = 40_000_000  # a 4096x3000 camera frame is 12.3 MP


class Reject(StrEnum):
    """Why an input was refused; stable strings for clients and metric labels."""

    EMPTY = "empty"
    UNSUPPORTED_FORMAT = "unsupported_format"
    TRUNCATED = "truncated"
    CORRUPT = "corrupt"
    TOO_MANY_PIXELS = "too_many_pixels"
    TOO_SMALL = "too_small"
    WRONG_COLOUR = "wrong_colour"


class InputRejected(ValueError):
    def __init__(self, reason: Reject, message: str) -> None:
        self.reason = reason
        self.message = message
        super().__init__(f"{reason.value}: {message}")


@dataclass(frozen=True)
class PreparedImage:
    tensor: np.ndarray  # (3, H, W) float32, normalised: the model's input for one image
    rgb: np.ndarray  # (H, W, 3) uint8 at model resolution, for heatmap overlays
    source_size: tuple[int, int]  # (width, height) as posted, upright (EXIF orientation applied)
    codec: Codec | None = None  # what the bytes were encoded as (format, JPEG quality)


# --- header parsing: size and format without decoding -------------------------

_PNG_IEND = b"IEND\xae\x42\x60\x82"
# JPEG start-of-frame markers carry the size; C4 (DHT), C8 (JPG) and CC (DAC) do not.
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _sniff(data: bytes) -> str:
    fmt = sniff_format(data)
    if fmt is None:
        raise InputRejected(Reject.UNSUPPORTED_FORMAT, "not a PNG, JPEG, BMP or TIFF image")
    return fmt


def _truncated(fmt: str) -> InputRejected:
    return InputRejected(Reject.TRUNCATED, f"the {fmt.upper()} header ends early")


@dataclass(frozen=True)
class Header:
    """What the file header says, before any pixel is decoded."""

    format: str  # png, jpeg, bmp or tiff
    width: int  # as stored
    height: int
    orientation: int = 1  # EXIF: 1 upright, 2..8 mirrored and/or rotated
    grey: bool | None = None  # single-channel (grey or grey+alpha); None: the pixels tell

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) upright: orientations 5..8 swap the axes."""
        return (self.height, self.width) if self.orientation >= 5 else (self.width, self.height)


def _tiff_ifd0(tiff: bytes, wanted: frozenset[int]) -> dict[int, int]:
    """The single-number values of the ``wanted`` tags of a TIFF structure's
    first IFD (a TIFF file, or the Exif block of a JPEG or PNG).

    Raises struct.error where the structure ends early.
    """
    order = "<" if tiff[:2] == b"II" else ">"
    big = tiff[2:4] in (b"+\x00", b"\x00+")
    if big:  # BigTIFF: 8-byte offsets and counts, 20-byte entries
        (ifd,) = struct.unpack(order + "Q", tiff[8:16])
        (count,) = struct.unpack(order + "Q", tiff[ifd : ifd + 8])
        first, size = ifd + 8, 20
    else:
        (ifd,) = struct.unpack(order + "I", tiff[4:8])
        (count,) = struct.unpack(order + "H", tiff[ifd : ifd + 2])
        first, size = ifd + 2, 12
    found: dict[int, int] = {}
    for e in range(min(count, 4096)):
        at = first + e * size
        tag, typ = struct.unpack(order + "HH", tiff[at : at + 4])
        if tag in wanted:
            value_at = at + (12 if big else 8)
            fmt = {3: "H", 4: "I", 16: "Q"}.get(typ)
            if fmt is None:
                raise InputRejected(Reject.CORRUPT, f"TIFF tag {tag} of type {typ}")
            (found[tag],) = struct.unpack(
                order + fmt, tiff[value_at : value_at + struct.calcsize(fmt)]
            )
    return found


_ORIENTATION_TAG = 274


def _exif_orientation(tiff: bytes) -> int:
    """The orientation in an Exif block (a TIFF structure); 1 where there is
    none or it cannot be read: broken metadata does not refuse a good image."""
    if tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        return 1
    try:
        value = _tiff_ifd0(tiff, frozenset({_ORIENTATION_TAG})).get(_ORIENTATION_TAG, 1)
    except (struct.error, InputRejected):
        return 1
    return value if 1 <= value <= 8 else 1


def _png_header(data: bytes) -> Header:
    if len(data) < 26 or data[12:16] != b"IHDR":
        raise _truncated("png")
    w, h = struct.unpack(">II", data[16:24])
    colour_type = data[25]  # 0 grey, 2 RGB, 3 palette, 4 grey+alpha, 6 RGBA
    orientation, i = 1, 8
    while i + 8 <= len(data):  # eXIf comes before the image data, if at all
        (length,) = struct.unpack(">I", data[i : i + 4])
        kind = data[i + 4 : i + 8]
        if kind == b"eXIf":
            orientation = _exif_orientation(data[i + 8 : i + 8 + length])
            break
        if kind in (b"IDAT", b"IEND"):
            break
        i += 12 + length
    return Header("png", w, h, orientation, colour_type in (0, 4))


def _bmp_header(data: bytes) -> Header:
    if len(data) < 26:
        raise _truncated("bmp")
    (dib_size,) = struct.unpack("<I", data[14:18])
    if dib_size == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        w, h = struct.unpack("<HH", data[18:22])
    else:
        w, h = struct.unpack("<ii", data[18:26])
    # abs: a negative height means top-down rows. Whether a palette is grey,
    # only OpenCV's decoding tells (it gives one channel for a grey palette).
    return Header("bmp", abs(w), abs(h))


def _jpeg_header(data: bytes) -> Header:
    i, n = 2, len(data)
    orientation: int | None = None
    while i + 4 <= n:
        if data[i] != 0xFF:
            raise InputRejected(Reject.CORRUPT, "JPEG marker expected")
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # standalone markers
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker == 0xE1 and orientation is None and data[i + 4 : i + 10] == b"Exif\x00\x00":
            orientation = _exif_orientation(data[i + 10 : i + 2 + length])
        if marker in _JPEG_SOF:
            if i + 10 > n:
                break
            h, w = struct.unpack(">HH", data[i + 5 : i + 9])
            components = data[i + 9]
            return Header("jpeg", w, h, orientation or 1, components == 1)
        if marker == 0xDA:  # start of scan before any frame header
            raise InputRejected(Reject.CORRUPT, "JPEG has no frame header")
        i += 2 + length
    raise _truncated("jpeg")


def _tiff_header(data: bytes) -> Header:
    # 256/257 width/height, 262 photometric interpretation (0, 1: grey), 274 orientation
    try:
        tags = _tiff_ifd0(data, frozenset({256, 257, 262, _ORIENTATION_TAG}))
        w, h = tags[256], tags[257]
    except (struct.error, KeyError) as exc:
        raise _truncated("tiff") from exc
    orientation = tags.get(_ORIENTATION_TAG, 1)
    photometric = tags.get(262)
    return Header(
        "tiff",
        w,
        h,
        orientation if 1 <= orientation <= 8 else 1,
        None if photometric is None else photometric in (0, 1),
    )


def read_header(data: bytes) -> Header:
    """Format, stored size, EXIF orientation and (where the header says) whether
    the image is single-channel, from the header alone."""
    if not data:
        raise InputRejected(Reject.EMPTY, "the request carried no image bytes")
    fmt = _sniff(data)
    return {"png": _png_header, "jpeg": _jpeg_header, "bmp": _bmp_header, "tiff": _tiff_header}[
        fmt
    ](data)


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) from the header alone; the size upright, as
    the image is inspected (EXIF orientation applied)."""
    head = read_header(data)
    return (head.format, *head.size)


def _check_complete(fmt: str, data: bytes) -> None:
    # libjpeg and libpng can hand back a partly grey image from a cut-off
    # file with only a warning; a part photographed half is not inspected.
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


# --- decode and prepare --------------------------------------------------------


_JPEG_REDUCED = {
    2: cv2.IMREAD_REDUCED_COLOR_2,
    4: cv2.IMREAD_REDUCED_COLOR_4,
    8: cv2.IMREAD_REDUCED_COLOR_8,
}
_JPEG_REDUCED_GREY = {
    2: cv2.IMREAD_REDUCED_GRAYSCALE_2,
    4: cv2.IMREAD_REDUCED_GRAYSCALE_4,
    8: cv2.IMREAD_REDUCED_GRAYSCALE_8,
}


def _jpeg_reduction(w: int, h: int, target: tuple[int, int] | None) -> int:
    """The largest JPEG scale-down (8, 4, 2) that still leaves at least ``target`` pixels."""
    if target is None:
        return 1
    for factor in (8, 4, 2):
        if w // factor >= target[0] and h // factor >= target[1]:
            return factor
    return 1


def orient(img: np.ndarray, orientation: int) -> np.ndarray:
    """Stored pixels -> upright, for EXIF orientation 1..8 (as OpenCV's own
    ExifTransform: 2 mirror, 3 rotate 180, 4 flip, 5 transpose, 6 rotate 90
    clockwise, 7 transverse, 8 rotate 90 counter-clockwise)."""
    if orientation in (2, 3, 4):
        return cv2.flip(img, {2: 1, 3: -1, 4: 0}[orientation])
    if orientation in (5, 6, 7, 8):
        t = cv2.transpose(img)
        return t if orientation == 5 else cv2.flip(t, {6: 1, 7: -1, 8: 0}[orientation])
    return img


def _decode(
    data: bytes,
    head: Header,
    max_pixels: int,
    min_size: tuple[int, int],
    target: tuple[int, int] | None,
) -> np.ndarray:
    fmt = head.format
    w, h = head.size
    if w <= 0 or h <= 0:
        raise InputRejected(Reject.CORRUPT, f"the header gives a size of {w}x{h}")
    if w * h > max_pixels:
        raise InputRejected(
            Reject.TOO_MANY_PIXELS, f"{w}x{h} is {w * h} pixels, over the budget of {max_pixels}"
        )
    if w < min_size[0] or h < min_size[1]:
        raise InputRejected(
            Reject.TOO_SMALL,
            f"{w}x{h} is smaller than one tile ({min_size[0]}x{min_size[1]})",
        )
    _check_complete(fmt, data)
    factor = _jpeg_reduction(w, h, target) if fmt == "jpeg" else 1
    if factor > 1:
        reduced = _JPEG_REDUCED_GREY if head.grey else _JPEG_REDUCED
        # Orientation is applied below, the same way at every size.
        flag = reduced[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    else:
        flag = cv2.IMREAD_UNCHANGED  # never applies the orientation itself
    img = cv2.imdecode(np.frombuffer(data, np.uint8), flag)
    if img is None or img.size == 0:
        raise InputRejected(Reject.CORRUPT, f"OpenCV could not decode the {fmt.upper()} data")
    if fmt in ("jpeg", "png"):
        # OpenCV's TIFF decoder (libtiff) applies tag 274 itself, whatever the flags.
        img = orient(img, head.orientation)
    expected = (-(-h // factor), -(-w // factor))  # libjpeg rounds scaled sizes up
    if img.shape[:2] != expected:
        raise InputRejected(
            Reject.CORRUPT, f"header says {w}x{h}, pixels are {img.shape[1]}x{img.shape[0]}"
        )
    return img


def decode(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] = (1, 1),
    target: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decoded pixels, upright (EXIF orientation applied), as OpenCV gives
    them (BGR order, native dtype).

    ``min_size`` is (width, height); smaller images are refused. ``target``
    (width, height) is the size the caller will resize to: a large JPEG is then
    decoded already scaled down by 2, 4 or 8 in the DCT domain (an averaging
    filter, like the area filter), which is several times faster than decoding
    a 12 MP frame in full only to average it away.
    """
    return _decode(data, read_header(data), max_pixels, min_size, target)


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def is_greyscale(data: bytes) -> bool:
    """Whether an encoded image is single-channel (grey, or grey with alpha),
    as :func:`prepare` judges it: from the header where it says (PNG, JPEG,
    TIFF), else from the decoded pixels (BMP: OpenCV gives one channel for a
    grey palette)."""
    head = read_header(data)
    if head.grey is not None:
        return head.grey
    return _channels(_decode(data, head, DEFAULT_MAX_PIXELS, (1, 1), None)) in (1, 2)


def to_grey(img: np.ndarray) -> np.ndarray:
    """OpenCV pixels (grey, BGR or BGRA) -> one channel (H, W), luma
    0.299 R + 0.587 G + 0.114 B; dtype kept."""
    channels = _channels(img)
    if channels == 1:
        return img.reshape(img.shape[:2])
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    if channels == 4:
        return cv2.cvtColor(img, cv2.COLOR_BGRA2GRAY)
    raise InputRejected(Reject.UNSUPPORTED_FORMAT, f"{channels} channels are not supported")


def as_input_colour(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) RGB pixels as the model sees them: unchanged for an RGB
    model, luma replicated to three channels for a grey one (the trainer's
    synthetic defects go through this, as posted images go through prepare)."""
    if spec.color != "grey":
        return rgb
    return cv2.cvtColor(cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY), cv2.COLOR_GRAY2RGB)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """OpenCV pixels (grey, BGR or BGRA) -> RGB (H, W, 3), dtype kept."""
    channels = 1 if img.ndim == 2 else img.shape[2]
    if channels == 1:
        return cv2.cvtColor(img.reshape(img.shape[:2]), cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    if channels == 4:
        # Alpha is dropped, not composited: cameras emit opaque images, and
        # whatever the colour under a transparent pixel is, it is the part.
        return cv2.cvtColor(img, cv2.COLOR_BGRA2RGB)
    raise InputRejected(Reject.UNSUPPORTED_FORMAT, f"{channels} channels are not supported")


def to_rgb01(img: np.ndarray) -> np.ndarray:
    """OpenCV pixels (grey, BGR or BGRA; uint8, uint16 or float) -> RGB float32 in [0, 1]."""
    if img.dtype == np.uint8:
        scale = 255.0
    elif img.dtype == np.uint16:
        scale = 65535.0
    elif img.dtype in (np.float32, np.float64):
        scale = 1.0
    else:
        raise InputRejected(Reject.UNSUPPORTED_FORMAT, f"pixel type {img.dtype} is not supported")
    out = to_rgb(img).astype(np.float32) * np.float32(1.0 / scale)
    return np.clip(out, 0.0, 1.0, out=out)


def resize(img: np.ndarray, width: int, height: int) -> np.ndarray:
    """Area filter when shrinking (keeps thin scratches), linear when enlarging."""
    if img.shape[1] == width and img.shape[0] == height:
        return img
    shrinking = img.shape[1] >= width and img.shape[0] >= height
    interp = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
    return cv2.resize(img, (width, height), interpolation=interp)


def normalise(rgb01: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) RGB in [0, 1] -> (3, H, W) float32 as the model expects."""
    mean = np.asarray(spec.normalization.mean, np.float32)
    std = np.asarray(spec.normalization.std, np.float32)
    return np.ascontiguousarray(((rgb01 - mean) / std).transpose(2, 0, 1), dtype=np.float32)


@functools.lru_cache(maxsize=16)
def _normalised_levels(norm: Normalization) -> np.ndarray:
    """(1, 256, 3) float32: normalise(to_rgb01(v)) for each 8-bit level v, per channel.

    The same float32 operations as the general path, so the table's values
    are bit-identical to it.
    """
    levels = np.arange(256, dtype=np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(norm.mean, np.float32)
    std = np.asarray(norm.std, np.float32)
    return np.ascontiguousarray(((levels[:, None] - mean) / std)[None], dtype=np.float32)


def normalise_rgb8(rgb: np.ndarray, spec: InputSpec) -> np.ndarray:
    """(H, W, 3) uint8 RGB -> (3, H, W) float32 as the model expects, by table lookup.

    Equal to ``normalise(to_rgb01(...))`` for 8-bit pixels at a fraction of the
    cost: one lookup per value instead of four float passes over the image,
    which the server profile (bench.profile_server) showed at 11% of its CPU.
    """
    table = cv2.LUT(rgb, _normalised_levels(spec.normalization))
    return np.ascontiguousarray(table.transpose(2, 0, 1))


def prepare(
    data: bytes,
    spec: InputSpec | None = None,
    grid: TileGrid | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> PreparedImage:
    """Decode, check and convert one posted image for the model."""
    spec = spec or InputSpec()
    grid = grid or TileGrid()
    tile = (spec.width // grid.cols, spec.height // grid.rows)
    head = read_header(data)
    img = _decode(data, head, max_pixels, tile, (spec.width, spec.height))
    grey = head.grey if head.grey is not None else _channels(img) in (1, 2)
    if grey and spec.color == "RGB":
        raise InputRejected(
            Reject.WRONG_COLOUR, "the model inspects colour (RGB) images; this image is greyscale"
        )
    source_size = head.size
    codec = detect_codec(data)
    # Resize before the float conversion: on a 12 MP frame that is 4x less
    # memory traffic; the rounding to the source's integer type that this
    # costs is below a camera's noise.
    small = resize(img, spec.width, spec.height)
    if spec.color == "grey":
        small = to_grey(small)  # to_rgb replicates it to the graph's three channels
    if small.dtype == np.uint8:  # what cameras send: the table-lookup path
        rgb = to_rgb(small)
        return PreparedImage(normalise_rgb8(rgb, spec), rgb, source_size, codec)
    rgb01 = to_rgb01(small)
    rgb = (rgb01 * 255.0 + 0.5).astype(np.uint8)
    return PreparedImage(normalise(rgb01, spec), rgb, source_size, codec)


def denormalise(tensor: np.ndarray, spec: InputSpec) -> np.ndarray:
    """Inverse of :func:`normalise`: (3, H, W) -> (H, W, 3) RGB in [0, 1]."""
    mean = np.asarray(spec.normalization.mean, np.float32)
    std = np.asarray(spec.normalization.std, np.float32)
    return np.clip(tensor.transpose(1, 2, 0) * std + mean, 0.0, 1.0)
