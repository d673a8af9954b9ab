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
file header *before* decoding (:mod:`service.image_header`, every
size-bearing structure of the file, no OpenCV), so a decompression bomb (a
few kilobytes that inflate to gigabytes) is refused without allocating it;
and OpenCV decodes into an array of exactly the header's shape and sample
type, which it checks against its own reading of the header before it
decodes: a file whose structure makes the decoder see another size is
refused before its pixels are allocated. :func:`plan_decode` says, from the
header alone, how many bytes a decode will hold at most; the server reserves
them from its decode memory budget (:mod:`service.decode_budget`) first.
"""

from __future__ import annotations

import contextlib
import functools
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass

import cv2
import numpy as np

from service.codec import detect_codec
from service.contract import Codec, InputSpec, Normalization, TileGrid
from service.image_header import (
    DEFAULT_MAX_PIXELS,
    MIB,
    Header,
    check_complete,
    read_header,
)
from service.image_header import image_size as image_size  # its old home; moved with the header
from service.rejection import InputRejected, Reject


@dataclass(frozen=True)
class PreparedImage:
    tensor: np.ndarray  # (3, H, W) float32, normalised: the model's input for one image
    rgb: np.ndarray  # (H, W, 3) uint8 at model resolution, for heatmap overlays
    source_size: tuple[int, int]  # (width, height) as posted, upright (EXIF orientation applied)
    codec: Codec | None = None  # what the bytes were encoded as (format, JPEG quality)


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
        if orientation == 5:
            return t
        return cv2.flip(t, {6: 1, 7: -1, 8: 0}[orientation], dst=t)  # in place: one copy in all
    return img


@dataclass(frozen=True)
class DecodePlan:
    """How one image will be decoded, decided from its header before any pixel is."""

    header: Header
    factor: int  # JPEG scale-down in the DCT domain: 1, 2, 4 or 8
    # Bytes the decode holds at most, from the header: the file handed to
    # OpenCV, the decoded pixels, the decoder's own buffers, the copy that
    # orientation makes, the work at model resolution.
    peak_bytes: int


def plan_decode(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] = (1, 1),
    target: tuple[int, int] | None = None,
) -> DecodePlan:
    """Read and check the header (size, pixel budget, smallest size, file
    complete) and plan the decode; :class:`InputRejected` where it is refused."""
    head = read_header(data)
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
    check_complete(head.format, data)
    factor = _jpeg_reduction(w, h, target) if head.format == "jpeg" else 1
    pixels = head.pixel_bytes(factor)
    if factor > 1:  # decoded from memory (see _decode_planned): OpenCV's Mat, then its copy
        pixels *= 2
    oriented = pixels if head.orientation != 1 else 0  # cv2.flip / transpose copy
    # Resize and conversions at model resolution: a few float32 copies of it.
    finish = 8 * 4 * 3 * target[0] * target[1] if target else 0
    peak = len(data) + pixels + head.work_bytes + oriented + finish + MIB
    return DecodePlan(head, factor, peak)


def _flags(head: Header, factor: int) -> int:
    """What to ask OpenCV for: one channel or three (alpha dropped), samples of
    the file's own depth, orientation left to :func:`orient`."""
    if factor > 1:
        reduced = _JPEG_REDUCED_GREY if head.grey else _JPEG_REDUCED
        return reduced[factor] | cv2.IMREAD_IGNORE_ORIENTATION
    colour = cv2.IMREAD_GRAYSCALE if head.grey else cv2.IMREAD_COLOR
    return colour | cv2.IMREAD_ANYDEPTH | cv2.IMREAD_IGNORE_ORIENTATION


@contextlib.contextmanager
def _as_file(data: bytes, patch: tuple[int, bytes] | None) -> Iterator[str]:
    """``data`` as a file OpenCV can open by name (in memory where the OS has
    memfd), with ``patch`` (offset, bytes) written over it."""
    view = memoryview(data)
    parts: list[memoryview] = [view]
    if patch is not None:
        at, value = patch
        parts = [view[:at], memoryview(value), view[at + len(value) :]]
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("inspection-image", os.MFD_CLOEXEC)
        try:
            for part in parts:
                _write_all(fd, part)
            yield f"/proc/self/fd/{fd}"
        finally:
            os.close(fd)
        return
    with tempfile.NamedTemporaryFile(prefix="inspection-image-") as f:
        for part in parts:
            f.write(part)
        f.flush()
        yield f.name


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view) :]


