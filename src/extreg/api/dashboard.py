"""The live dashboard at `/`, and the browser session that lets it call the API.

A browser cannot add a bearer header to a page load, so an operator signs in once by pasting
a token into the form served at `/` (with status 401 and no data when not signed in); the
token is then kept in an HttpOnly, SameSite=Strict cookie that the API accepts like a bearer
header. The page itself is one static HTML file with inline script and styles: no build step.
"""

from __future__ import annotations

import html
import math
from importlib.resources import files
from typing import Annotated

from fastapi import APIRouter, Form, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from .security import SESSION_COOKIE, Viewer, failed_authentication
from .state import runtime_of

router = APIRouter()

DASHBOARD = (files("extreg.api") / "static" / "dashboard.html").read_text(encoding="utf-8")
SIGN_IN = """<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>extreg — sign in</title>
<style>body{{font:15px system-ui,sans-serif;display:grid;place-items:center;min-height:90vh;
background:#f6f7f9;color:#1d2330}}form{{background:#fff;border:1px solid #dde1e8;border-radius:8px;
padding:1.2rem;width:min(26rem,92vw)}}input{{width:100%;padding:.5rem;margin:.5rem 0;font:inherit}}
button{{font:inherit;padding:.4rem .9rem}}.error{{color:#b42318}}</style></head><body>
<form method="post" action="/session"><h1 style="font-size:1.2rem">extreg dashboard</h1>
<label for="token">API token (viewer, operator or admin)</label>
<input id="token" name="token" type="password" autocomplete="off" required>
<p class="error" role="alert">{error}</p><button type="submit">Sign in</button>
<p style="font-size:.8rem;color:#5d6677">Create one with <code>extreg token create NAME --role viewer</code>.</p>
</form></body></html>"""


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def dashboard(request: Request) -> Response:
    """The dashboard for a signed-in browser, else the sign-in form (401). A cookie the server
    does not know counts as a failed authentication, like a wrong bearer token."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return _sign_in_page("", 401)
    if runtime_of(request).tokens.check(cookie) is None:
        return _refused(request, "invalid_session", "")
    return HTMLResponse(DASHBOARD)


def _sign_in_page(error: str, status: int) -> HTMLResponse:
    return HTMLResponse(SIGN_IN.format(error=html.escape(error)), status_code=status)


def _refused(request: Request, reason: str, error: str) -> HTMLResponse:
    """The sign-in form after a wrong credential: counted, 401, or 429 when over the limit."""
    wait = failed_authentication(request, reason)
    if wait is not None:
        page = _sign_in_page("Too many failed attempts; wait a minute.", 429)
        page.headers["Retry-After"] = str(math.ceil(wait))
    else:
        page = _sign_in_page(error, 401)
    page.delete_cookie(SESSION_COOKIE, path="/")
    return page


@router.post("/session", include_in_schema=False)
async def sign_in(request: Request, token: Annotated[str, Form()]) -> Response:
    """Check the token first (a valid one always signs in), count a wrong one towards the
    same rate limit as the API's, then keep it in the session cookie."""
    if not token.strip():
        return _sign_in_page("Paste a token.", 401)
    if runtime_of(request).tokens.check(token) is None:
        return _refused(request, "invalid_token", "That token is not valid.")
    response = RedirectResponse("/", status_code=303)
    response.set_cookie(SESSION_COOKIE, token, httponly=True, samesite="strict",
                        secure=request.url.scheme == "https", path="/")
    return response


@router.get("/admin/me", include_in_schema=True)
async def me(who: Viewer) -> dict[str, str]:
    """Who the caller is: the token's name and role (the dashboard shows controls by role)."""
    return {"name": who.name, "role": who.role}
