"""The open endpoints: liveness, readiness and Prometheus metrics.

/healthz and /readyz need no token, so they answer status only: the registry's status names
the database (user, host, name) and the last error, which is for viewers and up (`/readyz` with
a viewer token adds it as `details`; `GET /admin/status` has it too). /metrics needs no token
unless `metrics_token` is set.
"""

from __future__ import annotations

import hashlib
import hmac
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials

from ..metrics import CONTENT_TYPE
from .security import bearer, failed_authentication, require, too_many
from .state import runtime_of

router = APIRouter(tags=["probes"])

_viewer = require("viewer")


async def _shows_details(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> bool:
    """True for a viewer token; no token means status only (and is no failed attempt); a wrong
    token is refused as on any admin route (401, counted by the failed-authentication limit)."""
    if credentials is None:
        return False
    await _viewer(request, credentials)
    return True


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """The process is alive and answering."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "The registry has not loaded yet."}})
async def readyz(
    request: Request, details: Annotated[bool, Depends(_shows_details)]
) -> JSONResponse:
    """200 `{"status": "ready"}` once the registry has loaded (from any source), 503
    `{"status": "not_ready"}` before; with a viewer token, the registry's status as `details`."""
    status = runtime_of(request).registry.status
    ready = status.generation > 0
    body: dict[str, object] = {"status": "ready" if ready else "not_ready"}
    if details:
        body["details"] = status.as_dict()
    return JSONResponse(body, status_code=200 if ready else 503)


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text."},
        401: {"description": "`metrics_token` is set and was not given as the bearer token."},
    },
)
async def metrics(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Response:
    """The Prometheus exposition (rendered at most every couple of seconds: see
    `extreg.metrics`); with `metrics_token` set, only for that bearer token."""
    runtime = runtime_of(request)
    wanted = runtime.settings.metrics_token
    if wanted is not None:
        given = credentials.credentials if credentials else ""
        if not hmac.compare_digest(_digest(given), _digest(wanted.get_secret_value())):
            # a wrong token counts as a failed authentication, as on the admin routes
            wait = failed_authentication(request, "invalid_metrics_token") if given else None
            if wait is not None:
                raise too_many(wait)
            raise HTTPException(
                401,
                "/metrics needs the metrics token (Authorization: Bearer <metrics_token>)",
                headers={"WWW-Authenticate": 'Bearer realm="extreg-metrics"'},
            )
    return Response(await runtime.metrics.scrape(), media_type=CONTENT_TYPE)


def _digest(token: str) -> bytes:
    """Equal-length values for `compare_digest`, whatever the lengths of the tokens."""
    return hashlib.sha256(token.encode()).digest()
