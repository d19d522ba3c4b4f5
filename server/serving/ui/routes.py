"""``GET /ui``: the web playground, policies page and live dashboard (docs/ui.md).

Static files only. The page itself carries no data: everything it shows comes from the API,
called from the browser with the key the page asks for. So ``/ui`` answers without a key and
while the engine is still starting; the API behind it keeps its own access checks.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse

from guardkit_server.serving.api.errors import RouteError

STATIC = Path(__file__).parent / "static"
_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_FILES = {p.name: p for p in STATIC.iterdir() if p.suffix in _TYPES}
_HEADERS = {
    "Cache-Control": "no-cache",
    # Scripts and styles from /ui only, requests to this server only; the key never leaves it.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}

router = APIRouter(include_in_schema=False)


def _serve(name: str) -> FileResponse:
    path = _FILES.get(name)
    if path is None:
        raise RouteError(404, f"no such UI file: {name!r}")
    return FileResponse(path, media_type=_TYPES[path.suffix], headers=_HEADERS)


@router.get("/ui")
async def index() -> FileResponse:
    return _serve("index.html")


@router.get("/ui/{name}")
async def asset(name: str) -> FileResponse:
    return _serve(name)
