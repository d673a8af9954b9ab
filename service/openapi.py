"""The OpenAPI description of the API, made to be true of it.

FastAPI derives most of the schema from the routes. What it cannot know is
declared here: the request bodies (read by hand: raw bytes or multipart),
with real example images; the errors each route answers; the headers every
answer carries; and what depends on the settings, which are known because
the schema is built per app (:func:`install`, called by the app factory):
whether the client routes take a key, and how many files a request may hold.
service.routes_docs serves it at /openapi.json, the example images' URLs
made absolute there.
"""

from __future__ import annotations

import copy
import functools
from importlib.resources import files
from typing import Any

import cv2
import numpy as np
from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from service.deps import ADMIN_SCHEMES, CLIENT_SCHEMES, RAW_TYPES
from service.schemas import ErrorResponse
from service.settings import Settings

# --- example images -------------------------------------------------------------------

# A synthetic good part (a disc on a woven background, like a bottle seen
# from above; 300x300, made with OpenCV, no dataset's licence attached),
# shipped as package data. The other formats are encoded from its pixels on
# first use, so every media type's example is a file of that type.
EXAMPLES_URL = "/docs/examples"
_EXAMPLE_SOURCE = "part.jpg"
EXAMPLE_TYPES = {"png": "image/png", "jpg": "image/jpeg", "bmp": "image/bmp", "tif": "image/tiff"}
_EXAMPLE_FOR = {
    "image/png": "part.png",
    "image/jpeg": "part.jpg",
    "image/bmp": "part.bmp",
    "image/x-ms-bmp": "part.bmp",
    "image/tiff": "part.tif",
    "application/octet-stream": "part.png",  # the format is read from the bytes
}


def example_image(name: str) -> bytes | None:
    """The example image ``part.<png|jpg|bmp|tif>``; None for any other name."""
    stem, _, ext = name.partition(".")
    if stem != "part" or ext not in EXAMPLE_TYPES:
        return None
    return _example(ext)


@functools.cache  # four entries at most: the names are checked above
def _example(ext: str) -> bytes:
    source = files("service").joinpath("examples", _EXAMPLE_SOURCE).read_bytes()
    if f"part.{ext}" == _EXAMPLE_SOURCE:
        return source
    pixels = cv2.imdecode(np.frombuffer(source, np.uint8), cv2.IMREAD_COLOR)
    ok, encoded = cv2.imencode(f".{ext}", pixels) if pixels is not None else (False, None)
    if not ok or encoded is None:  # pragma: no cover - the package's own JPEG, all four formats
        raise RuntimeError(f"OpenCV could not make the example part.{ext}")
    return encoded.tobytes()


def _image_examples(media_type: str) -> dict[str, Any]:
    # OpenAPI's way to give a binary example: externalValue, a URI of the
    # file. Relative here; made absolute where the schema is served, since
    # tools (schemathesis among them) fetch it as it stands.
    return {
        "part": {
            "summary": "a good part (synthetic, 300x300 px)",
            "externalValue": f"{EXAMPLES_URL}/{_EXAMPLE_FOR[media_type]}",
        }
    }


# --- request bodies -------------------------------------------------------------------

# An image must be at least one tile of the model's grid in pixels (e.g.
# 100x100 for a 300x300 model with 3x3 tiles; smaller ones are refused
# `too_small`). No PNG, JPEG, BMP or TIFF of even a 9x9 image is shorter
# than the shortest PNG there can be, a 1x1 one: signature, IHDR, one IDAT
# holding 2 deflated bytes, IEND, 67 bytes. Fewer bytes are never an image.
MIN_IMAGE_BYTES = 67
_IMAGE = {"type": "string", "format": "binary", "minLength": MIN_IMAGE_BYTES}
_IMAGE_TEXT = (
    "PNG, JPEG, BMP or TIFF, at least one tile of the model's grid in pixels (100x100 for a "
    "300x300 model with 3x3 tiles) and at most INSPECTION_MAX_PIXELS; colour for a colour "
    "model."
)
# Replaced by maxItems = the named setting when the schema is built.
MAX_ITEMS_FROM = "x-max-items-from"


