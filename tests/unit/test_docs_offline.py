"""/docs works on an air-gapped line: the page names no host but the
server's own, and every script, style sheet and icon it names is served by
the server, from the package, with its content type."""

from __future__ import annotations

import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import pytest
from fastapi.testclient import TestClient

from service.app import create_app
from service.settings import Settings
from tests.helpers.onnx_models import write_toy_artifact

BASE = "http://inspection.local:8000"


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[tuple[str, str, str]] = []  # (tag, attribute, URL)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        for name, value in attrs:
            if name in ("src", "href") and value:
                self.urls.append((tag, name, value))


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    # No lifespan: the docs need no model loaded.
    root = tmp_path_factory.mktemp("models")
    write_toy_artifact(root)
    return TestClient(create_app(Settings(model_dir=root / "toy")), base_url=BASE)


def test_docs_name_no_other_host_and_serve_their_assets(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    parser = _Links()
    parser.feed(page.text)
    # The page's scripts and styles, and the schema its script loads.
    urls = [(tag, attr, url) for tag, attr, url in parser.urls]
    urls += [("script", "url", u) for u in re.findall(r"\burl: '([^']+)'", page.text)]
    assert {tag for tag, _, _ in urls} >= {"link", "script"}, urls
    expected = {
        "link": ("text/css", "image/png"),
        "script": ("text/javascript", "application/json"),
    }
    for tag, attr, url in urls:
        absolute = urljoin(f"{BASE}/docs", url)
        assert urlsplit(absolute).netloc == urlsplit(BASE).netloc, (tag, attr, url)
        r = client.get(absolute)
        assert r.status_code == 200, url
        media = r.headers["content-type"].split(";")[0]
        assert media in expected[tag], (url, media)
        assert r.content, url
    # Nothing else on the page names a host (an inline script could).
    assert not re.search(r"(?i)\b(?:https?:)?//[a-z0-9.-]+", page.text)
    # No call home from the page either: Swagger UI's online validator is off.
    assert '"validatorUrl": null' in page.text


def test_swagger_ui_is_the_one_that_reads_openapi_3_1(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["openapi"].startswith("3.1")
    bundle = client.get("/docs/assets/swagger-ui-bundle.js").text
    assert "SwaggerUIBundle" in bundle
    versions = {int(v) for v in re.findall(r'"(\d+)\.\d+\.\d+"', bundle)}
    assert 5 in versions  # swagger-ui 5: the first to render OpenAPI 3.1


def test_no_cdn_page_is_left(client: TestClient) -> None:
    # ReDoc is off (its bundle loads its logo from a CDN), and so are FastAPI's
    # own CDN-loading pages.
    for path in ("/redoc", "/docs/oauth2-redirect", "/docs/assets/redoc.standalone.js"):
        assert client.get(path).status_code == 404, path


def test_docs_and_schema_need_no_key(tmp_path: Path) -> None:
    write_toy_artifact(tmp_path)
    app = create_app(Settings(model_dir=tmp_path / "toy", api_keys="k", admin_key="a"))
    with_keys = TestClient(app, base_url=BASE)
    for path in (
        "/docs",
        "/openapi.json",
        "/docs/assets/swagger-ui.css",
        "/docs/examples/part.png",
    ):
        assert with_keys.get(path).status_code == 200, path
