"""`extreg policy list|show|apply|delete|run`: routing policies from the command line.

Every command works on plain data of one shape, the admin API's (a policy as
`policy_to_plain` gives it, plus `unusable`: what stops it from running as written), whether
it came from a registry of our own or from a server through `--url`; so the output of
`--json` is the same either way (a server's `list` and `show` add its `recent_runs`). Writes
go through the database's one write path (`PostgresSource.write_policies`) or the server's
routes, never around them.

Registered on the `extreg` app by `extreg.cli` (below its helpers, which this module uses).
"""

from __future__ import annotations

import json as jsonlib
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from .adapters.fixtures import load_policy_file
from .cli import (
    Command,
    Group,
    JsonFlag,
    Rows,
    TokenOption,
    UrlOption,
    _database_settings,
    actor,
    by_outcome,
    emit,
    err,
    fields_table,
    json_object,
    on_database,
    on_registry,
    render,
    settings,
)
from .client import ApiClient
from .core.pipeline import context_problems
from .core.policy import (
    BODY_FIELDS,
    WRITABLE_POLICY_FIELDS,
    Policy,
    PolicyLimits,
    complexity_warnings,
    policy_to_plain,
)
from .errors import ConfigError, PolicyError, PolicyNotFound, ValidatorBlocked
from .local.embedded import with_database
from .registry import Registry

policy_app: typer.Typer = typer.Typer(
    help="Routing policies: list, show, apply, delete, run.", cls=Group, no_args_is_help=True
)
PolicyId = Annotated[str, typer.Argument(metavar="ID", help="The policy's id.")]


# -- reading -------------------------------------------------------------------------------


@policy_app.command("list", cls=Command)
def list_(
    ctx: typer.Context, url: UrlOption = None, token: TokenOption = None, json: JsonFlag = False
) -> None:
    """Every policy, disabled ones too, and what stops any from running as written."""
    if url:
        with ApiClient(url, token) as api:
            policies = api.list_policies()
    else:
        policies = on_registry(settings(ctx), _listed)
    rows = [
        (
            p["policy_id"],
            p.get("tenant_id") or "",
            "yes" if p.get("enabled", True) else Text("no", style="red"),
            stages_summary(p),
            Text("; ".join(p.get("unusable") or []), style="red"),
        )
        for p in policies
    ]
    emit(json, policies, Rows(("policy_id", "tenant", "enabled", "stages", "unusable"), rows))


