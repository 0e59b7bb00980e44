"""The credential check every admin route depends on: a parameter `_: Operator`, say.

A request authenticates with `Authorization: Bearer <token>` or, from the dashboard, with the
session cookie (a server-side session id, `auth.SessionBook`); a cookie-authenticated change
must also bring the same-origin proof of `browser`. 401 (with `WWW-Authenticate: Bearer`)
without credentials or with ones the server does not know, 403 when the token's role is too
small or the same-origin proof is missing, 429 instead of 401 when the client's address has
failed too often (`ratelimit`: only wrong credentials count, and a valid one always works).
The token itself is never logged or echoed; the principal's *name* is bound to the request's
log context and becomes the audit log's `changed_by`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from ipaddress import IPv4Network, IPv6Network, ip_address, ip_network
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Principal, Role, SessionBook, role_allows
from ..settings import Settings
from .browser import SAFE_METHODS, check_csrf, check_same_origin
from .ratelimit import FailedAuthLimiter
from .state import runtime_of

log = structlog.get_logger("extreg.api")

# The dashboard's session id, in an HttpOnly, SameSite=Strict cookie set by POST /session.
SESSION_COOKIE = "extreg_session"

bearer = HTTPBearer(
    auto_error=False,
    description="`Authorization: Bearer <token>`; make one with "
    "`extreg token create NAME --role R`.",
)


Network = IPv4Network | IPv6Network


def trusted_proxies(settings: Settings) -> tuple[Network, ...]:
    """The networks of setting `forwarded_allow_ips` (validated there)."""
    return tuple(ip_network(n) for n in settings.forwarded_allow_ips)


def client_address(request: Request) -> str:
    """The address a request's failures count against: the TCP peer, unless the peer is a
    proxy of `forwarded_allow_ips`; then the nearest `X-Forwarded-For` hop that is not such a
    proxy (each proxy appends the address it saw, so the rightmost hops are the trusted ones).
    The server itself never rewrites the peer (`serve_api` turns uvicorn's proxy_headers off)."""
    peer = request.client.host if request.client else "unknown"
    proxies: tuple[Network, ...] = request.app.state.trusted_proxies
    if not _within(peer, proxies):
        return peer
    hops = [
        hop.strip()
        for line in request.headers.getlist("x-forwarded-for")
        for hop in line.split(",")
        if hop.strip()
    ]
    for hop in reversed(hops):
        if not _within(hop, proxies):
            return hop
    return hops[0] if hops else peer


def _within(address: str, networks: Sequence[Network]) -> bool:
    if not networks:
        return False
    try:
        ip = ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def failed_authentication(request: Request, reason: str) -> float | None:
    """Count a wrong credential against the request's address (never call it for a request
    without credentials); the seconds to wait when the address is over the limit (answer
    429), else None (answer 401)."""
    limiter: FailedAuthLimiter = request.app.state.auth_limiter
    client = client_address(request)
    wait = limiter.failed(client)
    if wait is None:
        log.warning("auth_failed", client=client, reason=reason)
    else:
        log.warning("auth_rate_limited", client=client, reason=reason, retry_after_s=round(wait, 1))
    return wait


def too_many(wait: float) -> HTTPException:
    return HTTPException(
        429,
        "too many failed authentications from this address; retry later",
        headers={"Retry-After": str(math.ceil(wait))},
    )


def unauthorized(request: Request, *, wrong: bool) -> HTTPException:
    """The 401 for missing credentials, or, for `wrong` ones, counted: 401 or 429. A wrong
    session cookie is cleared, so a browser stops sending it."""
    headers = {"WWW-Authenticate": 'Bearer realm="extreg"'}
    if wrong:
        wait = failed_authentication(request, "invalid_token")
        if wait is not None:
            return too_many(wait)
        headers["WWW-Authenticate"] += ', error="invalid_token"'
        if SESSION_COOKIE in request.cookies:
            headers["Set-Cookie"] = (
                f'{SESSION_COOKIE}=""; Max-Age=0; Path=/; HttpOnly; SameSite=Strict'
            )
    return HTTPException(
        401, "a valid bearer token is required (Authorization: Bearer <token>)", headers=headers
    )


def session_principal(request: Request, session_id: str) -> Principal | None:
    """Who a session cookie stands for; a change (not GET/HEAD/OPTIONS) must also prove it
    comes from the dashboard (`browser`: own origin plus the session's CSRF token)."""
    sessions: SessionBook = request.app.state.sessions
    found = sessions.find(session_id)
    if found is None:
        return None
    session, principal = found
    if request.method not in SAFE_METHODS:
        check_same_origin(request)
        check_csrf(request, session.csrf)
    return principal


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting tokens of `role` or a greater one; returns who it is."""

    async def authenticate(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        if credentials:
            principal = runtime_of(request).tokens.check(credentials.credentials)
        elif session_id := request.cookies.get(SESSION_COOKIE):
            principal = session_principal(request, session_id)
        else:  # no credentials is not a failure: nothing is counted
            raise unauthorized(request, wrong=False)
        if principal is None:
            raise unauthorized(request, wrong=True)
        structlog.contextvars.bind_contextvars(actor=principal.name)
        if not role_allows(principal.role, role):
            log.warning("auth_forbidden", role=principal.role, needed=role)
            raise HTTPException(
                403, f"token {principal.name!r} has role {principal.role}; this needs {role}"
            )
        return principal

    return authenticate


# Route parameters: `_: Viewer` admits viewers and up, and so on.
Viewer = Annotated[Principal, Depends(require("viewer"))]
Operator = Annotated[Principal, Depends(require("operator"))]
Admin = Annotated[Principal, Depends(require("admin"))]
