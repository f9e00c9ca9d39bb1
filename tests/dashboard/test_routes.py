"""The dashboard's own routes, in process: the page and its files, Debian's Chart.js served from
where the package installs it, and a clear 503 when the package is missing."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from unkey_deploy.core import config
from unkey_deploy.gateway import dashboard
from unkey_deploy.gateway.app import create_app
from unkey_deploy.gateway.server import extra_routers
from unkey_deploy.store import db


class Client:
    """GETs against the app in process (ASGI), no server needed for these routes."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    def get(self, path: str) -> httpx.Response:
        async def go() -> httpx.Response:
            transport = httpx.ASGITransport(app=self.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://gw") as c:
                return await c.get(path)

        return asyncio.run(go())


@pytest.fixture
def client(tmp_path: Path) -> Iterator[Client]:
    settings = config.load(data_dir=tmp_path)
    engine = db.make_engine(settings.resolved_database_url)
    db.upgrade(engine)
    yield Client(create_app(settings, routers=extra_routers(), factory=db.session_factory(engine)))
    engine.dispose()


def test_page_and_files_are_served_with_a_strict_policy(client: Client) -> None:
    r = client.get("/dashboard")
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/html")
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert 'id="login-form"' in r.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        f = client.get(f"/dashboard/static/{name}")
        assert f.status_code == 200 and f.headers["content-type"].startswith(kind)
        assert f.content == (dashboard.STATIC_DIR / name).read_bytes()
    # only the listed files: nothing else under the package is reachable
    for name in ("index.html", "..%2Fdashboard.py", "missing.js"):
        assert client.get(f"/dashboard/static/{name}").status_code == 404


def test_chart_js_comes_from_the_debian_package(client: Client) -> None:
    installed = dashboard.chart_js_file()
    assert installed.parent == Path("/usr/share/javascript/chart.js")
    r = client.get("/dashboard/vendor/chart.js")
    assert r.status_code == 200
    assert r.content == installed.read_bytes()
    assert b"Chart.js v" in r.content[:200]


def test_missing_chart_js_is_a_clear_503(
    client: Client, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dashboard, "CHART_JS_DIR", tmp_path / "no-chart-js")
    r = client.get("/dashboard/vendor/chart.js")
    assert r.status_code == 503
    err = r.json()["error"]
    assert err["code"] == "unavailable"
    assert "libjs-chart.js" in err["suggestion"]
    assert "Chart.js is not installed" in err["message"]


def test_dashboard_routes_stay_out_of_the_api_schema(client: Client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    assert not [p for p in paths if p.startswith("/dashboard")]
