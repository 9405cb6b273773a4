"""The web dashboard's static files through TestClient: served, public for GET only, security headers, packaged."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from appliance.api.app import create_app
from appliance.settings import Settings
from appliance.store import Store
from appliance.web import ASSETS, STATIC_DIR
from tests.conftest import REPO

TOKEN = "t0ken-for-tests-only"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    settings = Settings.model_validate({"storage": {"data_dir": str(tmp_path / "var"), "fsync": False,
                                                    "min_free_mb": 0},
                                        "inference": {"models_dir": str(tmp_path / "models")},
                                        "api": {"enabled": True, "token": TOKEN}})
    store = Store(settings.data_dir, fsync=False)
    with TestClient(create_app(settings, store), raise_server_exceptions=False) as client:
        yield client
    store.close()


def assert_secure_headers(headers: object) -> None:
    csp = headers["content-security-policy"]  # type: ignore[index]
    assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "unsafe-eval" not in csp
    assert headers["x-content-type-options"] == "nosniff"  # type: ignore[index]
    assert headers["x-frame-options"] == "DENY"  # type: ignore[index]
    assert headers["referrer-policy"] == "no-referrer"  # type: ignore[index]


@pytest.mark.parametrize(("path", "media_type"), [("/ui/", "text/html"), ("/ui/index.html", "text/html"),
                                                  ("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css"),
                                                  ("/ui/favicon.svg", "image/svg+xml")])
def test_assets_are_served_without_a_token_with_security_headers(client: TestClient, path: str,
                                                                  media_type: str) -> None:
    response = client.get(path)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith(media_type)
    assert_secure_headers(response.headers)
    assert response.content == (STATIC_DIR / (path.removeprefix("/ui/") or "index.html")).read_bytes()


@pytest.mark.parametrize("path", ["/", "/ui"])
def test_root_and_bare_ui_redirect_to_the_dashboard(client: TestClient, path: str) -> None:
    response = client.get(path, follow_redirects=False)
    assert response.status_code == 307 and response.headers["location"] == "/ui/"
    assert_secure_headers(response.headers)


@pytest.mark.parametrize("path", ["/ui/__init__.py", "/ui/missing.js", "/ui/..%2F__init__.py",
                                  "/ui/%2e%2e/api/auth.py"])
def test_only_the_listed_assets_are_reachable(client: TestClient, path: str) -> None:
    # a path outside the dashboard's (a decoded ``..``) is refused to strangers, and not found for others
    assert client.get(path).status_code in (401, 404)
    response = client.get(path, headers=AUTH)
    assert response.status_code == 404
    assert set(response.json()) == {"code", "message", "request_id"}


def test_only_reading_the_dashboard_is_public(client: TestClient) -> None:
    assert client.post("/ui/").status_code == 401
    assert client.put("/ui/app.js").status_code == 401
    assert client.delete("/").status_code == 401
    assert client.post("/ui/", headers=AUTH).status_code == 405


@pytest.mark.parametrize("path", ["/status", "/jobs", "/audit?limit=5", "/models", "/fl/status", "/review",
                                  "/review?state=all", "/ui-data", "/uifoo"])
def test_data_routes_still_need_the_token(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    if not path.startswith("/ui"):
        assert client.get(path, headers=AUTH).status_code == 200


def test_dicomweb_keeps_its_own_tokens(client: TestClient) -> None:
    response = client.post("/dicom-web/studies", headers=AUTH, content=b"")
    assert response.status_code == 401  # the admin token does not open STOW-RS


def test_html_has_no_inline_script_or_style_and_labels_its_inputs() -> None:
    html = (STATIC_DIR / "index.html").read_text()
    assert "<style" not in html and " style=" not in html and not re.search(r"\son[a-z]+=", html)
    assert all('src="' in tag for tag in re.findall(r"<script[^>]*>", html))
    scripts = re.findall(r"<script[^>]*>(.*?)</script>", html, re.S)
    assert scripts and all(body == "" for body in scripts)
    for input_id in re.findall(r'<input id="([^"]+)"', html):
        assert f'<label for="{input_id}">' in html


def test_nothing_is_fetched_from_elsewhere_and_no_credential_is_kept_by_the_page() -> None:
    for name in ASSETS:
        text = (STATIC_DIR / name).read_text()
        assert not re.search(r"(src|href)=\"(https?:)?//", text), name
        assert "localStorage" not in text and "sessionStorage" not in text and "innerHTML" not in text, name
    script = (STATIC_DIR / "app.js").read_text()
    # the session is an HttpOnly cookie the script never handles; every request says it comes from the page
    assert "document.cookie" not in script and "Bearer" not in script
    assert 'credentials: "same-origin"' in script and '"X-Requested-With": "portico"' in script
    assert "?token" not in script and "&token" not in script and "password=" not in script


def test_every_asset_is_package_data() -> None:
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["*"]
    assert set(ASSETS) == {p.name for p in STATIC_DIR.iterdir() if p.suffix in (".html", ".css", ".js", ".svg")}
    for name in ASSETS:
        assert any(fnmatch(name, p) for p in patterns), f"{name} would be missing from a wheel"
