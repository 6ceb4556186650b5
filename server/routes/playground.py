"""The playground: a plain HTML/CSS/JS page at / that drives this server's own API from a browser (no build
step, nothing loaded from elsewhere). It signs requests itself when the server has API keys."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response

from server.errors import error_body
from server.routes.common import services_of

router = APIRouter()

STATIC = Path(__file__).resolve().parent.parent / "static"
ASSETS = {
    "index.html": "text/html", "style.css": "text/css", "app.js": "text/javascript", "api.js": "text/javascript",
    "sign.js": "text/javascript",
}
"""Everything the page is made of; nothing else under static/ is served."""

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; "
        "media-src 'self' blob: http: https:; connect-src 'self' ws: wss:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}


def _asset(name: str) -> Response:
    return FileResponse(STATIC / name, media_type=ASSETS[name], headers=SECURITY_HEADERS)


@router.get("/")
async def page() -> Response:
    return _asset("index.html")


@router.get("/static/{name}")
async def asset(name: str) -> Response:
    if name not in ASSETS:
        return JSONResponse(error_body([(0, "Error parsing url.")]), status_code=404)
    return _asset(name)


@router.get("/playground/config.json")
async def config(request: Request) -> JSONResponse:
    """What the page cannot learn from the Wiro API: whether requests must carry an API key."""
    return JSONResponse({"authRequired": not services_of(request).auth.open}, headers={"Cache-Control": "no-cache"})
