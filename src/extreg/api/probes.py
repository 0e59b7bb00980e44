"""The open endpoints: liveness, readiness and Prometheus metrics (no token needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse

from ..metrics import CONTENT_TYPE
from .state import runtime_of

router = APIRouter(tags=["probes"])


@router.get("/healthz")
async def healthz() -> JSONResponse:
    """The process is alive and answering."""
    return JSONResponse({"status": "ok"})


@router.get("/readyz", responses={503: {"description": "The registry has not loaded yet."}})
async def readyz(request: Request) -> JSONResponse:
    """200 once the registry has loaded (from any source), with its status; 503 before."""
    status = runtime_of(request).registry.status
    ready = status.generation > 0
    return JSONResponse({"ready": ready, "status": status.as_dict()},
                        status_code=200 if ready else 503)


@router.get("/metrics", response_class=Response,
            responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text."}})
async def metrics(request: Request) -> Response:
    return Response(runtime_of(request).metrics.render(), media_type=CONTENT_TYPE)
