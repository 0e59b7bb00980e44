"""What protects a signed-in browser: the same-origin proof for its changes, and the headers
that keep every page out of other sites' frames.

SameSite=Strict is not enough: a *site* ignores ports, so a page on `http://127.0.0.1:OTHER`
is same-site with the server and its requests carry the session cookie. A request that the
cookie authenticates and that may change something (any method but GET, HEAD, OPTIONS) must
therefore prove both
- that it comes from the server's own origin: `Origin` names this request's own host and
  port (or, without `Origin`, `Sec-Fetch-Site: same-origin`), which a browser sets and a
  page cannot forge; and
- that the page knows the session's CSRF token, sent as `X-CSRF-Token`: the token is only in
  the dashboard's HTML, which another origin cannot read.
Bearer-token requests involve no cookie and are not checked: a page cannot make a browser
add an `Authorization` header to a cross-origin request without the server's CORS consent,
which it never gives.

`SecurityHeaders` adds `X-Frame-Options: DENY`, `X-Content-Type-Options: nosniff` and a
default `Content-Security-Policy` (nothing may load, nobody may frame) to every answer; the
HTML pages replace that policy with `page_policy`, which admits their own inline script and
style by hash (`inline_hashes`), never 'unsafe-inline', and the dashboard also the script and
style files of its own origin ('self': the vendored chart library, `assets`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from urllib.parse import urlsplit

from fastapi import HTTPException, Request
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
CSRF_HEADER = "X-CSRF-Token"
DEFAULT_PORTS = {"http": 80, "https": 443}
API_POLICY = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"


def check_same_origin(request: Request) -> None:
    """403 unless the request comes from the server's own origin (see the module docstring)."""
    origin = request.headers.get("origin")
    if origin is None:
        ok = request.headers.get("sec-fetch-site") == "same-origin"
    else:
        ok = _same_host_and_port(origin, request.headers.get("host", ""))
    if not ok:
        raise HTTPException(
            403,
            "cross-origin request refused: a signed-in browser may change things only "
            "from this server's own origin (or use Authorization: Bearer)",
        )


def check_csrf(request: Request, expected: str) -> None:
    """403 unless the request carries the session's CSRF token (after `check_same_origin`)."""
    presented = request.headers.get(CSRF_HEADER, "")
    if not hmac.compare_digest(presented.encode(), expected.encode()):
        raise HTTPException(
            403,
            f"CSRF token missing or wrong: send the session's token as {CSRF_HEADER} "
            "(the dashboard does), or use Authorization: Bearer",
        )


def _same_host_and_port(origin: str, host: str) -> bool:
    """Whether `Origin` names the host and port the request was sent to (its Host header);
    an absent port is the default of the origin's scheme on both sides."""
    try:
        theirs = urlsplit(origin)
        ours = urlsplit(f"{theirs.scheme}://{host}")
        default = DEFAULT_PORTS.get(theirs.scheme)
        if default is None or not theirs.hostname or not ours.hostname:
            return False
        return (theirs.hostname, theirs.port or default) == (ours.hostname, ours.port or default)
    except ValueError:  # a malformed port
        return False


def inline_hashes(html: str, tag: str) -> str:
    """The CSP sources admitting exactly the inline `<tag>` blocks of `html`."""
    blocks = re.findall(f"<{tag}>(.*?)</{tag}>", html, re.S)
    return " ".join(
        "'sha256-" + base64.b64encode(hashlib.sha256(b.encode()).digest()).decode() + "'"
        for b in blocks
    )


def page_policy(html: str, *, scripts: bool, assets: bool = False) -> str:
    """The CSP of one of our HTML pages: its own inline style (and script), fetches to this
    origin, forms to this origin, no frames, nothing else; with `assets`, also the script and
    style files this origin serves (the vendored chart library under `/static/`)."""
    own = "'self' " if assets else ""
    script = f"script-src {own}{inline_hashes(html, 'script')}; " if scripts else ""
    return (
        f"default-src 'none'; {script}style-src {own}{inline_hashes(html, 'style')}; "
        "connect-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    )


class SecurityHeaders:
    """ASGI middleware: framing and sniffing headers on every answer (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("X-Frame-Options", "DENY")
                headers.setdefault("X-Content-Type-Options", "nosniff")
                headers.setdefault("Content-Security-Policy", API_POLICY)
            await send(message)

        await self.app(scope, receive, send_with_headers)
