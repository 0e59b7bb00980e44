"""The embedded default: a real PostgreSQL, started by the `pgserver` package, in `data_dir`.

pgserver shares one server between every process that asks for the same folder and stops it
when the last one exits, so `extreg serve` in one terminal and `extreg list` in another use
the same database without any set-up.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import structlog

from .db.migrate import migrate
from .settings import Settings
from .sources.fixtures import load_fixtures
from .sources.postgres import PostgresSource

log = structlog.get_logger("extreg.embedded")

BOOTSTRAP_ACTOR = "extreg:bootstrap"


def with_database(settings: Settings) -> Settings:
    """`settings` with a database: the configured one, or the embedded server started now."""
    if settings.database_configured or settings.source == "fixtures":
        return settings
    url = start_embedded_postgres(settings.data_dir / "pgdata")
    migrate(url)  # a fresh embedded database is usable by every command, not only serve
    return settings.replace(database_url=url, db_enabled=True)


def start_embedded_postgres(pgdata: Path) -> str:
    with warnings.catch_warnings():  # pgserver warns at import when XDG_RUNTIME_DIR is unset
        warnings.simplefilter("ignore")
        from pgserver.postgres_server import get_server

    pgdata.parent.mkdir(parents=True, exist_ok=True)
    server = get_server(pgdata.resolve(), cleanup_mode="stop")
    return str(server.get_uri())


async def prepare_embedded(settings: Settings) -> None:
    """When the (already migrated) embedded database is empty, load the bundled samples."""
    async with PostgresSource(settings) as db:
        _, _, ids = await db.changes_since(None)
        if ids:
            return
        records = load_fixtures(
            settings.fixtures_dir,
            max_timeout_ms=settings.extension_max_timeout_ms,
            max_retries=settings.extension_max_retries,
        )
        report = await db.import_extensions(records, BOOTSTRAP_ACTOR)
        log.info("sample_fixtures_loaded", created=sorted(report))
