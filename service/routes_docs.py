"""The API's description and its docs page, all served from the package.

``/openapi.json`` is :mod:`service.openapi`'s schema of this app, with the
example images' URLs made absolute on the URL it was asked for. ``/docs`` is
Swagger UI; its script, style and icon come from the fastapi-offline wheel
(swagger-ui-dist 5, Apache-2.0) under ``/docs/assets``, so the page loads
nothing from a CDN and works on an air-gapped line. ReDoc is off: its
bundle fetches its logo from a CDN. ``/docs/examples`` holds the example
images the schema points at. None of these needs a key or is in the schema.
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, Response
from starlette.exceptions import HTTPException

from service.openapi import EXAMPLE_TYPES, EXAMPLES_URL, example_image, with_base_url

OPENAPI_URL = "/openapi.json"
DOCS_URL = "/docs"
ASSETS_URL = "/docs/assets"
_ASSET_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS = {
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "swagger-ui.css": "text/css; charset=utf-8",
    "favicon.png": "image/png",
}
# The files do not change while the server runs (they change with the package).
_CACHE = {"Cache-Control": "public, max-age=3600"}

router = APIRouter(include_in_schema=False)


def _root(request: Request) -> str:
    return str(request.scope.get("root_path", "")).rstrip("/")


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> JSONResponse:
    schema = with_base_url(request.app.openapi(), str(request.base_url))
    if root := _root(request):  # behind a proxy that strips a prefix, as FastAPI does
        schema["servers"] = [{"url": root}]
    return JSONResponse(schema)


@router.get(DOCS_URL)
async def docs(request: Request) -> HTMLResponse:
    root = _root(request)
    return get_swagger_ui_html(
        openapi_url=f"{root}{OPENAPI_URL}",
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
        swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
        # No online validator badge: it would send the schema to swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )


@router.get(ASSETS_URL + "/{name}")
async def asset(name: str) -> FileResponse:
    media_type = ASSETS.get(name)
    if media_type is None:
        raise HTTPException(404)
    return FileResponse(_ASSET_DIR / name, media_type=media_type, headers=_CACHE)


@router.get(EXAMPLES_URL + "/{name}")
def example(name: str) -> Response:  # encodes on first use: off the event loop
    data = example_image(name)
    if data is None:
        raise HTTPException(404)
    return Response(data, media_type=EXAMPLE_TYPES[name.rsplit(".", 1)[1]], headers=_CACHE)
