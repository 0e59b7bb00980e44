"""The `extreg` command: thin wrappers over the registry, the database adapter and the server.

What a command reports goes to stdout: with --json one JSON document (every command that prints
anything takes it; not `serve` and `sample-extensions`, which run until Ctrl-C), else text.
Tables are rich tables in a terminal and tab-separated lines otherwise (`Rows`), so a pipe
gets every cell whole. stderr holds errors and warnings only: log lines below warning need
`-v` (`serve` logs at info).

Exit status: 0 success, 1 failure (the database is down, say), 2 bad usage or bad input. The
error tree maps to those codes once, in `report_error`, which every command's `invoke` calls
(`_Extreg`): with --json the error goes to stdout as the API's error answer, else to stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json as jsonlib
import sys
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text
from typer.core import TyperArgument, TyperCommand, TyperGroup, TyperOption

from . import logs
from .adapters.fixtures import POLICIES_FOLDER, FixtureSet, load_fixtures
from .adapters.migrate import migrate as run_migrations
from .adapters.postgres import PostgresSource
from .client import ApiClient
from .core import strictjson
from .core.model import DATABASE_KEPT, Extension, to_plain
from .core.policy import PolicyLimits, policy_to_plain
from .errors import (
    ConfigError,
    Conflict,
    ExtensionError,
    ExtensionNotFound,
    ExtregError,
    FixtureError,
    InvalidRecord,
    PolicyNotFound,
    SnapshotFileError,
    StrictJSONError,
)
from .local.embedded import with_database
from .registry import Registry
from .settings import Settings
from .tokens import TokenStore

if TYPE_CHECKING:
    from .adapters.nats_services import DiscoveredEndpoint
    from .api.operate import Invocation

T = TypeVar("T")

# What exits 2 (bad input); every other error of the tree exits 1.
BAD_INPUT = (
    ConfigError,
    FixtureError,
    InvalidRecord,
    SnapshotFileError,
    ExtensionNotFound,
    PolicyNotFound,
    Conflict,
)
# Log levels by the count of -v; `serve` never logs below info.
VERBOSITY = ("warning", "info", "debug")

# No markup, emoji codes or wrapping: records and errors carry user text, which must print as
# it is ("[...]" and ":x:" included), and a long line stays one line for a script.
out = Console(markup=False, highlight=False, emoji=False, soft_wrap=True)
err = Console(stderr=True, markup=False, highlight=False, emoji=False, soft_wrap=True)
ERROR = Text("error: ", style="red")
# What an upsert of a record reports (import-fixtures, policy apply, enable, disable); not a
# policy run's outcomes, which are `extreg.invoke.pipeline.OUTCOMES`.
WRITE_OUTCOMES = ("created", "updated", "unchanged")


# -- command classes: help that names values, errors reported in one place ------------------


class _Argument(TyperArgument):
    """An argument whose help shows its metavar (ID, DIR) alone: typer would add the Python
    type beside it (`ID <str>`), which tells a user nothing."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None


class _Option(TyperOption):
    """An option whose help shows its metavar (URL, N), and nothing beside a flag, where
    typer would print `<bool>` as if it took a value."""

    def display_type_rich(self, ctx: Any) -> str | None:
        return None if self.is_flag or self.count else super().display_type_rich(ctx)


def _plain_help(param: Any) -> None:
    """`param` shown as `_Argument` or `_Option` show it (typer builds its parameters itself,
    so their class is changed once the command holds them)."""
    param.__class__ = _Argument if isinstance(param, TyperArgument) else _Option


if TYPE_CHECKING:
    _Base = TyperCommand
else:
    _Base = object


class _Extreg(_Base):
    """What every `extreg` command and group shares (`Command`, `Group`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for param in self.params:
            _plain_help(param)

    def get_help_option(self, ctx: Any) -> Any:
        option = super().get_help_option(ctx)
        if option is not None:
            _plain_help(option)
        return option

    def parse_args(self, ctx: Any, args: list[str]) -> list[str]:
        """Bad usage with --json on the line is answered as JSON too (a `ConfigError`), so a
        script never has to parse click's usage text; without it click says it as usual."""
        as_json = "--json" in args  # before click parses them: it empties the list
        try:
            rest: list[str] = super().parse_args(ctx, args)
        except typer.TyperException as exc:
            if not as_json:
                raise
            code = report_error(ConfigError(exc.format_message()), as_json=True)
            raise typer.Exit(code) from None
        return rest

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except ExtregError as exc:
            raise typer.Exit(report_error(exc, as_json=bool(ctx.params.get("json")))) from None