def _opencv_said(exc: cv2.error) -> str:
    """The gist of an OpenCV exception, on one line."""
    text = " ".join(str(exc).split())
    at = text.find("(expected:")
    return text[at:][:300] if at >= 0 else text[-300:]


def _decode_planned(data: bytes, plan: DecodePlan) -> np.ndarray:
    head, factor = plan.header, plan.factor
    fmt = head.format.upper()
    w, h = -(-head.width // factor), -(-head.height // factor)
    shape = (h, w) if head.grey else (h, w, 3)
    try:
        if factor > 1:
            # A JPEG scaled down 2-8x in the DCT domain: its pixels are a fraction
            # of the frame's, so OpenCV's own Mat and the copy the Python binding
            # makes of it cost little; decoding from memory saves the file below.
            # libjpeg reads the one frame header the walk in image_header found.
            img = cv2.imdecode(np.frombuffer(data, np.uint8), _flags(head, factor))
        else:
            # Into an array of the header's stored size and sample type: OpenCV
            # compares it with its own reading of the header and refuses a
            # difference before it decodes, so it never allocates what the
            # header did not announce (and no second copy for Python).
            dst = np.empty(shape, head.dtype)
            with _as_file(data, head.orientation_patch) as path:
                # imread into an array returns it untouched where OpenCV cannot
                # read the header; imcount (0 then) tells that case apart.
                if cv2.imcount(path) < 1:
                    raise InputRejected(Reject.CORRUPT, f"OpenCV could not read the {fmt} header")
                img = cv2.imread(path, dst, _flags(head, factor))
    except cv2.error as exc:
        raise InputRejected(
            Reject.CORRUPT, f"OpenCV refused the {fmt}: {_opencv_said(exc)}"
        ) from exc
    if img is None or img.size == 0:
        raise InputRejected(Reject.CORRUPT, f"OpenCV could not decode the {fmt} data")
    if img.shape != shape or img.dtype != np.dtype(head.dtype):  # never trust silently
        raise InputRejected(
            Reject.CORRUPT,
            f"header says {head.width}x{head.height}, pixels are {img.shape[1]}x{img.shape[0]}",
        )
    # Orientation is applied here, the same way at every size and format (a
    # TIFF's orientation tag is patched to 1 above: libtiff would rotate by itself).
    return orient(img, head.orientation)


def decode(
    data: bytes,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    min_size: tuple[int, int] = (1, 1),
    target: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decoded pixels, upright (EXIF orientation applied), as OpenCV gives
    them (BGR order, or one channel for single-channel images; alpha dropped;
    native sample type).

    ``min_size`` is (width, height); smaller images are refused. ``target``
    (width, height) is the size the caller will resize to: a large JPEG is then
    decoded already scaled down by 2, 4 or 8 in the DCT domain (an averaging
    filter, like the area filter), which is several times faster than decoding
    a 12 MP frame in full only to average it away.
    """
    return _decode_planned(data, plan_decode(data, max_pixels, min_size, target))


def _channels(img: np.ndarray) -> int:
    return 1 if img.ndim == 2 else img.shape[2]


def is_greyscale(data: bytes) -> bool:
    """Whether an encoded image is single-channel (grey, or grey with alpha),
    as :func:`prepare` judges it: from the header (a BMP's from its palette,
    grey where every colour of it is, as OpenCV judges it)."""
    return read_header(data).grey


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


def plan_prepare(
    data: bytes,
    spec: InputSpec | None = None,
    grid: TileGrid | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> DecodePlan:
    """The header checks of :func:`prepare` and its decode plan, without decoding."""
    spec = spec or InputSpec()
    grid = grid or TileGrid()
    tile = (spec.width // grid.cols, spec.height // grid.rows)
    plan = plan_decode(data, max_pixels, tile, (spec.width, spec.height))
    if plan.header.grey and spec.color == "RGB":  # known from the header: not decoded for nothing
        raise InputRejected(
            Reject.WRONG_COLOUR, "the model inspects colour (RGB) images; this image is greyscale"
        )
    return plan


def prepare(
    data: bytes,
    spec: InputSpec | None = None,
    grid: TileGrid | None = None,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    plan: DecodePlan | None = None,
) -> PreparedImage:
    """Decode, check and convert one posted image for the model.

    ``plan``: :func:`plan_prepare`'s for the same bytes and arguments, where the
    caller has made it already (the server, to reserve its memory first).
    """
    spec = spec or InputSpec()
    plan = plan or plan_prepare(data, spec, grid, max_pixels)
    head = plan.header
    img = _decode_planned(data, plan)
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
