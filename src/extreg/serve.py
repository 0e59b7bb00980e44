"""`extreg serve`: one lifespan that owns every resource of the running registry."""

from __future__ import annotations

import asyncio
import signal

import structlog

from .api.server import serve_api
from .embedded import prepare_embedded, with_database
from .errors import SourceUnavailable
from .registry import Registry
from .runtime import Runtime
from .settings import Settings
from .tokens import TokenStore, ensure_admin_token

log = structlog.get_logger("extreg.serve")


async def serve(settings: Settings, *, host: str, port: int) -> None:
    """Start the embedded database when none is configured, then serve until stopped."""
    embedded = not settings.database_configured and settings.source != "fixtures"
    settings = with_database(settings)
    if embedded:
        await prepare_embedded(settings)
        log.info("embedded_database", data_dir=str(settings.data_dir.resolve()))
    elif settings.database_configured:
        await _migrate_if_reachable(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    admin_token = await _first_admin_token(settings) if embedded else None
    async with Registry.open(settings) as registry, Runtime.open(settings, registry) as runtime:
        log.info("serving", **registry.status.as_dict())
        await serve_api(runtime, host, port, stop, admin_token=admin_token)
        log.info("stopping")


async def _first_admin_token(settings: Settings) -> str | None:
    """The embedded default's admin token, created on its first start only."""
    return await ensure_admin_token(TokenStore.from_settings(settings))


async def _migrate_if_reachable(settings: Settings) -> None:
    from .db.migrate import migrate

    try:
        applied = await asyncio.to_thread(migrate, settings.conninfo)
    except SourceUnavailable as exc:
        log.warning("migrate_skipped", error=str(exc))
        return
    if applied:
        log.info("migrated", applied=applied)
