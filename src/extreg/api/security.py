"""The bearer-token check every admin route depends on: a parameter `_: Operator`, say.

The token comes from `Authorization: Bearer` or, for the dashboard, the session cookie.
401 (with `WWW-Authenticate: Bearer`) without a token or with one the server does not know,
403 when the token's role is too small, 429 instead of 401 when the client's address has
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

from ..auth import Principal, Role, role_allows
from ..settings import Settings
from .ratelimit import FailedAuthLimiter
from .state import runtime_of

log = structlog.get_logger("extreg.api")

# The dashboard's browser session carries the same token in an HttpOnly, SameSite=Strict
# cookie (set by POST /session): scripts cannot read it and other sites cannot send it.
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
    hops = [hop.strip() for line in request.headers.getlist("x-forwarded-for")
            for hop in line.split(",") if hop.strip()]
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
        log.warning("auth_rate_limited", client=client, reason=reason,
                    retry_after_s=round(wait, 1))
    return wait


def too_many(wait: float) -> HTTPException:
    return HTTPException(
        429, "too many failed authentications from this address; retry later",
        headers={"Retry-After": str(math.ceil(wait))},
    )


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting tokens of `role` or a greater one; returns who it is."""

    async def authenticate(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        token = credentials.credentials if credentials else request.cookies.get(SESSION_COOKIE)
        if not token:  # no credentials is not a failure: nothing is counted
            raise HTTPException(
                401, "a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="extreg"'},
            )
        principal = runtime_of(request).tokens.check(token)
        if principal is None:
            wait = failed_authentication(request, "invalid_token")
            if wait is not None:
                raise too_many(wait)
            raise HTTPException(
                401, "a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": 'Bearer realm="extreg", error="invalid_token"'},
            )
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
