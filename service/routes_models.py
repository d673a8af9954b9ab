"""The model resource: what is served (a client key), reloading it and
recalibrating it on line images (the admin key, ``INSPECTION_ADMIN_KEY``,
and nothing else). The recalibration itself is :mod:`service.recalibration`; its route only reads
the form, runs it in a thread on the served artifact's own session and swaps
the new version in.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from starlette.datastructures import UploadFile

from service.artifact import ArtifactError
from service.calibration import MIN_TARGET_FPR
from service.contract import METADATA_FILE
from service.deps import RuntimeDep, SettingsDep, read_form, require_admin_key, require_api_key
from service.errors import ApiError
from service.openapi import BODY_ERRORS, ERRORS, files_array
from service.recalibration import (
    DEFAULT_TARGET_FPR,
    MIN_IMAGES,
    RecalibrationError,
    parse_codec,
    parse_operator,
    parse_target,
    recalibrate,
)
from service.schemas import ErrorResponse, ModelInfo, RecalibrationResponse, RecalibrationSummary

RECALIBRATION_BODY = {
    "requestBody": {
        "required": True,
        "description": "Good parts from the line as multipart/form-data: each image in a "
        "field `files`, who confirmed them in `operator`; optional `target_fpr` "
        f"(default {DEFAULT_TARGET_FPR}) and `codec` (png, jpeg:90, ...; default: detected, "
        "images used as they are).",
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "files": files_array(
                            "max_recalibration_files",
                            MIN_IMAGES,
                            f"the good parts' images; at least {MIN_IMAGES} distinct",
                        ),
                        "operator": {"type": "string", "maxLength": 200},
                        "target_fpr": {
                            "type": "number",
                            "minimum": MIN_TARGET_FPR,
                            "exclusiveMaximum": 1,
                        },
                        "codec": {"type": "string", "examples": ["jpeg:90"]},
                    },
                    "required": ["files", "operator"],
                }
            }
        },
    }
}
# 400 by default; these are not the client's input.
_STATUS = {"inference_failed": 500, "parent_changed": 409}


def _lock(request: Request) -> asyncio.Lock:
    # One recalibration at a time: two would race for the same next version.
    state = request.app.state
    if getattr(state, "recalibration_lock", None) is None:
        state.recalibration_lock = asyncio.Lock()
    lock: asyncio.Lock = state.recalibration_lock
    return lock


LockDep = Annotated[asyncio.Lock, Depends(_lock)]

router = APIRouter(prefix="/v1", dependencies=[Depends(require_api_key)], responses=ERRORS)


@router.get("/models", response_model=ModelInfo, summary="The model in service")
async def models(runtime: RuntimeDep) -> ModelInfo:
    """Its metadata (thresholds, calibration, evaluation, sha256) and the provider in use."""
    art = runtime.current
    meta = art.metadata
    return ModelInfo(
        name=meta.name, version=meta.version, family=meta.family, provider=art.provider,
        path=str(art.path), metadata=meta.model_dump(mode="json"),
    )  # fmt: skip


# The admin key alone opens these routes: it is no client key, and with
# INSPECTION_API_KEYS set a client key must not open them either.
admin = APIRouter(prefix="/v1", dependencies=[Depends(require_admin_key)], responses=ERRORS)


@admin.post(
    "/models/reload",
    response_model=ModelInfo,
    summary="Load the newest model version and swap it in",
    responses={
        409: {"model": ErrorResponse, "description": "the new version failed; old one serves"}
    },
)
async def reload_model(runtime: RuntimeDep) -> ModelInfo:
    """Verify and warm up the newest version under the model directory, then swap
    it in atomically. On failure the model in service stays and 409 says why."""
    try:
        await runtime.reload()
    except ArtifactError as exc:
        raise ApiError(409, "reload_failed", str(exc)) from exc
    return await models(runtime)


def _text(form: Any, key: str) -> str | None:
    value = form.get(key)
    return value if isinstance(value, str) and value.strip() else None


@admin.post(
    "/models/recalibrate",
    response_model=RecalibrationResponse,
    openapi_extra=RECALIBRATION_BODY,
    summary="Recalibrate the served model on good parts and serve the new version",
    responses={
        **BODY_ERRORS,
        400: {
            "model": ErrorResponse,
            "description": "the form was refused: `too_few_images`, `invalid_image`, "
            "`invalid_codec`, `invalid_target`, `invalid_operator`, `missing_file`, "
            "`invalid_multipart`",
        },
        409: {"model": ErrorResponse, "description": "the new version could not be served"},
    },
)
async def recalibrate_model(
    request: Request, runtime: RuntimeDep, settings: SettingsDep, lock: LockDep
) -> RecalibrationResponse:
    """New thresholds from good parts confirmed on the line, written as the next
    version of the served model (same graph and sha256, new thresholds and
    calibration record), then reloaded. The served version stays on disk."""
    if (Path(settings.model_dir) / METADATA_FILE).exists():
        raise ApiError(
            409, "version_pinned",
            f"the server serves the version directory {settings.model_dir} itself, so it "
            "would never load a new version; point INSPECTION_MODEL_DIR at the model directory",
        )  # fmt: skip
    form = await read_form(
        request,
        settings.max_recalibration_files,
        settings.max_body_bytes,
        "INSPECTION_MAX_RECALIBRATION_FILES",
    )
    try:
        operator = parse_operator(_text(form, "operator") or "")
        target = parse_target(_text(form, "target_fpr") or DEFAULT_TARGET_FPR)
        codec_text = _text(form, "codec")
        codec = parse_codec(codec_text) if codec_text else None
    except RecalibrationError as exc:
        raise ApiError(400, exc.reason, exc.message) from exc
    uploads = [f for f in form.getlist("files") if isinstance(f, UploadFile)]
    if not uploads:
        raise ApiError(400, "missing_file", "multipart body needs the images in fields `files`")
    images = [await f.read() for f in uploads]
    names = [f.filename or f"file {i}" for i, f in enumerate(uploads)]

    async with lock:
        art = runtime.current
        try:
            result = await asyncio.to_thread(
                recalibrate, art, images,
                target_fpr=target, operator=operator, codec=codec, names=names,
                signer=settings.artifact_signer(),
            )  # fmt: skip
        except RecalibrationError as exc:
            raise ApiError(_STATUS.get(exc.reason, 400), exc.reason, exc.message) from exc
        except ArtifactError as exc:
            raise ApiError(409, "recalibration_failed", str(exc)) from exc
        try:
            served = await runtime.reload()
        except ArtifactError as exc:
            raise ApiError(
                409, "reload_failed",
                f"{result.version_dir} was written but did not load ({exc}); "
                f"version {art.metadata.version} keeps serving",
            ) from exc  # fmt: skip
    if served.path.resolve() != result.version_dir.resolve():
        raise ApiError(
            409, "not_served",
            f"{result.version_dir} was written, but the server now serves {served.path}",
        )  # fmt: skip
    cal = result.metadata.calibration
    return RecalibrationResponse(
        model=await models(runtime),
        calibration=RecalibrationSummary(
            images=result.images,
            duplicates_dropped=result.duplicates,
            parent_version=result.parent.version,
            codec=str(cal.codec),
            codec_mix=result.codec_mix,
            target_fpr=cal.target_fpr,
            promised_fpr=result.calibration.promised_fpr,
            fpr_upper_90=result.calibration.fpr_upper_90,
            images_for_target=cal.images_for_target or 1,
            warning=result.warning,
            old_thresholds=list(result.parent.thresholds.all),
            new_thresholds=list(result.metadata.thresholds.all),
        ),
    )