class Command(_Extreg, TyperCommand):
    """An `extreg` command (`app.command(cls=Command)`)."""


class Group(_Extreg, TyperGroup):
    """The `extreg` app and its sub-apps (`typer.Typer(cls=Group)`)."""


def report_error(exc: ExtregError, *, as_json: bool) -> int:
    """Say what went wrong and give the exit status: 2 for bad input (`BAD_INPUT`), else 1.

    With --json the API's error answer for it (`api.errors.body_of`: `error`, `detail` and the
    class's own fields) on stdout, so a script reads one JSON document either way; else one
    `error:` line on stderr (an extension error with its attempts)."""
    if as_json:
        from .api.errors import body_of

        emit_json(body_of(exc))
    else:
        attempts = exc.attempts if isinstance(exc, ExtensionError) else 0
        err.print(ERROR, str(exc), f" (attempts: {attempts})" if attempts else "", sep="")
    return 2 if isinstance(exc, BAD_INPUT) else 1


# -- what commands print -------------------------------------------------------------------

Cell = str | Text


@dataclass(frozen=True, slots=True)
class Rows:
    """A table as a command prints it (`render`): a rich table in a terminal; else
    tab-separated lines, the header first when it has one, for `cut -f` and `awk -F'\\t'`."""

    columns: Sequence[str]
    rows: Sequence[Sequence[Cell]]
    header: bool = True


Shown = str | Rows


def emit(json: bool, data: Any, *text: Shown) -> None:
    """What a command prints on success: `data` as JSON with --json, else `text`."""
    if json:
        emit_json(data)
        return
    for part in text:
        render(out, part)


def emit_json(data: Any) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")


def render(console: Console, part: Shown) -> None:
    """One line of text, or a table (see `Rows`), on `console`."""
    if isinstance(part, str):
        console.print(part)
    elif console.is_terminal:
        table = Table(*part.columns, show_header=part.header)
        for row in part.rows:
            table.add_row(*row)
        console.print(table)
    else:
        lines = [part.columns] if part.header else []
        for line in [*lines, *part.rows]:
            console.file.write("\t".join(_cell(c) for c in line) + "\n")
        console.file.flush()


def _cell(cell: Cell) -> str:
    """A cell as one tab-free line of plain text."""
    return " ".join(str(cell).replace("\t", " ").splitlines())


def json_object(text: str, option: str) -> dict[str, Any]:
    """An option's JSON object, decoded as strictly as the API decodes a body (no NaN, no
    key given twice: `core.strictjson`)."""
    try:
        data = strictjson.loads(text)
    except StrictJSONError as exc:
        raise ConfigError(f"{option} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{option} must be a JSON object")
    return data


# -- the app and its shared parameters -------------------------------------------------------

app = typer.Typer(
    name="extreg",
    help="Extension registry of a message router.",
    cls=Group,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

JsonFlag = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON document on stdout; an error too, as the API answers it."
    ),
]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="EXTREG_URL",
        metavar="URL",
        show_default=False,
        show_envvar=True,
        help="Act through the extreg server at this URL (else directly on the database).",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="EXTREG_TOKEN",
        metavar="TOKEN",
        show_default=False,
        show_envvar=True,
        help="API token for --url (never printed).",
    ),
]
ExtensionId = Annotated[str, typer.Argument(metavar="ID", help="The extension's id.")]
OneOrAll = Annotated[
    str | None,
    typer.Argument(metavar="ID", show_default=False, help="One extension; all if omitted."),
]
FixturesDir = Annotated[Path, typer.Argument(metavar="DIR", help="A fixtures folder.")]


@dataclass(frozen=True, slots=True)
class Options:
    """The global options of this invocation, kept in typer's context (`ctx.obj`) for the
    commands to read: no state outlives the invocation."""

    config: Path | None
    overrides: dict[str, Any]

    def settings(self) -> Settings:
        return Settings.load(self.config, **self.overrides)


