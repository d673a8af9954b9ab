"""Why a posted image was refused: one exception with a machine-readable reason.

Its own module so that the header parser (:mod:`service.image_header`, no
OpenCV) and the decoder (:mod:`service.preprocessing`) raise the same type.
"""

from __future__ import annotations

from enum import StrEnum


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
