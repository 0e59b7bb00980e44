"""`create_app(runtime)`: the admin API as a FastAPI app, every route of SPEC.md's table.

The app owns no resources: the registry, invoker, tokens and metrics come in the `Runtime`,
opened and closed by whoever runs the app (`extreg serve`, or a test). That keeps one
lifespan for everything (STYLE.md) and lets tests drive the app in-process.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse

from ..auth import SESSION_TTL_S, SessionBook
from ..runtime import Runtime
from . import dashboard, errors, health, operate, policies, probes, records
from .bodies import schema_components
from .bodylimit import BodyLimit, max_body_bytes
from .browser import SecurityHeaders
from .policy_runs import RecentRuns
from .ratelimit import FailedAuthLimiter
from .requestlog import RequestLog
from .security import Viewer, trusted_proxies

TITLE = "extreg admin API"
DESCRIPTION = (
    "Manage and observe the extension registry. Every route but /healthz, /readyz and "
    "/metrics needs `Authorization: Bearer <token>`; roles nest: viewer < operator < admin."
)


def create_app(
    runtime: Runtime,
    *,
    failed_auth_limit: int = 10,
    failed_auth_window_s: float = 60.0,
    session_ttl_s: float = SESSION_TTL_S,
) -> FastAPI:
    """The admin API over `runtime`; wrong credentials are limited per client address, and
    the dashboard's sessions live in this app (this process) for `session_ttl_s`."""
    app = FastAPI(
        title=TITLE,
        description=DESCRIPTION,
        version="1",
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.runtime = runtime
    app.state.auth_limiter = FailedAuthLimiter(failed_auth_limit, failed_auth_window_s)
    app.state.trusted_proxies = trusted_proxies(runtime.settings)
    app.state.sessions = SessionBook(runtime.tokens, session_ttl_s)
    pipeline = getattr(runtime.invoker, "pipeline", None)
    # The dashboard's recent outcomes of each policy: one per pipeline, shared by its apps.
    app.state.policy_runs = RecentRuns() if pipeline is None else RecentRuns.following(pipeline)
    errors.install(app)
    app.add_middleware(BodyLimit, limit=max_body_bytes(runtime.settings))  # 413, before routes
    app.add_middleware(RequestLog)  # outside BodyLimit, so it logs the 413s too
    app.add_middleware(SecurityHeaders)  # outermost: framing headers on every answer
    app.include_router(probes.router)
    app.include_router(dashboard.router)
    app.include_router(operate.router)
    app.include_router(health.router)  # before records: /admin/extensions/health is no id
    app.include_router(records.router)
    app.include_router(policies.router)
    app.openapi = lambda: _openapi(app)  # type: ignore[method-assign]

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request, _: Viewer) -> JSONResponse:
        return JSONResponse(request.app.openapi())

    return app


def _openapi(app: FastAPI) -> dict[str, Any]:
    if app.openapi_schema is None:
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes
        )
        schema.setdefault("components", {}).setdefault("schemas", {}).update(schema_components())
        app.openapi_schema = schema
    return app.openapi_schema
