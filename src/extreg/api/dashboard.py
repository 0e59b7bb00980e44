"""The live dashboard at `/`, and the browser session that lets it call the API.

A browser cannot add a bearer header to a page load, so an operator signs in once by pasting
a token into the form served at `/` (with status 401 and no data when not signed in). The
server then opens a session (`auth.SessionBook`: in this process's memory, 12 hours, ended by
`POST /session/logout`, the dashboard's "Sign out", or revoking the token) and sets a cookie
holding only the session's random id, HttpOnly and SameSite=Strict. The dashboard's HTML
carries the session's CSRF token, which its script sends as `X-CSRF-Token` with every
request; changes need it, and the server's own origin (`browser`). Its views (extensions;
policies, with their stages coloured by health and a dry-run form) are tabs of one page,
chosen by the URL's fragment (`#policies`), so a view can be bookmarked. The page is one static
HTML file with one inline script and one inline style, admitted by hash in its CSP, plus the
vendored chart library (uPlot) that `assets` serves from this origin: no build step, and no
other script can run in it. Its charts read `GET /admin/extensions[/{id}]/health/series`.
"""

from __future__ import annotations

import html
import math
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from ..auth import SessionBook
from . import assets
from .browser import check_csrf, check_same_origin, page_policy
from .security import SESSION_COOKIE, Viewer, failed_authentication

router = APIRouter()
router.include_router(assets.router)  # the page's files and the favicon, no session needed

DASHBOARD = (files("extreg.api") / "static" / "dashboard.html").read_text(encoding="utf-8")
CSRF_MARK = "__EXTREG_CSRF_TOKEN__"  # in dashboard.html's <meta name="csrf-token">
DASHBOARD_POLICY = page_policy(DASHBOARD, scripts=True, assets=True)
SIGN_IN = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>extreg — sign in</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<style>*{box-sizing:border-box}body{font:15px system-ui,sans-serif;display:grid;
place-items:center;min-height:90vh;background:#f6f7f9;color:#1d2330}
form{background:#fff;border:1px solid #dde1e8;border-radius:8px;padding:1.2rem;
width:min(26rem,92vw)}input{width:100%;padding:.5rem;margin:.5rem 0;font:inherit}
button{font:inherit;padding:.4rem .9rem}.error{color:#b42318}h1{font-size:1.2rem}
.hint{font-size:.8rem;color:#5d6677}</style></head><body>
<form method="post" action="/session"><h1>extreg dashboard</h1>
<label for="token">API token (viewer, operator or admin)</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<p class="error" role="alert">__ERROR__</p><button type="submit">Sign in</button>
<p class="hint">Create one with <code>extreg token create NAME --role viewer</code>.</p>
</form></body></html>"""
SIGN_IN_POLICY = page_policy(SIGN_IN, scripts=False)


def _sessions(request: Request) -> SessionBook:
    sessions: SessionBook = request.app.state.sessions
    return sessions


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The dashboard for a signed-in browser, else the sign-in form (401). A cookie the server
    does not know (or whose session ended) counts as a failed authentication, like a wrong
    bearer token."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return _sign_in_page("", 401)
    found = _sessions(request).find(cookie)
    if found is None:
        return _refused(request, "invalid_session", "")
    return HTMLResponse(
        DASHBOARD.replace(CSRF_MARK, html.escape(found[0].csrf)),
        headers={"Content-Security-Policy": DASHBOARD_POLICY, "Cache-Control": "no-store"},
    )


def _sign_in_page(error: str, status: int) -> HTMLResponse:
    return HTMLResponse(
        SIGN_IN.replace("__ERROR__", html.escape(error)),
        status_code=status,
        headers={"Content-Security-Policy": SIGN_IN_POLICY},
    )


def _refused(request: Request, reason: str, error: str) -> HTMLResponse:
    """The sign-in form after a wrong credential: counted, 401, or 429 when over the limit."""
    wait = failed_authentication(request, reason)
    if wait is not None:
        page = _sign_in_page("Too many failed attempts; wait a minute.", 429)
        page.headers["Retry-After"] = str(math.ceil(wait))
    else:
        page = _sign_in_page(error, 401)
    page.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return page


@router.post("/session", include_in_schema=False)
async def sign_in(request: Request, token: Annotated[str, Form()]) -> Response:
    """Open a session for a valid token. Only from this server's own page (no login CSRF);
    the token is checked first (a valid one always signs in) and a wrong one counts towards
    the same rate limit as the API's."""
    check_same_origin(request)
    if not token.strip():
        return _sign_in_page("Paste a token.", 401)
    opened = _sessions(request).open(token)
    if opened is None:
        return _refused(request, "invalid_token", "That token is not valid.")
    session_id, _ = opened
    if previous := request.cookies.get(SESSION_COOKIE):
        _sessions(request).close(previous)  # signing in again replaces the browser's session
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(
        SESSION_COOKIE,
        session_id,
        max_age=math.ceil(_sessions(request).ttl_s),
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.post("/session/logout", status_code=204, include_in_schema=False)
async def sign_out(request: Request) -> Response:
    """End the browser's session (with the same-origin proof and CSRF token a change needs)
    and clear its cookie; without a live session there is nothing to end, and that is fine."""
    cookie = request.cookies.get(SESSION_COOKIE)
    found = _sessions(request).find(cookie) if cookie else None
    if cookie and found is not None:
        check_same_origin(request)
        check_csrf(request, found[0].csrf)
        _sessions(request).close(cookie)
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response


@router.get("/admin/me", include_in_schema=True)
async def me(who: Viewer) -> dict[str, str]:
    """Who the caller is: the token's name and role (the dashboard shows controls by role)."""
    return {"name": who.name, "role": who.role}