@policy_app.command(cls=Command)
def show(
    ctx: typer.Context,
    policy_id: PolicyId,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """One policy, whole."""
    if url:
        with ApiClient(url, token) as api:
            data = api.get_policy(policy_id)
    else:
        found = [p for p in on_registry(settings(ctx), _listed) if p["policy_id"] == policy_id]
        if not found:
            raise PolicyNotFound(policy_id)
        data = found[0]
    emit(json, data, fields_table(data))


# -- writing -------------------------------------------------------------------------------


@policy_app.command(cls=Command)
def apply(
    ctx: typer.Context,
    file: Annotated[
        Path, typer.Argument(metavar="FILE", help="A JSON or YAML file: one policy or a list.")
    ],
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Report, write nothing.")] = False,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Create or replace the file's policies (audited); on the database all or nothing.

    The file is checked whole first (fields, types, depth limits; every problem named with
    its item and field), then every extension id against the database, in the write itself.
    With --url each policy is one request, in the file's order.
    """
    s = settings(ctx)
    policies = load_policy_file(file, policy_limits=PolicyLimits.from_settings(s))
    if url:
        if dry_run:
            raise ConfigError("--dry-run works on the database only, not through --url")
        report = _apply_through(url, token, policies)
    else:
        report = on_database(
            _database_settings(ctx),
            lambda db: db.import_policies(policies, actor(), dry_run=dry_run),
        )
    warnings = {p.policy_id: complexity_warnings(p) for p in policies}
    warnings = {k: v for k, v in warnings.items() if v}
    prefix = "would be " if dry_run else ""
    lines = [f"{policy_id}: {prefix}{report[policy_id]}" for policy_id in sorted(report)]
    emit(json, {"dry_run": dry_run, **by_outcome(report), "warnings": warnings}, *lines)
    for policy_id, found in sorted(warnings.items()):
        for warning in found:
            err.print(Text("warning: ", style="yellow"), f"{policy_id}: {warning}", sep="")


@policy_app.command(cls=Command)
def delete(
    ctx: typer.Context,
    policy_id: PolicyId,
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Delete a policy (audited; its audit rows stay)."""
    if url:
        with ApiClient(url, token) as api:
            api.delete_policy(policy_id)
    else:
        written = on_database(
            _database_settings(ctx),
            lambda db: db.write_policies({policy_id: lambda _: None}, actor()),
        )
        if written[policy_id][0] == "absent":
            raise PolicyNotFound(policy_id)
    emit(json, {"policy_id": policy_id, "deleted": True}, f"{policy_id} deleted")


# -- running -------------------------------------------------------------------------------


@policy_app.command(cls=Command)
def run(
    ctx: typer.Context,
    policy_id: PolicyId,
    message: Annotated[
        str,
        typer.Option("--message", metavar="JSON", help='The message, as JSON: {"payload": ...}.'),
    ],
    context: Annotated[
        str,
        typer.Option(
            "--context", metavar="JSON", help="The context, as JSON (trace_id, tenant_id...)."
        ),
    ] = "{}",
    url: UrlOption = None,
    token: TokenOption = None,
    json: JsonFlag = False,
) -> None:
    """Run the policy's pipeline once on a message and print the result and every step.

    Without --url the run is made from here, on the nats_url setting. A run that gives no
    result (a validator blocked it, a required step failed, no provider answered) prints
    its reason and the steps so far, and exits 1 (with --json: the API's error answer).
    """
    data = json_object(message, "--message")
    ctx_data = _run_context(json_object(context, "--context"))
    try:
        if url:
            with ApiClient(url, token) as api:
                result = api.run_policy(policy_id, data, ctx_data)
        else:
            result = _run_directly(ctx, policy_id, data, ctx_data)
    except PolicyError as exc:
        if not json and not isinstance(exc, PolicyNotFound):  # no steps to show for that
            _explain_failure(exc)
        raise  # `cli.report_error` names it (as JSON with --json, steps included)
    emit(
        json,
        result,
        "message:",
        jsonlib.dumps(result["message"], indent=2, ensure_ascii=False),
        f"provider_id: {result.get('provider_id')}",
        steps_table(result["steps"]),
    )


# -- helpers -------------------------------------------------------------------------------


def stages_summary(policy: dict[str, Any]) -> str:
    """`pre: a, b · validators: c · providers: d · post: e`, empty stages left out."""
    parts = []
    for stage in BODY_FIELDS:  # the four stage lists, in run order
        items = policy.get(stage) or []
        ids = [i if isinstance(i, str) else str(i.get("id")) for i in items]
        if ids:
            parts.append(f"{stage}: {', '.join(ids)}")
    return " · ".join(parts)


def steps_table(steps: list[dict[str, Any]]) -> Rows:
    """Steps as a result carries them (`Step.as_dict`), in policy order."""
    rows = [
        (s["stage"], s["id"], s["status"], str(s["latency_ms"]), s["reason"] or "") for s in steps
    ]
    return Rows(("stage", "id", "status", "latency ms", "reason"), rows)


async def _listed(reg: Registry) -> list[dict[str, Any]]:
    unusable = reg.status.unusable_policies
    return [
        {**policy_to_plain(p), "unusable": unusable.get(p.policy_id, [])} for p in reg.policies()
    ]


def _apply_through(url: str, token: str | None, policies: list[Policy]) -> dict[str, str]:
    """Each policy PUT to the server, in order, unless the server already holds it as it is
    (the server answers a replace alike whether or not it changed anything). Not one
    transaction: the file was checked whole here first, so only a reference the server
    refuses can stop it part way, and the error names that policy."""
    report = {}
    with ApiClient(url, token) as api:
        for policy in policies:
            wanted = policy_to_plain(policy, writable_only=True)
            try:
                held = _writable(api.get_policy(policy.policy_id))
            except PolicyNotFound:
                held = None
            if held == _writable(wanted):
                report[policy.policy_id] = "unchanged"
                continue
            report[policy.policy_id], _ = api.put_policy(wanted)
    return report


def _writable(data: dict[str, Any]) -> dict[str, Any]:
    """A policy's writable fields as JSON would carry them (lists, not tuples)."""
    plain: dict[str, Any] = jsonlib.loads(jsonlib.dumps(data, default=str))
    return {k: plain.get(k) for k in WRITABLE_POLICY_FIELDS}


def _run_directly(
    ctx: typer.Context, policy_id: str, message: dict[str, Any], context: dict[str, Any]
) -> dict[str, Any]:
    """One run through a registry and invoker of our own (health is saved as for `invoke`)."""
    from .invoke import Invoker

    s = with_database(settings(ctx))

    async def call(reg: Registry) -> dict[str, Any]:
        reg.lookup_policy(policy_id)  # an unknown or disabled policy needs no NATS to say so
        async with Invoker.open(reg, s) as inv:
            result = await inv.run_policy(policy_id, message, context)
            found: dict[str, Any] = result.as_dict()
            return found

    return on_registry(s, call)


def _explain_failure(exc: PolicyError) -> None:
    """What a failed run prints on stderr before `cli.report_error` names the error: its
    class, who stopped the run and why, and the steps so far."""
    who = f" by {exc.extension_id}" if isinstance(exc, ValidatorBlocked) else ""
    err.print(f"{type(exc).__name__}{who}: {exc.reason}")
    if exc.steps:
        render(err, steps_table([step.as_dict() for step in exc.steps]))


def _run_context(context: dict[str, Any]) -> dict[str, Any]:
    """The run's context, with a fresh `trace_id` unless one is given; refused here as the
    runner and the server refuse it (`context_problems`), before anything is sent."""
    if problems := context_problems(context):
        text = "; ".join(f"{field.removeprefix('context.')}: {why}" for field, why in problems)
        raise ConfigError(f"--context: {text}")
    return {"trace_id": uuid.uuid4().hex, **context}
