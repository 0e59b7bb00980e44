"""The embedded default: a real PostgreSQL, started by the `pgserver` package, in `data_dir`.

pgserver shares one server between every process that asks for the same folder and stops it
when the last one exits, so `extreg serve` in one terminal, `extreg list` in another and a
script's `Registry.open(Settings())` in a third use the same database without any set-up.
Whichever of them comes first starts it, migrates it and, while it holds no extension, loads
the bundled samples (extensions and routing policies): the embedded default looks the same
from every entry point.
"""

from __future__ import annotations

import asyncio
import warnings
from pathlib import Path

import structlog

from ..adapters.fixtures import read_fixtures
from ..adapters.migrate import migrate
from ..adapters.postgres import PostgresSource
from ..core.policy import PolicyLimits
from ..errors import SourceUnavailable
from ..settings import Settings

log = structlog.get_logger("extreg.local.embedded")

BOOTSTRAP_ACTOR = "extreg:bootstrap"


def uses_embedded(settings: Settings) -> bool:
    """No database configured and not on fixtures: the embedded database is the one."""
    return not settings.database_configured and settings.source != "fixtures"


def with_database(settings: Settings) -> Settings:
    """`settings` with a database: the configured one, or the embedded server, started now,
    migrated and holding the samples when it holds nothing (blocks; see `resolve_database`)."""
    if not uses_embedded(settings):
        return settings
    url = start_embedded_postgres(settings.data_dir / "pgdata")
    migrate(url)  # a fresh embedded database is usable by every command, not only serve
    embedded = settings.replace(database_url=url, db_enabled=True)
    asyncio.run(prepare_embedded(embedded))
    return embedded


async def resolve_database(settings: Settings) -> Settings:
    """`with_database` for async callers: the blocking start runs in a worker thread (which
    also gives `prepare_embedded` an event loop of its own)."""
    if not uses_embedded(settings):
        return settings
    return await asyncio.to_thread(with_database, settings)


def start_embedded_postgres(pgdata: Path) -> str:
    """Start (or join) the embedded server in `pgdata`; its URL. `SourceUnavailable` when it
    cannot start (the reason names the folder, never a password)."""
    with warnings.catch_warnings():  # pgserver warns at import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    try:
        pgdata.parent.mkdir(parents=True, exist_ok=True)
        server = get_server(pgdata.resolve(), cleanup_mode="stop")
    except Exception as exc:  # pgserver raises plain exceptions (and OSError) of many kinds
        raise SourceUnavailable(
            f"the embedded PostgreSQL in {pgdata} would not start: {type(exc).__name__}: {exc}"
        ) from None
    return str(server.get_uri())


async def prepare_embedded(settings: Settings) -> None:
    """When the (already migrated) embedded database is empty, load the bundled samples, their
    extensions and the policies that name them, in one transaction."""
    async with PostgresSource(settings) as db:
        if await db.ids():
            return
        records = await read_fixtures(
            settings.fixtures_dir,
            max_timeout_ms=settings.extension_max_timeout_ms,
            max_retries=settings.extension_max_retries,
            policy_limits=PolicyLimits.from_settings(settings),
        )
        report, policies = await db.import_records(
            records.extensions, records.policies, BOOTSTRAP_ACTOR
        )
        log.info("sample_fixtures_loaded", created=sorted(report), policies=sorted(policies))
