"""The dashboard's static files: the vendored chart library (uPlot 1.6.32, MIT, its licence
in `static/uPlot.LICENSE`) under `/static/NAME`, and the favicon at `/favicon.ico`.

No credentials: these are public files, and a browser fetches the favicon without the
session. `/static/` answers are cached for a year (`immutable`): the dashboard names them with
the library's version in the query (`?v=1.6.32`), so a new version is a new URL. Only the
files of `TYPES`' kinds are served (never the page itself, which needs a session), each with
its exact content type, as `X-Content-Type-Options: nosniff` requires.
"""

from __future__ import annotations

import hashlib
from importlib.resources import files

from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response

router = APIRouter(include_in_schema=False)

TYPES = {
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".ico": "image/x-icon",
}
LONG_CACHE = "public, max-age=31536000, immutable"
FAVICON_CACHE = "public, max-age=86400"  # a fixed URL: a day


def _load() -> dict[str, tuple[bytes, str, str]]:
    """Every servable file of `static/`: name -> (content, content type, ETag)."""
    found = {}
    for item in (files("extreg.api") / "static").iterdir():
        suffix = "." + item.name.rpartition(".")[2]
        if item.is_file() and suffix in TYPES:
            content = item.read_bytes()
            etag = '"' + hashlib.sha256(content).hexdigest()[:16] + '"'
            found[item.name] = (content, TYPES[suffix], etag)
    return found


ASSETS = _load()


def _answer(request: Request, name: str, cache: str) -> Response:
    if name not in ASSETS:
        raise HTTPException(404, f"no static file {name!r}")
    content, media_type, etag = ASSETS[name]
    headers = {"Cache-Control": cache, "ETag": etag}
    if request.headers.get("if-none-match") == etag:
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)


@router.get("/static/{name}")
async def static_file(name: str, request: Request) -> Response:
    """A vendored file or icon, cached for a year."""
    return _answer(request, name, LONG_CACHE)


@router.get("/favicon.ico")
async def favicon(request: Request) -> Response:
    """The icon browsers ask for on every site."""
    return _answer(request, "favicon.ico", FAVICON_CACHE)
