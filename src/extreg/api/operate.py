"""Operating the registry: status, reload, the audit log, circuits and test invocations.

Circuit and invoke need this process's invoker (NATS); without one they answer 503 saying so.
"""

from __future__ import annotations

import time
import uuid
from datetime import datetime
from typing import Annotated, Any, Literal

import structlog
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import tracing
from ..errors import ConfigError, Conflict, ExtensionNotFound, NatsUnavailable
from ..registry import Registry
from .bodies import strict_body
from .requestlog import bind_extension_id
from .security import Operator, Viewer
from .state import runtime_of

log = structlog.get_logger("extreg.api")

NO_INVOKER = "{what} unavailable: this server runs without an invoker (no NATS connection)"

router = APIRouter(prefix="/admin", tags=["operations"], dependencies=[Depends(bind_extension_id)])
StrictBody = Annotated[None, Depends(strict_body)]  # after the token check: a parameter


class CircuitAction(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["open", "close", "reset"] = Field(
        description="open: force open until closed; close or reset: a fresh closed circuit."
    )


class Invocation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    payload: Any = Field(default_factory=dict, description="The request payload.")
    metadata: dict[str, Any] = Field(default_factory=dict)
    tenant_id: str | None = Field(None, max_length=255)
    trace_id: str | None = Field(None, max_length=255)


@router.get("/status")
async def status(request: Request, _: Viewer) -> JSONResponse:
    """Which source serves, how many records, how fresh; and whether an invoker runs."""
    runtime = runtime_of(request)
    status = runtime.registry.status.as_dict()
    return JSONResponse(
        {
            **status,
            "invoker": runtime.invoker is not None,
            "nats_url": runtime.settings.nats_display,
        }
    )


@router.post("/reload")
async def reload(request: Request, principal: Operator) -> JSONResponse:
    """Reload this registry from its source, and ask every other one on the database to."""
    registry = runtime_of(request).registry
    report = await registry.reload()
    db = _database_or_none(registry)
    if db is not None:
        await db.request_reload()
    log.info("reloaded_by_request", count=report.count, duration_ms=report.duration_ms)
    return JSONResponse(report.as_dict())


@router.get("/audit")
async def audit(
    request: Request,
    _: Viewer,
    extension_id: str | None = None,
    policy_id: str | None = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> JSONResponse:
    """Audit rows, newest first: of one extension (`extension_id`: its own actions only, not
    a same-named policy's), of one policy (`policy_id`: its `policy_*` rows), or of all (each
    row's `action` says which kind)."""
    db = _database_or_none(runtime_of(request).registry)
    if db is None:
        raise Conflict("the registry is serving fixtures, which have no audit log")
    if extension_id and policy_id:
        raise ConfigError("extension_id and policy_id: give one of them, not both")
    if "\x00" in (extension_id or "") + (policy_id or ""):
        return JSONResponse([])  # no row can hold a NUL (PostgreSQL cannot store one)
    rows = await db.audit_trail(extension_id, limit, policy_id=policy_id)
    return JSONResponse([{k: _plain(v) for k, v in row.items()} for row in rows])


@router.post(
    "/extensions/{extension_id}/circuit",
    responses={
        409: {
            "description": "Circuit breakers are disabled (circuit_breaker_enabled is false): "
            "nothing would enforce a forced state; the detail says how to enable "
            "them."
        }
    },
)
async def circuit(
    extension_id: str,
    body: CircuitAction,
    request: Request,
    _: Operator,
    __: StrictBody,
) -> JSONResponse:
    """Force a circuit open, close it, or reset it to a fresh closed one (409 `Conflict` when
    breakers are off: see `CircuitBreakers.force_open`)."""
    runtime = runtime_of(request)
    _known(runtime.registry, extension_id)
    breaker = _invoker(request, "circuit breakers are").breaker
    actions = {"open": breaker.force_open, "close": breaker.force_close, "reset": breaker.reset}
    state = actions[body.action](extension_id)
    log.info("circuit_forced", extension_id=extension_id, action=body.action, state=state)
    return JSONResponse({"id": extension_id, "circuit_breaker_state": state})


@router.post("/extensions/{extension_id}/invoke")
async def invoke(
    extension_id: str,
    body: Invocation,
    request: Request,
    _: Operator,
    __: StrictBody,
) -> JSONResponse:
    """Call the extension once, as the router would, and return its reply."""
    runtime = runtime_of(request)
    _known(runtime.registry, extension_id)
    invoker = _invoker(request, "invocation is")
    with tracing.continued(request.headers):
        trace_id = body.trace_id or tracing.trace_id_hex() or uuid.uuid4().hex
        context = {"trace_id": trace_id, "tenant_id": body.tenant_id}
        structlog.contextvars.bind_contextvars(extension_id=extension_id, trace_id=trace_id)
        started = time.perf_counter()
        reply = await invoker.invoke(
            extension_id, {"payload": body.payload, "metadata": body.metadata}, context
        )
    duration_ms = round((time.perf_counter() - started) * 1000, 2)
    log.info("invoked_by_request", duration_ms=duration_ms)
    return JSONResponse(
        {
            "extension_id": extension_id,
            "trace_id": trace_id,
            "duration_ms": duration_ms,
            "reply": reply,
        }
    )


def _known(registry: Registry, extension_id: str) -> None:
    if registry.get(extension_id) is None:
        raise ExtensionNotFound(extension_id)


def _invoker(request: Request, what: str) -> Any:
    invoker = runtime_of(request).invoker
    if invoker is None:
        raise NatsUnavailable(NO_INVOKER.format(what=what))  # 503, `error` names it
    return invoker


def _database_or_none(registry: Registry) -> Any:
    try:
        return registry.database
    except Conflict:
        return None


def _plain(value: Any) -> Any:
    return value.isoformat() if isinstance(value, datetime) else value