@app.callback()
def _global(
    ctx: typer.Context,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            metavar="FILE",
            show_default=False,
            help="TOML settings file (keys in its extension_registry table).",
        ),
    ] = None,
    database_url: Annotated[
        str | None,
        typer.Option("--database-url", metavar="URL", show_default=False, help="PostgreSQL URL."),
    ] = None,
    source: Annotated[
        str | None,
        typer.Option(
            "--source",
            metavar="MODE",
            show_default=False,
            help="Where records come from: database, fixtures or auto.",
        ),
    ] = None,
    fixtures_dir: Annotated[
        Path | None,
        typer.Option(
            "--fixtures-dir",
            metavar="DIR",
            show_default=False,
            help="The fixtures folder (source fixtures, and the fallback of auto).",
        ),
    ] = None,
    verbose: Annotated[
        int,
        typer.Option(
            "-v",
            "--verbose",
            count=True,
            show_default=False,
            help="Log to stderr: -v info, -vv debug (else warnings and errors only; serve"
            " logs info).",
        ),
    ] = 0,
) -> None:
    logs.configure(log_level(verbose, serving=ctx.invoked_subcommand in SERVERS))
    ctx.obj = Options(
        config, {"database_url": database_url, "source": source, "fixtures_dir": fixtures_dir}
    )


SERVERS = ("serve", "sample-extensions")  # the commands that run until Ctrl-C


def log_level(verbose: int, *, serving: bool) -> str:
    """The level of this invocation: a command that exits logs warnings only unless -v, so
    a script's stderr holds what went wrong; a server logs what it loads and changes."""
    return VERBOSITY[min(max(verbose, 1 if serving else 0), len(VERBOSITY) - 1)]


def settings(ctx: typer.Context) -> Settings:
    """The settings of this invocation: file, environment and the global options."""
    options: Options = ctx.find_root().obj
    return options.settings()


def actor() -> str:
    return f"cli:{getpass.getuser()}"


def on_database(s: Settings, use: Callable[[PostgresSource], Awaitable[T]]) -> T:
    """The frame of every command that works on the database: open it (the embedded one
    when no database is configured), run `use` on it, close it."""

    resolved = with_database(s)  # outside the loop: starting the embedded one runs its own

    async def go() -> T:
        async with PostgresSource(resolved) as db:
            return await use(db)

    return asyncio.run(go())


def on_registry(s: Settings, use: Callable[[Registry], Awaitable[T]]) -> T:
    """Like `on_database` for a command that reads through a registry (which falls back to
    fixtures or the snapshot file, as a server would)."""

    resolved = with_database(s)  # outside the loop: starting the embedded one runs its own

    async def go() -> T:
        async with Registry.open(resolved) as reg:
            return await use(reg)

    return asyncio.run(go())


@app.command(cls=Command)
def serve(
    ctx: typer.Context,
    host: Annotated[
        str, typer.Option("--host", metavar="HOST", help="Address to bind.")
    ] = "127.0.0.1",
    port: Annotated[
        int, typer.Option("--port", metavar="N", help="Port to bind.", min=1, max=65535)
    ] = 8080,
    demo: Annotated[
        bool,
        typer.Option(
            "--demo", help="Also run an embedded NATS server, the sample extensions and traffic."
        ),
    ] = False,
) -> None:
    """Run the registry until Ctrl-C, logging what it loaded and every change."""
    from .serve import serve as run_server

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run_server(settings(ctx), host=host, port=port, demo=demo))


# -- database ------------------------------------------------------------------------------


