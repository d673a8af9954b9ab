"""The camera's codec: what an image was encoded as, and passing images through it.

Calibration must see what the line sends: JPEG artefacts raise every image's
reconstruction and feature errors, so thresholds fitted on PNG reject
JPEG-encoded good parts. :func:`apply_codec` re-encodes calibration images
the way the camera does; :func:`detect_codec` reads the format and, for
JPEG, the quality from the file's own quantisation table, so the server can
count images that differ from what the thresholds were calibrated for.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from service.contract import Codec
from service.image_header import sniff

# The JPEG standard's luminance quantisation table (Annex K), row-major; an
# encoder at quality q scales it as libjpeg does (see _libjpeg_table).
_LUMA = np.array(
    [
        16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
        14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
        18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
        49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
    ],
    np.int64,
)  # fmt: skip
# DQT stores coefficients in zig-zag order: the k-th value is natural index _ZIGZAG[k].
_ZIGZAG = np.array(
    [
        0, 1, 8, 16, 9, 2, 3, 10, 17, 24, 32, 25, 18, 11, 4, 5,
        12, 19, 26, 33, 40, 48, 41, 34, 27, 20, 13, 6, 7, 14, 21, 28,
        35, 42, 49, 56, 57, 50, 43, 36, 29, 22, 15, 23, 30, 37, 44, 51,
        58, 59, 52, 45, 38, 31, 39, 46, 53, 60, 61, 54, 47, 55, 62, 63,
    ]
)  # fmt: skip
# A table further than this (mean absolute step) from every libjpeg quality
# is some other encoder's: its quality is unknown rather than guessed.
_MAX_TABLE_DISTANCE = 1.0


def _libjpeg_table(quality: int) -> np.ndarray:
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return np.clip((_LUMA * scale + 50) // 100, 1, 255)


_TABLES = np.stack([_libjpeg_table(q) for q in range(1, 101)])  # (100, 64), natural order


def _luma_table(data: bytes) -> np.ndarray | None:
    """The first (luminance, id 0) quantisation table of a JPEG, natural order."""
    i, n = 2, len(data)
    while i + 4 <= n and data[i] == 0xFF:
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):
            i += 2
            continue
        (length,) = struct.unpack(">H", data[i + 2 : i + 4])
        if marker == 0xDB:  # DQT: one or more tables, each (precision|id) then 64 values
            j, end = i + 4, min(n, i + 2 + length)
            while j < end:
                precision, table_id = data[j] >> 4, data[j] & 0x0F
                size = 128 if precision else 64
                raw = data[j + 1 : j + 1 + size]
                if len(raw) < size:
                    return None
                values = np.frombuffer(raw, ">u2" if precision else np.uint8).astype(np.int64)
                if table_id == 0:
                    table = np.empty(64, np.int64)
                    table[_ZIGZAG] = values
                    return table
                j += 1 + size
        if marker == 0xDA:  # start of scan: no more tables before the data
            return None
        i += 2 + length
    return None


def jpeg_quality(data: bytes) -> int | None:
    """The libjpeg quality whose luminance table the JPEG carries, or None if none fits."""
    table = _luma_table(data)
    if table is None:
        return None
    distance = np.abs(_TABLES - table).mean(axis=1)
    best = int(np.argmin(distance))
    return best + 1 if distance[best] <= _MAX_TABLE_DISTANCE else None


def detect_codec(data: bytes) -> Codec | None:
    """Format (and JPEG quality) of encoded image bytes; None if not an image we read."""
    fmt = sniff(data)
    if fmt is None:
        return None
    return Codec(format=fmt, quality=jpeg_quality(data) if fmt == "jpeg" else None)


def same_codec(seen: Codec | None, calibrated: Codec, quality_tolerance: int = 5) -> bool:
    """Whether an image's codec is the one the thresholds were calibrated for.

    JPEG qualities a few steps apart give nearly the same artefacts; an unknown
    quality (another encoder's tables) counts as matching a JPEG calibration.
    """
    if seen is None or seen.format != calibrated.format:
        return False
    if seen.format != "jpeg" or seen.quality is None or calibrated.quality is None:
        return True
    return abs(seen.quality - calibrated.quality) <= quality_tolerance


def apply_codec(data: bytes, codec: Codec) -> bytes:
    """``data`` as the camera would send it: decoded and encoded again as a
    JPEG of ``codec``'s quality. PNG, BMP and TIFF are lossless, so an image
    passed through them has the same pixels: ``data`` comes back unchanged."""
    if codec.format != "jpeg":
        return data
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    if img is None:
        raise ValueError("cannot decode the image to re-encode it")
    if img.dtype == np.uint16:  # JPEG is 8-bit; scale 16-bit down as a camera would
        img = (img.astype(np.float64) * (255 / 65535) + 0.5).astype(np.uint8)
    elif img.dtype != np.uint8:  # float TIFF in [0, 1]
        img = (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)
    if img.ndim == 3 and img.shape[2] == 4:
        img = img[:, :, :3]
    ok, enc = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, codec.quality or 95])
    if not ok:
        raise ValueError(f"OpenCV could not encode the image as {codec}")
    return enc.tobytes()
