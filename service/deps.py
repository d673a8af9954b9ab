"""The routes' dependencies, used through ``Depends`` everywhere.

The app factory puts one of each object in ``app.state``; routes never reach
into it themselves. Keys are checked here: a client key opens ``/v1``, the
admin key alone opens the admin routes.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import FormData, UploadFile
from starlette.exceptions import HTTPException

from service.batcher import Batcher
from service.drain import Drain
from service.errors import ApiError, form_error
from service.inspection import Inspector
from service.metrics import Metrics
from service.runtime import ModelRuntime
from service.settings import Settings

# Content types a single image may be posted as, besides multipart/form-data.
RAW_TYPES = (
    "image/png",
    "image/jpeg",
    "image/bmp",
    "image/x-ms-bmp",
    "image/tiff",
    "application/octet-stream",
)


def _settings(request: Request) -> Settings:
    return request.app.state.settings


def _runtime(request: Request) -> ModelRuntime:
    return request.app.state.runtime


def _batcher(request: Request) -> Batcher:
    return request.app.state.batcher


def _metrics(request: Request) -> Metrics:
    return request.app.state.metrics


def _inspector(request: Request) -> Inspector:
    return request.app.state.inspector


def _drain(request: Request) -> Drain:
    return request.app.state.drain


SettingsDep = Annotated[Settings, Depends(_settings)]
RuntimeDep = Annotated[ModelRuntime, Depends(_runtime)]
BatcherDep = Annotated[Batcher, Depends(_batcher)]
MetricsDep = Annotated[Metrics, Depends(_metrics)]
InspectorDep = Annotated[Inspector, Depends(_inspector)]
DrainDep = Annotated[Drain, Depends(_drain)]


# --- keys --------------------------------------------------------------------------

# The keys as OpenAPI security schemes. The same objects read the key from
# the request, so what the schema declares (and /docs' Authorize dialog
# offers) is what is checked. Client and admin keys are separate schemes,
# though sent the same way, so /docs and a fuzzer send each route the key it
# takes. auto_error=False: the checks below answer, in the error envelope.
_CLIENT = "a client key (INSPECTION_API_KEYS)"
_ADMIN = "the admin key (INSPECTION_ADMIN_KEY); no client key opens the admin routes"
client_key = APIKeyHeader(
    name="X-API-Key", scheme_name="ClientKey", description=_CLIENT, auto_error=False
)
client_bearer = HTTPBearer(
    scheme_name="ClientBearer", description=f"{_CLIENT}, as a bearer token", auto_error=False
)
admin_key = APIKeyHeader(
    name="X-API-Key", scheme_name="AdminKey", description=_ADMIN, auto_error=False
)
admin_bearer = HTTPBearer(
    scheme_name="AdminBearer", description=f"{_ADMIN}; as a bearer token", auto_error=False
)
CLIENT_SCHEMES = ("ClientKey", "ClientBearer")
ADMIN_SCHEMES = ("AdminKey", "AdminBearer")


def _presented(key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    """The key in X-API-Key, else in ``Authorization: Bearer``: the rule of
    service.keys.presented_key, which names the key in the access log."""
    if key is not None:
        return key
    return bearer.credentials if bearer is not None else None


def _matches(key: str, secrets: list[str]) -> bool:
    # Every key is compared, in constant time each: neither the position of a
    # match nor a common prefix shows in the answer time.
    found = False
    for secret in secrets:
        found |= hmac.compare_digest(key.encode(), secret.encode())
    return found


def require_api_key(
    settings: SettingsDep,
    key: Annotated[str | None, Security(client_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(client_bearer)],
) -> None:
    keys = [k.get_secret_value() for k in settings.api_keys]
    if not keys:
        return
    presented = _presented(key, bearer)
    if presented is None:
        raise ApiError(
            401, "missing_api_key", "send an API key in X-API-Key or Authorization: Bearer"
        )
    if not _matches(presented, keys):
        raise ApiError(403, "invalid_api_key", "the API key is not valid")


def require_admin_key(
    settings: SettingsDep,
    key: Annotated[str | None, Security(admin_key)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Security(admin_bearer)],
) -> None:
    if settings.admin_key is None:
        raise ApiError(403, "reload_disabled", "no admin key is configured; send SIGHUP instead")
    presented = _presented(key, bearer)
    if presented is None:
        raise ApiError(401, "missing_api_key", "send the admin key in X-API-Key")
    if not _matches(presented, [settings.admin_key.get_secret_value()]):
        raise ApiError(403, "invalid_api_key", "the admin key is not valid")


# --- bodies ------------------------------------------------------------------------


def content_type(request: Request) -> str:
    return request.headers.get("content-type", "").split(";")[0].strip().lower()


async def read_form(request: Request, max_files: int, max_part_size: int, setting: str) -> FormData:
    """The multipart form, with Starlette's refusals in the error envelope."""
    if content_type(request) != "multipart/form-data":
        raise ApiError(415, "unsupported_media_type", "send the images as multipart/form-data")
    try:
        return await request.form(max_files=max_files, max_part_size=max_part_size)
    except HTTPException as exc:
        raise form_error(exc, max_files, setting) from exc


async def image_bytes(request: Request, settings: SettingsDep) -> bytes:
    """One image: the raw body, or the field `file` of a multipart form."""
    ctype = content_type(request)
    if ctype == "multipart/form-data":
        form = await read_form(request, 1, settings.max_body_bytes, "one image per request")
        upload = form.get("file")
        if not isinstance(upload, UploadFile):
            raise ApiError(
                400, "missing_file", "multipart body needs the image in the field `file`"
            )
        return await upload.read()
    if ctype in RAW_TYPES:
        return await request.body()
    raise ApiError(
        415,
        "unsupported_media_type",
        f"Content-Type {ctype or '(none)'} is not an image; send {', '.join(RAW_TYPES)} "
        "or multipart/form-data",
    )


async def batch_files(request: Request, settings: SettingsDep) -> list[tuple[str | None, bytes]]:
    """The images of a batch request, in order, with their file names."""
    form = await read_form(
        request,
        settings.max_batch_files,
        settings.max_body_bytes,
        "INSPECTION_MAX_BATCH_FILES",
    )
    uploads = [
        (f.filename, await f.read()) for f in form.getlist("files") if isinstance(f, UploadFile)
    ]
    if not uploads:
        raise ApiError(400, "missing_file", "multipart body needs the images in fields `files`")
    return uploads


ImageBytes = Annotated[bytes, Depends(image_bytes)]
BatchFiles = Annotated[list[tuple[str | None, bytes]], Depends(batch_files)]
