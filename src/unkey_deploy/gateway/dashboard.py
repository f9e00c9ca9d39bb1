"""The web dashboard gatewayd serves at ``/dashboard`` (mounted through ``server.EXTRA_ROUTERS``).

A static page (``static/``) whose script calls the JSON API with the API key the user types in
(kept in ``sessionStorage``, sent as ``Authorization: Bearer``): deployments, VM status and live
charts from ``GET /v1/usage``, usage over time from its 5-minute rollups, and the month's bill.
The page itself holds no data and needs no authentication; every number comes from the API, so
the dashboard never sees more than the key may.

Charts are drawn by Chart.js from Debian's ``libjs-chart.js``, served from where the package
installs it; the library is never copied into the project. Without the package the route answers
503 naming the package to install.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, RedirectResponse

from ..core.errors import NotFound, Unavailable

router = APIRouter(include_in_schema=False)

STATIC_DIR = Path(__file__).parent / "static"
# Files the page may load, by name (no path from the request ever reaches the file system).
STATIC_FILES = {
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}
# Where Debian's libjs-chart.js puts the browser (UMD) build: chart.umd.js from Chart.js 4,
# chart.min.js / chart.js in the 3.x packages (Debian 12 ships 3.9.1).
CHART_JS_DIR = Path("/usr/share/javascript/chart.js")
CHART_JS_NAMES = ("chart.umd.js", "chart.min.js", "chart.js")

# The page runs only its own scripts: no inline script, no third-party origin.
_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def chart_js_file(directory: Path | None = None) -> Path:
    """The installed Chart.js browser build, or :class:`Unavailable` naming the package."""
    base = directory or CHART_JS_DIR
    for name in CHART_JS_NAMES:
        path = base / name
        if path.is_file():
            return path
    raise Unavailable(
        f"Chart.js is not installed (none of {', '.join(CHART_JS_NAMES)} in {base})",
        suggestion="install Debian's package: apt-get install libjs-chart.js",
    )


@router.get("/dashboard/")
async def dashboard_slash() -> RedirectResponse:
    return RedirectResponse("/dashboard", status_code=308)


@router.get("/dashboard")
async def dashboard() -> FileResponse:
    return FileResponse(
        STATIC_DIR / "index.html", media_type="text/html; charset=utf-8", headers=_HEADERS
    )


@router.get("/dashboard/static/{name}")
async def static_file(name: str) -> FileResponse:
    media = STATIC_FILES.get(name)
    if media is None:
        raise NotFound(f"no dashboard file {name!r}")
    return FileResponse(STATIC_DIR / name, media_type=media, headers=_HEADERS)


@router.get("/dashboard/vendor/chart.js")
async def chart_js() -> FileResponse:
    return FileResponse(
        chart_js_file(), media_type="text/javascript; charset=utf-8", headers=_HEADERS
    )
