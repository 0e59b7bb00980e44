"""The `extreg` command: thin wrappers over the registry, the database adapter and the server.

Exit status: 0 success, 1 failure (the database is down, say), 2 bad usage or bad input. The
error tree maps to those codes in `main`, once; commands just raise.
"""

from __future__ import annotations

import asyncio
import contextlib
import getpass
import json as jsonlib
import sys
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, TypeVar

import msgspec
import typer
from rich.console import Console
from rich.table import Table
from rich.text import Text

from . import logs
from .adapters.fixtures import POLICIES_FOLDER, FixtureSet, load_fixtures
from .adapters.migrate import migrate as run_migrations
from .adapters.postgres import PostgresSource
from .client import ApiClient
from .core.model import DATABASE_KEPT, Extension, to_plain
from .core.policy import PolicyLimits, policy_to_plain
from .errors import (
    ConfigError,
    Conflict,
    ExtensionNotFound,
    ExtregError,
    FixtureError,
    InvalidRecord,
    PolicyNotFound,
    SnapshotFileError,
)
from .local.embedded import with_database
from .registry import Registry
from .settings import Settings
from .tokens import TokenStore

T = TypeVar("T")

app = typer.Typer(
    name="extreg",
    help="Extension registry of a message router.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
# No markup: records and errors carry user text, and "[...]" in it must print as it is.
out = Console(markup=False, highlight=False)
err = Console(stderr=True, markup=False, highlight=False)
ERROR = Text("error: ", style="red")
# What an upsert of a record reports (import-fixtures, policy apply); not a policy run's
# outcomes, which are `extreg.invoke.pipeline.OUTCOMES`.
WRITE_OUTCOMES = ("created", "updated", "unchanged")

JsonFlag = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
UrlOption = Annotated[
    str | None,
    typer.Option(
        "--url",
        envvar="EXTREG_URL",
        show_default=False,
        help="Act through the extreg server at this URL (else directly on the database).",
    ),
]
TokenOption = Annotated[
    str | None,
    typer.Option(
        "--token",
        envvar="EXTREG_TOKEN",
        show_default=False,
        show_envvar=True,
        help="API token for --url.",
    ),
]


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
    ctx.obj = Options(
        config, {"database_url": database_url, "source": source, "fixtures_dir": fixtures_dir}
    )


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


def emit_json(data: Any) -> None:
    sys.stdout.write(msgspec.json.encode(data).decode() + "\n")


@app.command()
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to bind.", min=1, max=65535)] = 8080,
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


@app.command()
def migrate(ctx: typer.Context) -> None:
    """Apply missing schema migrations (safe to run twice, and from two processes)."""
    applied = run_migrations(with_database(settings(ctx)).conninfo)
    out.print(f"applied: {', '.join(applied)}" if applied else "database is up to date")


@app.command("import-fixtures")
def import_fixtures(
    ctx: typer.Context,
    folder: Path,
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
    if json:
        emit_json({"dry_run": dry_run, **counts, "policies": policy_counts})
        return
    prefix = "would be " if dry_run else ""
    shown = [("", counts), ("policies ", policy_counts)] if found.policies else [("", counts)]
    for noun, by_kind in shown:
        for kind, ids in by_kind.items():
            out.print(
                f"{noun}{prefix}{kind}: {len(ids)}" + (f"  ({', '.join(ids)})" if ids else "")
            )


@app.command()
def export(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(help="A folder, or - for standard output.")],
) -> None:
    """Write every record as fixtures: DIR/<id>.json per extension and DIR/policies/<id>.json
    per policy, which `import-fixtures DIR` reads back; or, with -, one JSON object
    {"extensions": [...], "policies": [...]} to standard output."""
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
    err.print(f"exported {len(records)} extensions and {len(policies)} policies to {folder}")


@app.command()
def validate(ctx: typer.Context, folder: Path, json: JsonFlag = False) -> None:
    """Check a fixtures folder; report every problem and exit 2 if there is one."""
    try:
        found = _fixtures(folder, settings(ctx))
    except FixtureError as exc:
        if json:
            emit_json({"valid": False, "problems": exc.problems})
            raise typer.Exit(2) from None
        raise
    if json:
        emit_json({"valid": True, "count": len(found.extensions), "policies": len(found.policies)})
    else:
        out.print(
            f"{folder}: {len(found.extensions)} extensions and {len(found.policies)} policies,"
            " all valid"
        )


# -- reading -------------------------------------------------------------------------------


@app.command("list")
def list_(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Every extension, disabled ones too."""
    records = _load_all(settings(ctx))
    if json:
        emit_json([to_plain(e) for e in records])
        return
    table = Table("id", "type", "version", "subject", "timeout", "retry", "enabled")
    for e in records:
        table.add_row(
            e.id,
            e.type,
            e.version,
            e.subject,
            f"{e.timeout_ms} ms",
            str(e.retry),
            "yes" if e.enabled else Text("no", style="red"),
        )
    out.print(table)


@app.command()
def show(ctx: typer.Context, extension_id: str, json: JsonFlag = False) -> None:
    """One extension, with its versions and instances."""
    found = [e for e in _load_all(settings(ctx)) if e.id == extension_id]
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
def status(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Which source serves, how many records, and how fresh they are."""
    s = settings(ctx)

    async def read(reg: Registry) -> dict[str, Any]:
        return {**reg.status.as_dict(), "nats_url": s.nats_display}

    data = on_registry(s, read)
    if json:
        emit_json(data)
        return
    table = Table("field", "value", show_header=False)
    for key, value in data.items():
        table.add_row(key, "" if value is None else str(value))
    out.print(table)


# -- writing -------------------------------------------------------------------------------


@app.command()
def enable(
    ctx: typer.Context, extension_id: str, url: UrlOption = None, token: TokenOption = None
) -> None:
    """Enable an extension (audited); every running registry picks it up by notification."""
    _set_enabled(ctx, extension_id, True, url, token)


@app.command()
def disable(
    ctx: typer.Context, extension_id: str, url: UrlOption = None, token: TokenOption = None
) -> None:
    """Disable an extension (audited); every running registry picks it up by notification."""
    _set_enabled(ctx, extension_id, False, url, token)


@app.command()
def reload(ctx: typer.Context, url: UrlOption = None, token: TokenOption = None) -> None:
    """Ask every running registry on this database for a full reload."""
    if url:
        with ApiClient(url, token) as api:
            report = api.reload()
        out.print(f"reloaded: {report['count']} extensions from {report['source']}")
        return
    on_database(_database_settings(ctx), lambda db: db.request_reload())
    out.print("reload requested")


# -- operating: health, audit, invoke (directly, or through a server with --url) -------------

OneOrAll = Annotated[str | None, typer.Argument(help="One extension; all if omitted.")]


@app.command()
def health(
    ctx: typer.Context,
    extension_id: OneOrAll = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Health of every extension (or one): calls, success rate, latency, circuit state."""
    if url:
        with ApiClient(url, token) as api:
            answer = api.health(extension_id)
        report: dict[str, Any] = answer if extension_id is None else {"extensions": [answer]}
    else:
        report = _health_from_database(ctx, extension_id)
    if json:
        emit_json(report if extension_id is None else report["extensions"][0])
        return
    table = Table("id", "type", "circuit", "success", "calls", "avg ms", "p95 ms", "last failure")
    for item in report["extensions"]:
        h = item["health"]
        table.add_row(
            item["id"],
            item["type"],
            h["circuit_breaker_state"],
            f"{h['success_rate']:.0%}",
            str(h["success_count"] + h["failure_count"]),
            str(h["avg_latency_ms"]),
            str(h["p95_latency_ms"]),
            h["last_failure"] or "",
        )
    out.print(table)
    if "summary" in report:
        out.print(" ".join(f"{k}={v}" for k, v in report["summary"].items()))


@app.command()
def audit(
    ctx: typer.Context,
    extension_id: OneOrAll = None,
    policy: Annotated[
        str | None,
        typer.Option("--policy", show_default=False, help="One policy's rows instead."),
    ] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000)] = 50,
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
    if json:
        emit_json(rows)
        return
    table = Table("changed_at", "id", "action", "changed_by", "fields")
    for row in rows:
        table.add_row(
            str(row["changed_at"]),
            row["extension_id"],
            row["action"],
            row["changed_by"] or "",
            ", ".join(_changed_fields(row)),
        )
    out.print(table)


@app.command()
def invoke(
    ctx: typer.Context,
    extension_id: str,
    payload: Annotated[str, typer.Option("--payload", help="The request payload, as JSON.")] = "{}",
    tenant: Annotated[str | None, typer.Option("--tenant", help="Tenant id.")] = None,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Call an extension once, as the router would, and print its JSON reply.

    Without --url the call is made from here, on the nats_url setting; its health is saved.
    """
    try:
        data = jsonlib.loads(payload)
    except ValueError as exc:
        raise ConfigError(f"--payload is not valid JSON: {exc}") from None
    if url:
        with ApiClient(url, token) as api:
            reply = api.invoke(extension_id, data, tenant_id=tenant)["reply"]
    else:
        reply = _invoke_directly(ctx, extension_id, data, tenant)
    if json:
        emit_json(reply)
    else:
        out.print_json(data=reply)


@app.command("sample-extensions")
def sample_extensions(
    ctx: typer.Context,
    nats_url: Annotated[
        str | None,
        typer.Option(
            "--nats-url", show_default=False, help="NATS server (default: the nats_url setting)."
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
    help="API tokens: create, list, revoke (only hashes are stored).", no_args_is_help=True
)
app.add_typer(token_app, name="token")


@token_app.command("create")
def token_create(
    ctx: typer.Context,
    name: str,
    role: Annotated[str, typer.Option("--role", help="viewer, operator or admin.")],
    file: Annotated[
        Path | None,
        typer.Option(
            "--file",
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
    if json:
        emit_json({"name": name, "role": checked, "token": secret})
        return
    out.print(
        f"token {name!r} ({checked}) stored as a hash in {where}; it is shown only now:",
        highlight=False,
    )
    sys.stdout.write(secret + "\n")


@token_app.command("list")
def token_list(ctx: typer.Context, json: JsonFlag = False) -> None:
    """Every token's name, role and dates (never the token or its hash)."""
    rows = asyncio.run(_token_store(ctx).list_tokens())
    if json:
        emit_json(rows)
        return
    table = Table("name", "role", "created_at", "created_by", "revoked_at")
    for row in rows:
        table.add_row(
            row["name"],
            row["role"],
            str(row["created_at"]),
            row["created_by"] or "",
            str(row["revoked_at"] or ""),
        )
    out.print(table)


@token_app.command("revoke")
def token_revoke(ctx: typer.Context, name: str) -> None:
    """Stop a token from working, at once, on every server of this database."""
    when = asyncio.run(_token_store(ctx).revoke(name))
    out.print(f"token {name!r} revoked at {when.isoformat()}", highlight=False)


# -- helpers -------------------------------------------------------------------------------


def _set_enabled(
    ctx: typer.Context, extension_id: str, enabled: bool, url: str | None, token: str | None
) -> None:
    if url:
        with ApiClient(url, token) as api:
            api.set_enabled(extension_id, enabled)
        out.print(f"{extension_id} {'enabled' if enabled else 'disabled'}")
        return
    outcome, _ = on_database(
        _database_settings(ctx), lambda db: db.set_enabled(extension_id, enabled, actor())
    )
    if outcome == "absent":
        raise ExtensionNotFound(extension_id)
    state = "enabled" if enabled else "disabled"
    out.print(
        f"{extension_id} {state}" if outcome == "updated" else f"{extension_id} was already {state}"
    )


def _invoke_directly(
    ctx: typer.Context, extension_id: str, payload: Any, tenant: str | None
) -> dict[str, Any]:
    """One call through a registry and invoker of our own; an extension error exits 1."""
    from .errors import ExtensionError
    from .invoke import Invoker

    s = with_database(settings(ctx))

    async def call(reg: Registry) -> dict[str, Any]:
        async with Invoker.open(reg, s) as inv:
            context = {"trace_id": uuid.uuid4().hex, "tenant_id": tenant}
            return await inv.invoke(extension_id, {"payload": payload, "metadata": {}}, context)

    try:
        return on_registry(s, call)
    except ExtensionError as exc:
        err.print(ERROR, f"{exc.extension_id}: {exc.reason} (attempts: {exc.attempts})", sep="")
        raise typer.Exit(1) from None


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

BAD_INPUT = (
    ConfigError,
    FixtureError,
    InvalidRecord,
    SnapshotFileError,
    ExtensionNotFound,
    PolicyNotFound,
    Conflict,
)


def main() -> None:
    """Entry point: click handles usage errors (exit 2); our error tree maps to 1 or 2 here."""
    try:
        app()
    except BAD_INPUT as exc:
        err.print(ERROR, str(exc), sep="")
        sys.exit(2)
    except ExtregError as exc:
        err.print(ERROR, str(exc), sep="")
        sys.exit(1)
    except KeyboardInterrupt:
        sys.exit(130)
