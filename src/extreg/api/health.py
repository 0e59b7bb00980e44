"""Health of every extension (`GET /admin/extensions/health`) and of one, in the contract's
shape: from this process's invoker when it runs; else from the numbers every node wrote to
the database; else (fixtures, or the database away) every extension reads as new (its circuit
`closed`, or `disabled` when breakers are off in the settings). And the charts' series
(`.../health/series`), from the database when health is persisted there (see
`extreg.health_view`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse

from ..core.health import HealthMonitor
from ..errors import Conflict, ExtensionNotFound, SourceUnavailable
from ..health_view import database_monitor, extension_health, health_report, health_series
from ..runtime import Runtime
from .requestlog import bind_extension_id
from .security import Viewer
from .state import runtime_of

router = APIRouter(
    prefix="/admin/extensions", tags=["health"], dependencies=[Depends(bind_extension_id)]
)


def _live(runtime: Runtime) -> HealthMonitor | None:
    """This process's invoker's monitor, when an invoker runs."""
    live: HealthMonitor | None = getattr(runtime.invoker, "health", None)
    return live


async def _monitor(runtime: Runtime, ids: list[str] | None = None) -> HealthMonitor | None:
    """The invoker's monitor, or one holding the database's numbers of `ids`, or None."""
    live = _live(runtime)
    if live is not None:
        return live
    try:
        return await database_monitor(runtime.registry.database, runtime.settings, ids)
    except (Conflict, SourceUnavailable):
        return None


@router.get("/health")
async def all_health(request: Request, _: Viewer) -> JSONResponse:
    """Every extension's health, and the summary bar."""
    runtime = runtime_of(request)
    return JSONResponse(
        health_report(
            runtime.registry.all(),
            await _monitor(runtime),
            breaker_enabled=runtime.settings.circuit_breaker_enabled,
        )
    )


@router.get("/{extension_id}/health", responses={404: {"description": "No such extension."}})
async def one_health(extension_id: str, request: Request, _: Viewer) -> JSONResponse:
    runtime = runtime_of(request)
    ext = runtime.registry.get(extension_id)
    if ext is None:
        raise ExtensionNotFound(extension_id)
    return JSONResponse(
        extension_health(
            ext,
            await _monitor(runtime, [extension_id]),
            breaker_enabled=runtime.settings.circuit_breaker_enabled,
        )
    )


Minutes = Annotated[int, Query(ge=1, le=360, description="How far back: 1 to 360 minutes.")]


@router.get("/health/series")
async def all_series(request: Request, _: Viewer, minutes: Minutes = 15) -> JSONResponse:
    """Every extension's calls per interval, summed: what the dashboard charts first."""
    runtime = runtime_of(request)
    return JSONResponse(await health_series(None, minutes, _live(runtime), runtime.registry))


@router.get("/{extension_id}/health/series", responses={404: {"description": "No such extension."}})
async def one_series(
    extension_id: str, request: Request, _: Viewer, minutes: Minutes = 15
) -> JSONResponse:
    """One extension's calls, failures and p50/p95/p99 per interval, oldest first, with its
    circuit transitions, enables and disables."""
    runtime = runtime_of(request)
    if runtime.registry.get(extension_id) is None:
        raise ExtensionNotFound(extension_id)
    answer = await health_series(extension_id, minutes, _live(runtime), runtime.registry)
    return JSONResponse(answer)