@app.command(cls=Command)
def migrate(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Apply missing schema migrations (safe to run twice, and from two processes)."""
    applied = run_migrations(with_database(settings(ctx)).conninfo)
    text = f"applied: {', '.join(applied)}" if applied else "database is up to date"
    emit(json, {"applied": applied}, text)


@app.command("import-fixtures", cls=Command)
def import_fixtures(
    ctx: typer.Context,
    folder: FixturesDir,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, write nothing.")] = False,
    json: JsonFlag = False,
) -> None:
    """Upsert every record of a fixtures folder into the database, audited, then its policies.

    The whole folder is checked first (policies against its extensions), so a folder with any
    problem writes nothing; extensions and policies are then written in one transaction."""
    s = settings(ctx)
    found = _fixtures(folder, s)

    extensions, policies = on_database(
        s,
        lambda db: db.import_records(found.extensions, found.policies, actor(), dry_run=dry_run),
    )
    counts, policy_counts = by_outcome(extensions), by_outcome(policies)
    prefix = "would be " if dry_run else ""
    shown = [("", counts), ("policies ", policy_counts)] if found.policies else [("", counts)]
    lines = [
        f"{noun}{prefix}{kind}: {len(ids)}" + (f"  ({', '.join(ids)})" if ids else "")
        for noun, by_kind in shown
        for kind, ids in by_kind.items()
    ]
    emit(json, {"dry_run": dry_run, **counts, "policies": policy_counts}, *lines)


@app.command(cls=Command)
def export(
    ctx: typer.Context,
    target: Annotated[
        str, typer.Argument(metavar="DIR|-", help="A folder, or - for standard output.")
    ],
    json: JsonFlag = False,
) -> None:
    """Write every record as fixtures: DIR/<id>.json per extension and DIR/policies/<id>.json
    per policy, which `import-fixtures DIR` reads back; or, with -, one JSON object
    {"extensions": [...], "policies": [...]} to standard output (with or without --json)."""
    found = on_registry(settings(ctx), _everything)
    records = [to_plain(e, writable_only=True) for e in found.extensions]
    policies = [policy_to_plain(p, writable_only=True) for p in found.policies]
    if target == "-":
        document = {"extensions": records, "policies": policies}
        sys.stdout.write(jsonlib.dumps(document, indent=2, ensure_ascii=False) + "\n")
        return
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    for record in records:
        _write_json(folder / f"{record['id']}.json", record)
    if policies:
        (folder / POLICIES_FOLDER).mkdir(exist_ok=True)
    for policy in policies:
        _write_json(folder / POLICIES_FOLDER / f"{policy['policy_id']}.json", policy)
    report = {
        "folder": str(folder),
        "extensions": [r["id"] for r in records],
        "policies": [p["policy_id"] for p in policies],
    }
    emit(
        json, report, f"exported {len(records)} extensions and {len(policies)} policies to {folder}"
    )


@app.command(cls=Command)
def validate(ctx: typer.Context, folder: FixturesDir, json: JsonFlag = False) -> None:
    """Check a fixtures folder; report every problem and exit 2 if there is one."""
    try:
        found = _fixtures(folder, settings(ctx))
    except FixtureError as exc:
        if json:
            emit_json({"valid": False, "problems": exc.problems})
            raise typer.Exit(2) from None
        raise
    emit(
        json,
        {"valid": True, "count": len(found.extensions), "policies": len(found.policies)},
        f"{folder}: {len(found.extensions)} extensions and {len(found.policies)} policies,"
        " all valid",
    )


# -- reading -------------------------------------------------------------------------------


@app.command("list", cls=Command)
def list_(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Every extension, disabled ones too."""
    records = _load_all(settings(ctx))
    rows = [
        (
            e.id,
            e.type,
            e.version,
            e.subject,
            f"{e.timeout_ms} ms",
            str(e.retry),
            "yes" if e.enabled else Text("no", style="red"),
        )
        for e in records
    ]
    columns = ("id", "type", "version", "subject", "timeout", "retry", "enabled")
    emit(json, [to_plain(e) for e in records], Rows(columns, rows))


@app.command(cls=Command)
def show(ctx: typer.Context, extension_id: ExtensionId, json: JsonFlag = False) -> None:
    """One extension, with its versions and instances."""
    found = [e for e in _load_all(settings(ctx)) if e.id == extension_id]
    if not found:
        raise ExtensionNotFound(extension_id)
    data = to_plain(found[0])
    emit(json, data, fields_table(data))


@app.command(cls=Command)
def versions(ctx: typer.Context, extension_id: ExtensionId, json: JsonFlag = False) -> None:
    """An extension's versions in the order calls try them (newest first; a disabled one is
    skipped), with their rules and percent split, then its own row: the fallback.

    --json prints {"id", "enabled", "versions": [{"version", "enabled", "subject",
    "routing_rules", "percent", "hash_on", "fallback"}]}: percent and hash_on (the context
    keys hashed, the first one present counting) are null without a percent rule."""
    from .core.routing import routing_report

    found = [e for e in _load_all(settings(ctx)) if e.id == extension_id]
    if not found:
        raise ExtensionNotFound(extension_id)
    report = routing_report(found[0])
    columns = ("version", "enabled", "subject", "routing_rules", "percent", "hash_on")
    emit(json, report, Rows(columns, [_plan_row(item) for item in report["versions"]]))


def _plan_row(item: dict[str, Any]) -> tuple[Cell, ...]:
    """One item of `routing_plan` as a row of `extreg versions`."""
    rules = "fallback: the extension's own row" if item["fallback"] else item["routing_rules"]
    return (
        item["version"],
        "yes" if item["enabled"] else Text("no", style="red"),
        item["subject"],
        _value(rules),
        "" if item["percent"] is None else f"{item['percent']}%",
        ", else ".join(item["hash_on"] or ()),
    )


@app.command(cls=Command)
def status(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Which source serves, how many records, and how fresh they are."""
    s = settings(ctx)

    async def read(reg: Registry) -> dict[str, Any]:
        return {**reg.status.as_dict(), "nats_url": s.nats_display}

    data = on_registry(s, read)
    emit(json, data, fields_table(data))


# -- writing -------------------------------------------------------------------------------


@app.command(cls=Command)
def enable(
    ctx: typer.Context,
    extension_id: ExtensionId,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Enable an extension (audited); every running registry picks it up by notification.

    Enabling an enabled one changes nothing and says so ("already enabled", outcome
    "unchanged")."""
    _set_enabled(ctx, extension_id, True, url, token, json)


@app.command(cls=Command)
def disable(
    ctx: typer.Context,
    extension_id: ExtensionId,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Disable an extension (audited); every running registry picks it up by notification.

    Disabling a disabled one changes nothing and says so ("already disabled", outcome
    "unchanged")."""
    _set_enabled(ctx, extension_id, False, url, token, json)


@app.command(cls=Command)
def reload(
    ctx: typer.Context, url: UrlOption = None, token: TokenOption = None, json: JsonFlag = False
) -> None:
    """Ask every running registry on this database for a full reload.

    With --url the server reloads first and reports what it loaded (its JSON: count, source...);
    without, the request is made on the database ({"requested": true})."""
    if url:
        with ApiClient(url, token) as api:
            report = api.reload()
        emit(json, report, f"reloaded: {report['count']} extensions from {report['source']}")
        return
    on_database(_database_settings(ctx), lambda db: db.request_reload())
    emit(json, {"requested": True}, "reload requested")


# -- operating: health, audit, invoke (directly, or through a server with --url) -------------


@app.command(cls=Command)
def health(
    ctx: typer.Context,
    extension_id: OneOrAll = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Health of every extension (or one): calls, success rate, latency, circuit state.

    --json prints the API's health answer as it comes (all: {"extensions", "summary"}; one:
    that extension's item)."""
    if url:
        with ApiClient(url, token) as api:
            answer = api.health(extension_id)
        report: dict[str, Any] = answer if extension_id is None else {"extensions": [answer]}
    else:
        report = _health_from_database(ctx, extension_id)
    summary = report.get("summary")
    emit(
        json,
        report if extension_id is None else report["extensions"][0],
        health_table(report["extensions"]),
        *([" ".join(f"{k}={v}" for k, v in summary.items())] if summary else []),
    )


@app.command(cls=Command)
def audit(
    ctx: typer.Context,
    extension_id: OneOrAll = None,
    policy: Annotated[
        str | None,
        typer.Option(
            "--policy", metavar="ID", show_default=False, help="One policy's rows instead."
        ),
    ] = None,
    limit: Annotated[
        int, typer.Option("--limit", metavar="N", min=1, max=1000, help="At most N rows.")
    ] = 50,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """The audit log, newest first: who changed what, and when.

    An extension's trail holds its own rows only, a policy's (--policy) its policy_* rows,
    even where the two share an id; without either, every row of both kinds."""
    if extension_id is not None and policy is not None:
        raise ConfigError("give an extension id or --policy, not both")
    if url:
        with ApiClient(url, token) as api:
            rows = api.audit(extension_id, limit, policy_id=policy)
    else:
        rows = _audit_from_database(ctx, extension_id, policy, limit)
    table = [
        (
            str(row["changed_at"]),
            row["extension_id"],
            row["action"],
            row["changed_by"] or "",
            ", ".join(_changed_fields(row)),
        )
        for row in rows
    ]
    emit(json, rows, Rows(("changed_at", "id", "action", "changed_by", "fields"), table))


@app.command(cls=Command)
def invoke(
    ctx: typer.Context,
    extension_id: ExtensionId,
    payload: Annotated[
        str,
        typer.Option(
            "--payload",
            metavar="JSON",
            help="The request body, exactly as POST /admin/extensions/{id}/invoke takes it:"
            ' {"payload": ..., "metadata": {...}} (tenant_id and trace_id too), strict JSON'
            " (no NaN, no key twice) checked by the API's own model; an unknown or wrong"
            " field is refused, naming it.",
        ),
    ] = "{}",
    tenant: Annotated[
        str | None,
        typer.Option(
            "--tenant",
            metavar="TENANT",
            show_default=False,
            help="The call's tenant_id (instead of the body's).",
        ),
    ] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Call an extension once, as the router would, and print its JSON reply.

    The extension receives the body's payload and metadata, as from the API and the
    dashboard. Without --url the call is made from here, on the nats_url setting; its health
    is saved. A failed call exits 1 with the reason and the attempts made.
    """
    body = invocation(payload, tenant)
    if url:
        with ApiClient(url, token) as api:
            answer = api.invoke(
                extension_id,
                body.payload,
                metadata=body.metadata,
                tenant_id=body.tenant_id,
                trace_id=body.trace_id,
            )
        reply = answer["reply"]
    else:
        reply = _invoke_directly(ctx, extension_id, body)
    emit(json, reply, jsonlib.dumps(reply, indent=2, ensure_ascii=False))


@app.command(cls=Command)
def discover(
    ctx: typer.Context,
    wait: Annotated[
        float,
        typer.Option(
            "--wait",
            metavar="SECONDS",
            min=0.05,
            max=60,
            help="How long to collect answers: every service instance answers each question,"
            " so discovery waits this long rather than for a first reply.",
        ),
    ] = 1.0,
    json: JsonFlag = False,
) -> None:
    """Ask NATS's service API ($SRV.PING, INFO, STATS) which services answer on nats_url,
    list their endpoints with their stats, and the registry's records beside them: a record
    whose subject no discovered endpoint serves is flagged (a plain subscriber outside the
    service API cannot be seen without sending it a message, so it is not probed).

    --json prints {"services": [{"name", "id", "version", "endpoints": [{"name", "subject",
    "num_requests", "num_errors", "average_processing_time"}]}], "records": [{"id",
    "subject", "served", "services"}]}; average_processing_time is in nanoseconds, and the
    stats are null when a service's STATS answer is missing. A malformed answer is skipped
    with a warning on stderr."""
    from .adapters.nats_services import discover as ask
    from .adapters.nats_services import records_served

    s = settings(ctx)
    found = asyncio.run(ask(s.nats_url, wait_s=wait))
    records = records_served(_load_all(s), found.services)
    for note in found.skipped:
        err.print(Text("warning: ", style="yellow"), f"skipped {note}", sep="")
    endpoints: list[tuple[str, ...]] = []
    for service in found.services:
        who = (service.name, service.id, service.version)
        cells = [_endpoint_cells(endpoint) for endpoint in service.endpoints] or [("",) * 5]
        endpoints += [(*who, *row) for row in cells]
    served = [
        (r.id, r.subject, "yes" if r.served else Text("no", style="red"), ", ".join(r.services))
        for r in records
    ]
    columns = ("service", "id", "version", "endpoint", "subject", "requests", "errors", "avg ms")
    emit(
        json,
        {"services": found.services, "records": records},
        Rows(columns, endpoints) if endpoints else f"no service answered within {wait:g} s",
        "",
        Rows(("id", "subject", "served", "services"), served),
    )


def _endpoint_cells(endpoint: DiscoveredEndpoint) -> tuple[str, ...]:
    """An endpoint's cells in `discover`'s table, its average time in milliseconds; the
    stats empty when its service's STATS answer did not give them."""
    requests, errors, average = (
        endpoint.num_requests,
        endpoint.num_errors,
        endpoint.average_processing_time,
    )
    if requests is None or errors is None or average is None:
        return (endpoint.name, endpoint.subject, "", "", "")
    return (endpoint.name, endpoint.subject, str(requests), str(errors), f"{average / 1e6:.3f}")


@app.command("sample-extensions", cls=Command)
def sample_extensions(
    ctx: typer.Context,
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url",
            metavar="URL",
            show_default=False,
            help="NATS server (default: the nats_url setting).",
        ),
    ] = None,
) -> None:
    """Serve the sample extensions on NATS until Ctrl-C (the four reference ones, flaky, echo).

    flaky fails on demand: send {"failure_rate": 0.5} to extreg.local.samples.flaky.control.
    """
    from .local.samples import main as serve_samples

    serve_samples(nats_url or settings(ctx).nats_url)


# -- API tokens ----------------------------------------------------------------------------

token_app = typer.Typer(
    help="API tokens: create, list, revoke (only hashes are stored).",
    cls=Group,
    no_args_is_help=True,
)
app.add_typer(token_app, name="token")
TokenName = Annotated[str, typer.Argument(metavar="NAME", help="The token's name.")]


@token_app.command("create", cls=Command)
def token_create(
    ctx: typer.Context,
    name: TokenName,
    role: Annotated[str, typer.Option("--role", metavar="ROLE", help="viewer, operator or admin.")],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
            metavar="FILE",
            show_default=False,
            help="Add it to this JSON tokens file (api_tokens_file) instead of the database.",
        ),
    ] = None,
    json: JsonFlag = False,
) -> None:
    """Make a token and print it once, as the last line; only its SHA-256 hash is kept."""
    from .auth import add_to_tokens_file, check_name, check_role, generate_token, hash_token

    check_name(name)
    checked = check_role(role)
    if file is not None:
        secret = generate_token()
        add_to_tokens_file(file, name, checked, hash_token(secret))
        where = str(file)
    else:
        secret = asyncio.run(_token_store(ctx).create(name, checked, actor()))
        where = "the database"
    emit(
        json,
        {"name": name, "role": checked, "token": secret},
        f"token {name!r} ({checked}) stored as a hash in {where}; it is shown only now:",
        secret,
    )


@token_app.command("list", cls=Command)
def token_list(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Every token's name, role and dates (never the token or its hash)."""
    rows = asyncio.run(_token_store(ctx).list_tokens())
    table = [
        (
            row["name"],
            row["role"],
            str(row["created_at"]),
            row["created_by"] or "",
            str(row["revoked_at"] or ""),
        )
        for row in rows
    ]
    columns = ("name", "role", "created_at", "created_by", "revoked_at")
    emit(json, rows, Rows(columns, table))


@token_app.command("revoke", cls=Command)
def token_revoke(ctx: typer.Context, name: TokenName, json: JsonFlag = False) -> None:
    """Stop a token from working, at once, on every server of this database."""
    when = asyncio.run(_token_store(ctx).revoke(name)).isoformat()
    emit(json, {"name": name, "revoked_at": when}, f"token {name!r} revoked at {when}")


# -- tables --------------------------------------------------------------------------------


def fields_table(data: dict[str, Any]) -> Rows:
    """One record as field/value rows; lists and objects as JSON, null as empty."""
    rows = [(key, _value(value)) for key, value in data.items()]
    return Rows(("field", "value"), rows, header=False)


def _value(value: Any) -> str:
    if value is None:
        return ""
    structured = isinstance(value, dict | list | tuple)
    return jsonlib.dumps(value, default=str) if structured else str(value)


def health_table(items: list[dict[str, Any]]) -> Rows:
    """Health items as the API gives them: status and the recent window first (what status
    judges by), then the all-time figures."""
    columns = ("id", "type", "status", "circuit", "recent calls", "recent success",
               "recent p95 ms", "calls", "success", "avg ms", "last failure")  # fmt: skip
    rows = []
    for item in items:
        h, recent = item["health"], item["health"]["recent"]
        rows.append(
            (
                item["id"],
                item["type"],
                h["status"],
                h["circuit_breaker_state"],
                str(recent["calls"]),
                f"{recent['success_rate']:.0%}",
                str(recent["p95_latency_ms"]),
                str(h["success_count"] + h["failure_count"]),
                f"{h['success_rate']:.0%}",
                str(h["avg_latency_ms"]),
                h["last_failure"] or "",
            )
        )
    return Rows(columns, rows)


# -- helpers -------------------------------------------------------------------------------


def _set_enabled(
    ctx: typer.Context,
    extension_id: str,
    enabled: bool,
    url: str | None,
    token: str | None,
    json: bool,
) -> None:
    """Enable or disable, directly or through a server, and say whether anything changed."""
    if url:
        with ApiClient(url, token) as api:
            outcome, _ = api.set_enabled(extension_id, enabled)
    else:
        outcome, _ = on_database(
            _database_settings(ctx), lambda db: db.set_enabled(extension_id, enabled, actor())
        )
    if outcome == "absent":
        raise ExtensionNotFound(extension_id)
    state = "enabled" if enabled else "disabled"
    said = f"{extension_id} {state}" if outcome == "updated" else f"{extension_id} already {state}"
    emit(json, {"id": extension_id, "enabled": enabled, "outcome": outcome}, said)


def invocation(text: str, tenant: str | None) -> Invocation:
    """The --payload body read as the API reads the body of POST /admin/extensions/{id}/invoke:
    the same strict JSON (`json_object`), then the same model (`api.operate.Invocation`), so
    a body works alike from here, through --url and from the dashboard, and a wrong field is
    refused by name instead of reaching the extension as an empty message."""
    from pydantic import ValidationError

    from .api.operate import Invocation

    data = json_object(text, "--payload")
    if tenant is not None:
        if "tenant_id" in data:
            raise ConfigError("--tenant and the body's tenant_id: give one of them")
        data["tenant_id"] = tenant
    try:
        return Invocation.model_validate(data)
    except ValidationError as exc:
        problems = [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
        raise ConfigError(f"--payload: {'; '.join(problems)}") from None


def _invoke_directly(ctx: typer.Context, extension_id: str, body: Invocation) -> dict[str, Any]:
    """One call through a registry and invoker of our own, with the context the API's route
    builds from the same body (a fresh trace id unless the body gives one)."""
    from .invoke import Invoker

    s = with_database(settings(ctx))
    context = {"trace_id": body.trace_id or uuid.uuid4().hex, "tenant_id": body.tenant_id}
    request = {"payload": body.payload, "metadata": body.metadata}

    async def call(reg: Registry) -> dict[str, Any]:
        async with Invoker.open(reg, s) as inv:
            return await inv.invoke(extension_id, request, context)

    return on_registry(s, call)


def _health_from_database(ctx: typer.Context, extension_id: str | None) -> dict[str, Any]:
    from .health_view import database_report

    s = _database_settings(ctx)
    return on_database(s, lambda db: database_report(db, s, extension_id))


def _audit_from_database(
    ctx: typer.Context, extension_id: str | None, policy_id: str | None, limit: int
) -> list[dict[str, Any]]:
    rows = on_database(
        _database_settings(ctx),
        lambda db: db.audit_trail(extension_id, limit, policy_id=policy_id),
    )
    return [
        {k: v.isoformat() if hasattr(v, "isoformat") else v for k, v in row.items()} for row in rows
    ]


def _changed_fields(row: dict[str, Any]) -> list[str]:
    """The fields an audit row changed (stamps left out)."""
    old, new = row.get("old_values") or {}, row.get("new_values") or {}
    return sorted(
        k for k in set(old) | set(new) if k not in DATABASE_KEPT and old.get(k) != new.get(k)
    )


def _token_store(ctx: typer.Context) -> TokenStore:
    s = with_database(settings(ctx))
    if not s.database_configured:
        raise ConfigError(
            "no database: a registry on fixtures takes its tokens from a tokens file; "
            "use `extreg token create NAME --role R --file FILE` and set api_tokens_file"
        )
    return TokenStore.from_settings(s)


def _database_settings(ctx: typer.Context) -> Settings:
    """The settings of a command that works on the database itself (refused on fixtures,
    which are read-only)."""
    s = settings(ctx)
    if s.source == "fixtures":
        raise Conflict("source is 'fixtures': fixtures are read-only, edit the files instead")
    return s


async def _all(reg: Registry) -> list[Extension]:
    return reg.all()


def _load_all(s: Settings) -> list[Extension]:
    return on_registry(s, _all)


async def _everything(reg: Registry) -> FixtureSet:
    return FixtureSet(reg.all(), reg.policies())


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(jsonlib.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def by_outcome(report: dict[str, str]) -> dict[str, list[str]]:
    """An import's or an apply's {id: outcome} as {outcome: sorted ids}, every outcome of
    `WRITE_OUTCOMES` present, so the JSON of a report has the same keys whatever happened."""
    return {k: sorted(i for i, v in report.items() if v == k) for k in WRITE_OUTCOMES}


def _fixtures(folder: Path, s: Settings) -> FixtureSet:
    return load_fixtures(
        folder,
        max_timeout_ms=s.extension_max_timeout_ms,
        max_retries=s.extension_max_retries,
        policy_limits=PolicyLimits.from_settings(s),
    )


# Sub-apps that use the helpers above, so imported below them.
from .policy_cli import policy_app  # noqa: E402

app.add_typer(policy_app, name="policy")


def main() -> None:
    """Entry point. Usage errors are click's (exit 2); every command reports our errors itself
    (`_Extreg.invoke`)."""
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