def files_array(setting: str, min_items: int, description: str) -> dict[str, Any]:
    """A multipart field repeated once per file, at most ``settings.<setting>`` times."""
    return {
        "type": "array",
        "items": {"type": "string", "format": "binary"},
        "minItems": min_items,
        MAX_ITEMS_FROM: setting,
        "description": description,
    }


IMAGE_BODY = {
    "requestBody": {
        "required": True,
        "description": "One image: the raw bytes (Content-Type one of the image types, or "
        "application/octet-stream), or multipart/form-data with the image in the field "
        f"`file`. {_IMAGE_TEXT} Bytes that are not such an image are refused: 400 and the "
        "reason.",
        "content": {
            **{t: {"schema": _IMAGE, "examples": _image_examples(t)} for t in RAW_TYPES},
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {"file": _IMAGE},
                    "required": ["file"],
                }
            },
        },
    }
}
BATCH_BODY = {
    "requestBody": {
        "required": True,
        "description": "Several images as multipart/form-data, each in a field `files`. "
        "A file that is not such an image fails only its own entry of the answer.",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        # No minLength on the items: a short file is answered
                        # in its own entry of a 200, not refused.
                        "files": files_array(
                            "max_batch_files", 1, f"the images, in order. {_IMAGE_TEXT}"
                        )
                    },
                    "required": ["files"],
                }
            }
        },
    }
}


# --- answers --------------------------------------------------------------------------


def _errors(codes: dict[int, str]) -> dict[int | str, dict[str, Any]]:
    return {c: {"model": ErrorResponse, "description": t} for c, t in codes.items()}


def header(description: str, required: bool = True) -> dict[str, Any]:
    return {"description": description, "required": required, "schema": {"type": "string"}}


RETRY_AFTER = header("seconds to wait before trying again")
# Every /v1 route: keys, and the server's own failures. (Without
# INSPECTION_API_KEYS the client routes answer neither 401 nor 403, and
# :func:`install` drops them there.)
ERRORS = _errors(
    {
        401: "no key sent (`missing_api_key`)",
        403: "the key is wrong (`invalid_api_key`); on the admin routes also "
        "`reload_disabled`: no admin key is configured",
        500: "the model failed on this batch (`inference_failed`) or an unexpected error "
        "(`internal_error`)",
    }
)
# Every route that reads a body.
BODY_ERRORS = _errors(
    {
        400: "the body was refused (the reason says why)",
        408: "the body did not arrive within INSPECTION_READ_TIMEOUT_S (`read_timeout`)",
        413: "over INSPECTION_MAX_BODY_BYTES (`payload_too_large`), too many files "
        "(`too_many_files`), or an image whose decoding needs more than the whole decode "
        "memory (`decode_too_large`)",
        415: "the Content-Type is not one this route takes (`unsupported_media_type`)",
    }
)
# The routes that inspect images.
IMAGE_ERRORS = {
    **BODY_ERRORS,
    400: {
        "model": ErrorResponse,
        "description": "the image or form was refused: `empty`, `unsupported_format`, "
        "`truncated`, `corrupt`, `too_small`, `too_many_pixels`, `wrong_colour`, "
        "`missing_file`, `invalid_multipart`",
    },
    503: {
        "model": ErrorResponse,
        "description": "no room now: the queue is full (`queue_full`) or the decode memory "
        "is taken (`decode_busy`); try again after Retry-After",
        "headers": {"Retry-After": RETRY_AFTER},
    },
}
# The routes with query parameters.
QUERY_ERRORS = _errors({422: "a query parameter is invalid (`invalid_request`)"})

