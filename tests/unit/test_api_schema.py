"""The OpenAPI schema says what the server does: the keys it checks, the
statuses and headers each route answers, the limits of its settings, and
example images it accepts. (tests/integration/test_fuzz_api.py holds the
running server to it; this checks what the schema declares.)"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.deps import RAW_TYPES
from service.openapi import MIN_IMAGE_BYTES, example_image
from service.preprocessing import prepare
from service.settings import Settings
from tests.helpers.onnx_models import write_toy_artifact

CLIENT = ("/v1/inspect", "/v1/inspect/heatmap", "/v1/inspect/batch", "/v1/models")
ADMIN = ("/v1/models/reload", "/v1/models/recalibrate")
OPS = ("/healthz", "/readyz", "/metrics")
IMAGE = ("/v1/inspect", "/v1/inspect/heatmap", "/v1/inspect/batch")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root)
    return root / "toy"


def _schema(model_dir: Path, **settings: Any) -> dict[str, Any]:
    app = create_app(Settings(model_dir=model_dir, **settings))
    spec: dict[str, Any] = (
        TestClient(app, base_url="http://line-7:8000").get("/openapi.json").json()
    )
    return spec


def _ops(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {path: next(iter(ops.values())) for path, ops in spec["paths"].items()}


def test_keys_are_declared_where_they_are_checked(model_dir: Path) -> None:
    spec = _schema(model_dir, api_keys=("k1", "k2"), admin_key="admin")
    schemes = spec["components"]["securitySchemes"]
    key = schemes["ClientKey"]
    assert (key["type"], key["in"], key["name"]) == ("apiKey", "header", "X-API-Key")
    assert schemes["ClientBearer"]["type"] == "http"
    assert schemes["ClientBearer"]["scheme"] == "bearer"
    assert schemes["AdminKey"]["name"] == "X-API-Key"
    ops = _ops(spec)
    for path in CLIENT:
        assert ops[path]["security"] == [{"ClientKey": []}, {"ClientBearer": []}], path
        assert {"401", "403"} <= set(ops[path]["responses"]), path
    for path in ADMIN:
        assert ops[path]["security"] == [{"AdminKey": []}, {"AdminBearer": []}], path
    for path in OPS:
        assert "security" not in ops[path], path
        assert not {"401", "403"} & set(ops[path]["responses"]), path


def test_without_client_keys_the_client_routes_declare_none(model_dir: Path) -> None:
    spec = _schema(model_dir, admin_key="admin")
    assert set(spec["components"]["securitySchemes"]) == {"AdminKey", "AdminBearer"}
    ops = _ops(spec)
    for path in CLIENT:
        assert "security" not in ops[path], path
        assert not {"401", "403"} & set(ops[path]["responses"]), path
    for path in ADMIN:
        assert "security" in ops[path], path


def test_without_an_admin_key_the_admin_routes_only_refuse(model_dir: Path) -> None:
    ops = _ops(_schema(model_dir))
    for path in ADMIN:
        assert set(ops[path]["responses"]) == {"403"}, path


def test_each_route_lists_the_statuses_it_answers(model_dir: Path) -> None:
    ops = _ops(_schema(model_dir, api_keys=("k",), admin_key="admin"))
    codes = {path: set(op["responses"]) for path, op in ops.items()}
    body = {"400", "408", "413", "415"}
    assert codes["/v1/inspect"] == {"200", "401", "403", "500", "503", "422"} | body
    assert codes["/v1/inspect/heatmap"] == {"200", "401", "403", "500", "503"} | body
    assert codes["/v1/inspect/batch"] == {"200", "401", "403", "500", "503"} | body
    assert codes["/v1/models"] == {"200", "401", "403", "500"}
    assert codes["/v1/models/reload"] == {"200", "401", "403", "409", "500"}
    assert codes["/v1/models/recalibrate"] == {"200", "401", "403", "409", "500"} | body
    assert codes["/healthz"] == {"200"}
    assert codes["/readyz"] == {"200", "503"}
    assert codes["/metrics"] == {"200"}
    assert set(ops) == set(CLIENT) | set(ADMIN) | set(OPS)  # the docs are not in it


def test_headers_every_answer_carries(model_dir: Path) -> None:
    ops = _ops(_schema(model_dir, api_keys=("k",), admin_key="admin"))
    for path, op in ops.items():
        for status, response in op["responses"].items():
            assert response["headers"]["X-Request-ID"]["required"] is True, (path, status)
            if status == "503":
                assert "Retry-After" in response["headers"], path
    for path in IMAGE:
        assert ops[path]["responses"]["503"]["headers"]["Retry-After"]["required"] is True
    heatmap = ops["/v1/inspect/heatmap"]["responses"]["200"]
    assert {"X-Verdict", "X-Defective-Tiles"} <= set(heatmap["headers"])
    assert set(heatmap["content"]) == {"image/png"}
    assert set(ops["/metrics"]["responses"]["200"]["content"]) == {"text/plain"}


def test_limits_come_from_the_settings(model_dir: Path) -> None:
    ops = _ops(_schema(model_dir, max_batch_files=7, max_recalibration_files=300))

    def files(path: str) -> dict[str, Any]:
        form = ops[path]["requestBody"]["content"]["multipart/form-data"]["schema"]
        field: dict[str, Any] = form["properties"]["files"]
        return field

    assert (files("/v1/inspect/batch")["minItems"], files("/v1/inspect/batch")["maxItems"]) == (
        1,
        7,
    )
    recal = files("/v1/models/recalibrate")
    assert (recal["minItems"], recal["maxItems"]) == (10, 300)
    assert "x-max-items-from" not in str(ops)


def test_image_bodies_take_every_type_with_an_example_the_model_accepts(model_dir: Path) -> None:
    spec = _schema(model_dir)
    for path in ("/v1/inspect", "/v1/inspect/heatmap"):
        content = _ops(spec)[path]["requestBody"]["content"]
        assert set(content) == {*RAW_TYPES, "multipart/form-data"}
        assert "application/octet-stream" in content
        for media_type in RAW_TYPES:
            assert content[media_type]["schema"]["minLength"] == MIN_IMAGE_BYTES
            (example,) = content[media_type]["examples"].values()
            url = example["externalValue"]
            assert url.startswith("http://line-7:8000/docs/examples/part."), url
            data = example_image(url.rsplit("/", 1)[1])
            assert data is not None and len(data) >= MIN_IMAGE_BYTES
            prepared = prepare(data)  # the default model's input: 300x300 RGB, 3x3 tiles
            assert prepared.codec is not None
            if media_type != "application/octet-stream":  # a file of the type it is sent as
                subtype = media_type.split("/")[1].removeprefix("x-ms-")
                assert prepared.codec.format == subtype, (media_type, prepared.codec)


def test_min_length_is_the_shortest_png() -> None:
    # MIN_IMAGE_BYTES is no guess: it is the length of a 1x1 PNG, and OpenCV's
    # smallest files of a 9x9 image (less than any tile) are no shorter.
    ok, png = cv2.imencode(".png", np.zeros((1, 1), np.uint8), [cv2.IMWRITE_PNG_COMPRESSION, 9])
    assert ok and len(png) == MIN_IMAGE_BYTES
    smallest = {
        ".png": [cv2.IMWRITE_PNG_COMPRESSION, 9],
        ".jpg": [cv2.IMWRITE_JPEG_QUALITY, 1],
        ".bmp": [],
        ".tif": [],
    }
    for shape in ((9, 9), (9, 9, 3)):
        for ext, params in smallest.items():
            ok, data = cv2.imencode(ext, np.zeros(shape, np.uint8), params)
            assert ok and len(data) >= MIN_IMAGE_BYTES, (shape, ext)
