"""The bearer-token check every admin route depends on: a parameter `_: Operator`, say.

The token comes from `Authorization: Bearer` or, for the dashboard, the session cookie.
401 (with `WWW-Authenticate: Bearer`) without a token or with one the server does not know,
403 when the token's role is too small, 429 when the client address has failed too often.
The token itself is never logged or echoed; the principal's *name* is bound to the request's
log context and becomes the audit log's `changed_by`.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Annotated

import structlog
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from ..auth import Principal, Role, role_allows
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


def require(role: Role) -> Callable[..., Awaitable[Principal]]:
    """A dependency admitting tokens of `role` or a greater one; returns who it is."""

    async def authenticate(
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Principal:
        limiter: FailedAuthLimiter = request.app.state.auth_limiter
        client = request.client.host if request.client else "unknown"
        wait = limiter.retry_after(client)
        if wait is not None:
            log.warning("auth_rate_limited", client=client, retry_after_s=round(wait, 1))
            raise HTTPException(
                429, "too many failed authentications from this address; retry later",
                headers={"Retry-After": str(math.ceil(wait))},
            )
        token = credentials.credentials if credentials else request.cookies.get(SESSION_COOKIE)
        principal = runtime_of(request).tokens.check(token) if token else None
        if principal is None:
            limiter.failed(client)
            reason = "invalid_token" if token else "missing_token"
            log.warning("auth_failed", client=client, reason=reason)
            challenge = 'Bearer realm="extreg"' + (', error="invalid_token"' if token else "")
            raise HTTPException(
                401, "a valid bearer token is required (Authorization: Bearer <token>)",
                headers={"WWW-Authenticate": challenge},
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
