"""The `extreg` command: thin wrappers over the registry, the database adapter and the server.

Exit status: 0 success, 1 failure (the database is down, say), 2 bad usage or bad input. The
error tree maps to those codes in `main`, once; commands just raise.
"""

from __future__ import annotations

import asyncio
import getpass
import json as jsonlib
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table

from . import logs
from .db.migrate import migrate as run_migrations
from .embedded import with_database
from .errors import (
    ConfigError,
    Conflict,
    ExtensionNotFound,
    ExtregError,
    FixtureError,
    InvalidRecord,
    SnapshotFileError,
)
from .model import Extension, to_plain
from .registry import Registry
from .settings import Settings
from .sources.fixtures import load_fixtures
from .sources.postgres import PostgresSource

T = TypeVar("T")

app = typer.Typer(
    name="extreg",
    help="Extension registry of a message router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
out = Console()
err = Console(stderr=True)

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


class _State:
    overrides: dict[str, Any] = {}
    config: Path | None = None


@app.callback()
def _global(
    config: Annotated[Path | None, typer.Option("--config", help="TOML settings file.")] = None,
    database_url: Annotated[
        str | None, typer.Option("--database-url", help="PostgreSQL URL.", show_default=False)
    ] = None,
    source: Annotated[
        str | None, typer.Option("--source", help="database, fixtures or auto.")
    ] = None,
    fixtures_dir: Annotated[Path | None, typer.Option("--fixtures-dir")] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    logs.configure(log_level)
    _State.config = config
    _State.overrides = {"database_url": database_url, "source": source, "fixtures_dir": fixtures_dir}


def settings() -> Settings:
    return Settings.load(_State.config, **_State.overrides)


def actor() -> str:
    return f"cli:{getpass.getuser()}"


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


def emit_json(data: Any) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.")] = 8080,
) -> None:
    """Run the registry until Ctrl-C, logging what it loaded and every change."""
    from .serve import serve as run_server

    try:
        run(run_server(settings(), host=host, port=port))
    except KeyboardInterrupt:
        pass


# -- database ------------------------------------------------------------------------------


@app.command()
def migrate() -> None:
    """Apply missing schema migrations (safe to run twice, and from two processes)."""
    applied = run_migrations(with_database(settings()).conninfo)
    out.print(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command("import-fixtures")
def import_fixtures(
    folder: Path,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, write nothing.")] = False,
    json: JsonFlag = False,
) -> None:
    """Upsert every record of a fixtures folder into the database, audited, all or nothing."""
    s = with_database(settings())
    records = _fixtures(folder, s)

    async def go() -> dict[str, str]:
        async with PostgresSource(s) as db:
            return await db.import_extensions(records, actor(), dry_run=dry_run)

    report = run(go())
    counts = {k: sorted(i for i, v in report.items() if v == k) for k in ("created", "updated", "unchanged")}
    if json:
        emit_json({"dry_run": dry_run, **counts})
        return
    prefix = "would be " if dry_run else ""
    for kind, ids in counts.items():
        out.print(f"{prefix}{kind}: {len(ids)}" + (f"  ({', '.join(ids)})" if ids else ""))


@app.command()
def export(target: Annotated[str, typer.Argument(help="A folder, or - for standard output.")]) -> None:
    """Write every record as fixtures (one JSON file per extension) or as one list to stdout."""
    records = [to_plain(e, writable_only=True) for e in _load_all(settings())]
    if target == "-":
        sys.stdout.write(jsonlib.dumps(records, indent=2, ensure_ascii=False) + "\n")
        return
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        (folder / f"{record['id']}.json").write_text(
            jsonlib.dumps(record, indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
    err.print(f"exported {len(records)} extensions to {folder}")


@app.command()
def validate(folder: Path, json: JsonFlag = False) -> None:
    """Check a fixtures folder; report every problem and exit 2 if there is one."""
    s = settings()
    try:
        records = load_fixtures(folder, max_timeout_ms=s.extension_max_timeout_ms,
                                max_retries=s.extension_max_retries)
    except FixtureError as exc:
        if json:
            emit_json({"valid": False, "problems": exc.problems})
            raise typer.Exit(2) from None
        raise
    if json:
        emit_json({"valid": True, "count": len(records)})
    else:
        out.print(f"{folder}: {len(records)} extensions, all valid")


# -- reading -------------------------------------------------------------------------------


@app.command("list")
def list_(json: JsonFlag = False) -> None:
    """Every extension, disabled ones too."""
    records = _load_all(settings())
    if json:
        emit_json([to_plain(e) for e in records])
        return
    table = Table("id", "type", "version", "subject", "timeout", "retry", "enabled")
    for e in records:
        table.add_row(e.id, e.type, e.version, e.subject, f"{e.timeout_ms} ms", str(e.retry),
                      "yes" if e.enabled else "[red]no[/red]")
    out.print(table)


@app.command()
def show(extension_id: str, json: JsonFlag = False) -> None:
    """One extension, with its versions and instances."""
    found = [e for e in _load_all(settings()) if e.id == extension_id]
    if not found:
        raise ExtensionNotFound(extension_id)
    data = to_plain(found[0])
    if json:
        emit_json(data)
        return
    table = Table("field", "value", show_header=False)
    for key, value in data.items():
        shown = jsonlib.dumps(value, default=str) if isinstance(value, dict | list) else str(value)
        table.add_row(key, shown)
    out.print(table)


@app.command()
def status(json: JsonFlag = False) -> None:
    """Which source serves, how many records, and how fresh they are."""

    async def go() -> dict[str, Any]:
        async with Registry.open(with_database(settings())) as reg:
            return reg.status.as_dict()

    data = run(go())
    if json:
        emit_json(data)
        return
    table = Table("field", "value", show_header=False)
    for key, value in data.items():
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


# -- writing -------------------------------------------------------------------------------


@app.command()
def enable(extension_id: str) -> None:
    """Enable an extension (audited); every running registry picks it up by notification."""
    _set_enabled(extension_id, True)


@app.command()
def disable(extension_id: str) -> None:
    """Disable an extension (audited); every running registry picks it up by notification."""
    _set_enabled(extension_id, False)


@app.command()
def reload() -> None:
    """Ask every running registry on this database for a full reload."""
    s = _database_settings()

    async def go() -> None:
        async with PostgresSource(s) as db:
            await db.request_reload()

    run(go())
    out.print("reload requested")


# -- helpers -------------------------------------------------------------------------------


def _set_enabled(extension_id: str, enabled: bool) -> None:
    s = _database_settings()

    async def go() -> bool:
        async with PostgresSource(s) as db:
            return await db.set_enabled(extension_id, enabled, actor())

    if not run(go()):
        raise ExtensionNotFound(extension_id)
    out.print(f"{extension_id} {'enabled' if enabled else 'disabled'}")


def _database_settings() -> Settings:
    s = with_database(settings())
    if s.source == "fixtures":
        raise Conflict("source is 'fixtures': fixtures are read-only, edit the files instead")
    return s


def _load_all(s: Settings) -> list[Extension]:
    async def go() -> list[Extension]:
        async with Registry.open(with_database(s)) as reg:
            return reg.all()

    return run(go())


def _fixtures(folder: Path, s: Settings) -> list[Extension]:
    return load_fixtures(folder, max_timeout_ms=s.extension_max_timeout_ms,
                         max_retries=s.extension_max_retries)


BAD_INPUT = (ConfigError, FixtureError, InvalidRecord, SnapshotFileError, ExtensionNotFound, Conflict)


def main() -> None:
    """Entry point: click handles usage errors (exit 2); our error tree maps to 1 or 2 here."""
    try:
        app()
    except BAD_INPUT as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        sys.exit(2)
    except ExtregError as exc:
        err.print(f"[red]error:[/red] {exc}", markup=True, highlight=False)
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
