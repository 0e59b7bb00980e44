"""Health of every extension (`GET /admin/extensions/health`) and of one, in the contract's
shape: from this process's invoker when it runs, else every extension reads as new (its
circuit `closed`, or `disabled` when breakers are off in the settings)."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..errors import ExtensionNotFound
from ..health_view import extension_health, health_report
from .requestlog import bind_extension_id
from .security import Viewer
from .state import runtime_of

router = APIRouter(
    prefix="/admin/extensions", tags=["health"], dependencies=[Depends(bind_extension_id)]
)


@router.get("/health")
async def all_health(request: Request, _: Viewer) -> JSONResponse:
    """Every extension's health, and the summary bar."""
    runtime = runtime_of(request)
    monitor = getattr(runtime.invoker, "health", None)
    return JSONResponse(
        health_report(
            runtime.registry.all(),
            monitor,
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
            getattr(runtime.invoker, "health", None),
            breaker_enabled=runtime.settings.circuit_breaker_enabled,
        )
    )