DESCRIPTION = """\
Inline inspection: post an image of a part, get the verdict (`defect_free` or
`defective`), the error of the whole image and of each tile against its
threshold, and where the defect is.

**Keys.** The `/v1` routes take a client key (`INSPECTION_API_KEYS`) when keys
are configured: in `X-API-Key`, or as `Authorization: Bearer <key>`. The admin
routes (reload, recalibrate) take the admin key (`INSPECTION_ADMIN_KEY`) and no
other. Health, readiness, metrics and these docs take none. *Authorize* above
sets them for the *Try it out* requests.

**Errors.** Every refusal is JSON, `{"error": {"reason": ..., "message": ...},
"request_id": ...}`, with the status each route lists. An unknown path is
answered 404 `not_found` and a method a path does not take 405
`method_not_allowed` (with `Allow`), in the same envelope. Every answer carries
`X-Request-ID` (the one sent, if it is 1 to 64 of `A-Za-z0-9._-`, else a new
one), except two answered before a request reaches any route: 408
`header_timeout` (the headers did not arrive in time) and 503
`too_many_connections` (with `Retry-After`), after which the connection is
closed.
"""


# --- the schema -----------------------------------------------------------------------


def install(app: FastAPI, settings: Settings) -> None:
    """Make ``app.openapi()`` return the schema of this app with these settings."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title,
                version=app.version,
                openapi_version=app.openapi_version,
                summary=app.summary,
                description=DESCRIPTION,
                routes=app.routes,
                servers=app.servers,
                separate_input_output_schemas=app.separate_input_output_schemas,
            )
            app.openapi_schema = finish(schema, settings)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]


def finish(schema: dict[str, Any], settings: Settings) -> dict[str, Any]:
    """What FastAPI's schema needs from the settings, and the headers of every answer."""
    schema = copy.deepcopy(schema)
    no_keys = not settings.api_keys
    no_admin = settings.admin_key is None
    for operations in schema["paths"].values():
        for op in operations.values():
            security = op.get("security", [])
            if no_keys and any(set(s) & set(CLIENT_SCHEMES) for s in security):
                # No client keys configured: require_api_key lets every
                # request through and answers neither 401 nor 403. The
                # schema then requires no key at all, rather than making one
                # optional (`security: [{}, ...]`): a key sent is not checked,
                # so declaring it would promise a check that does not happen.
                del op["security"]
                op["responses"].pop("401", None)
                op["responses"].pop("403", None)
            if no_admin and any(set(s) & set(ADMIN_SCHEMES) for s in security):
                # No admin key configured: require_admin_key refuses every
                # request, 403 `reload_disabled`, whatever it carries.
                op["responses"] = {"403": op["responses"]["403"]}
            for response in op["responses"].values():
                response.setdefault("headers", {})["X-Request-ID"] = header(
                    "the request's id, as in the logs and the error body"
                )
            for media in op.get("requestBody", {}).get("content", {}).values():
                _max_items(media.get("schema", {}), settings)
    if no_keys:
        schemes = schema.get("components", {}).get("securitySchemes", {})
        for name in CLIENT_SCHEMES:
            schemes.pop(name, None)
    return schema


def _max_items(node: Any, settings: Settings) -> None:
    if isinstance(node, dict):
        setting = node.pop(MAX_ITEMS_FROM, None)
        if setting is not None:
            node["maxItems"] = getattr(settings, setting)
        for value in node.values():
            _max_items(value, settings)
    elif isinstance(node, list):
        for value in node:
            _max_items(value, settings)


def with_base_url(schema: dict[str, Any], base: str) -> dict[str, Any]:
    """``schema`` with the examples' relative externalValue URLs made absolute on ``base``."""
    out = copy.deepcopy(schema)
    for operations in out["paths"].values():
        for op in operations.values():
            for media in op.get("requestBody", {}).get("content", {}).values():
                for example in media.get("examples", {}).values():
                    url = example.get("externalValue", "")
                    if url.startswith("/"):
                        example["externalValue"] = base.rstrip("/") + url
    return out
