"""`extreg serve`: one lifespan that owns every resource of the running registry."""

from __future__ import annotations

import asyncio
import signal

import structlog

from .embedded import prepare_embedded, with_database
from .errors import SourceUnavailable
from .registry import Registry
from .settings import Settings

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
    async with Registry.open(settings) as registry:
        log.info("serving", **registry.status.as_dict())
        await stop.wait()
        log.info("stopping")


async def _migrate_if_reachable(settings: Settings) -> None:
    from .db.migrate import migrate

    try:
        applied = await asyncio.to_thread(migrate, settings.conninfo)
    except SourceUnavailable as exc:
        log.warning("migrate_skipped", error=str(exc))
        return
    if applied:
        log.info("migrated", applied=applied)
