"""The pipeline's decisions, without I/O: what a step sends, what its reply does to the
message and context, what a validator's answer means, and when the validators' outcome is
certain. `extreg.invoke.pipeline` runs them over NATS.

The semantics are the original router's (`router_decider.erl`, EXTENSIONS_API.md §7): a
pre/post reply's `payload` replaces the message (a string becomes the message's `payload`
field) and its `metadata` is merged into the context; a validator answers `{"status": "ok"}`
or `{"status": "reject", "reason", "details"}` (no status means ok, any other status is a
reject: fail closed), and a timeout or an error counts as a reject; a provider's `output`
becomes the message's `payload` and `metadata.provider_id` names it.

Validators run concurrently but must decide as a sequential run in policy order would
(ADR-024): `settle` looks at the answers so far, in policy order, and says whether the
outcome is already certain, so the runner can cancel the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from ..errors import printable
from .policy import Policy, Stage, StepItem, ValidatorItem
from .routing import rules_match

StepStatus = Literal["ok", "skipped", "failed", "rejected", "warned", "ignored", "would_run"]
ID_KEYS = ("trace_id", "tenant_id")  # the envelope's own fields: strings, never in its metadata
ID_MAX_LENGTH = 255
RESERVED = frozenset({*ID_KEYS, "dry_run"})
"""Context keys no extension's reply may set: the ids (the caller's, or the run's own) and
`dry_run`, which makes `Invoker.invoke` answer `{}` without sending, so a validator would
"answer" ok. A run's context may not carry `dry_run` at all (`context_problems`)."""
ID_PROBLEM = f"must be a string of at most {ID_MAX_LENGTH} characters"
DRY_RUN_REFUSED = (
    "not for a policy run (every step would answer {} unsent, so every validator ok);"
    " for the steps a run would take, use POST /admin/policies/{id}/dry-run"
    " or extreg.core.pipeline.plan"
)


@dataclass(slots=True)
class Step:
    """One item of a run, in policy order; what `steps` of a result or an error lists.

    Read-only by convention, not `frozen`: a frozen dataclass sets each field through
    `object.__setattr__`, about 1 µs more per step on the runner's path."""

    stage: Stage
    id: str
    status: StepStatus
    latency_ms: float = 0.0
    reason: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "stage": self.stage,
            "id": self.id,
            "status": self.status,
            "latency_ms": round(self.latency_ms, 3),
            "reason": self.reason,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    """A validator's answer: ok, or a reject with the validator's reason and details. An
    error (timeout, transport, invalid reply) is a reject whose reason says so."""

    ok: bool
    reason: str | None = None
    details: Any = None


def context_problems(context: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(field, message)` for each thing wrong with a run's context, before anything is
    sent: `trace_id` and `tenant_id`, when given (not None), must be strings of at most 255
    characters (the envelope carries them as such), and `dry_run` is refused. The runner
    raises them as `InvalidRecord`; the API (422) and the CLI (exit 2) check with this too."""
    problems = []
    for key in ID_KEYS:  # a loop, not a comprehension: this runs once per run (Python 3.11)
        value = context.get(key)
        if value is not None and not (isinstance(value, str) and len(value) <= ID_MAX_LENGTH):
            problems.append((f"context.{key}", ID_PROBLEM))
    if "dry_run" in context:
        problems.append(("context.dry_run", DRY_RUN_REFUSED))
    return problems


def when_matches(when: Mapping[str, Any], context: Mapping[str, Any]) -> bool:
    """`when` is matched like a version's `routing_rules`; `{}` always matches."""
    return not when or rules_match(when, context.get)


def step_metadata(context: Mapping[str, Any], policy_id: str) -> dict[str, Any]:
    """The `metadata` every step of a run sends while the context stays the same: the
    context but the `RESERVED` keys (the ids travel as the envelope's own fields) and the
    policy id. Made once per context by the runner and shared by its steps."""
    metadata = {k: v for k, v in context.items() if k not in RESERVED}
    metadata["policy_id"] = policy_id
    return metadata


def step_request(
    message: Mapping[str, Any], metadata: Mapping[str, Any], config: Mapping[str, Any]
) -> dict[str, Any]:
    """The request of one step: the message as `payload`, a `step_metadata` as `metadata`,
    with the item's `config` under `metadata.config` when it has one (the original sent
    none; the samples read it). The message and a config-less metadata go in as they are (a
    request is only encoded, never changed); a config makes a new metadata dict."""
    return {"payload": message, "metadata": {**metadata, "config": config} if config else metadata}


def apply_reply(
    message: dict[str, Any], context: dict[str, Any], reply: Mapping[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """A pre/post reply applied: its `payload` replaces the message (a string becomes the
    message's `payload` field) and its `metadata` is merged into the context, but for the
    `RESERVED` keys, which no extension may set. Neither input is changed; what is unchanged is returned as is (the same object), so a caller can tell
    a changed context by identity."""
    payload = reply.get("payload")
    if isinstance(payload, dict):
        message = payload  # a reply is decoded afresh for each call: no one else holds it
    elif isinstance(payload, str):
        message = {**message, "payload": payload}
    metadata = reply.get("metadata")
    if metadata and isinstance(metadata, dict):  # an empty one changes nothing: no new context
        context = {**context, **{k: v for k, v in metadata.items() if k not in RESERVED}}
    return message, context


def provider_message(
    message: Mapping[str, Any], reply: Mapping[str, Any], provider_id: str
) -> dict[str, Any]:
    """The message post sees: the provider's `output` as its payload, the provider named in
    its metadata."""
    metadata = message.get("metadata")
    merged = dict(metadata) if isinstance(metadata, dict) else {}
    extra = reply.get("metadata")
    if isinstance(extra, dict):
        merged.update(extra)
    merged["provider_id"] = provider_id
    return {**message, "payload": reply.get("output"), "metadata": merged}


def verdict_of(reply: Mapping[str, Any]) -> Verdict:
    """What a validator's reply means (see the module docstring). Its reason is the
    extension's text, bound for logs, steps and answers (`bounded`)."""
    status = reply.get("status", "ok")
    if status == "ok":
        return Verdict(True)
    if status != "reject":
        return Verdict(
            False, f"unknown validator status {str(status)[:40]!r}", reply.get("details")
        )
    reason = reply.get("reason")
    return Verdict(False, "rejected" if reason is None else bounded(reason), reply.get("details"))


REASON_MAX_LENGTH = 200


def bounded(reason: object) -> str:
    """A reason an extension (or a provider hook) supplied, made safe to log, list in a step
    and answer: control characters escaped, at most `REASON_MAX_LENGTH` characters shown."""
    return printable(str(reason), REASON_MAX_LENGTH)


def settle(items: Sequence[ValidatorItem], verdicts: Sequence[Verdict | None]) -> int | None:
    """Is the validators' outcome certain? `verdicts[i]` is item i's answer, None while it
    is pending (or skipped: give it `Verdict(True)`). Returns the index of the validator that
    blocks, `len(items)` when none will, or None while it depends on a pending answer.

    A sequential run stops at the first blocking reject, so a pending validator *after* a
    blocking reject cannot change the outcome, while one before it can.
    """
    for index, (item, verdict) in enumerate(zip(items, verdicts, strict=True)):
        if verdict is None:
            return None
        if not verdict.ok and item.on_fail == "block":
            return index
    return len(items)


def failed_status(item: ValidatorItem) -> StepStatus:
    """The step status of a validator that rejected (or failed), by its `on_fail`."""
    return _ON_FAIL_STATUS[item.on_fail]


_ON_FAIL_STATUS: dict[str, StepStatus] = {
    "block": "rejected",
    "warn": "warned",
    "ignore": "ignored",
}


def plan(policy: Policy, context: Mapping[str, Any]) -> list[Step]:
    """The steps a run would take for this context, sending nothing (the dry run): each
    item `would_run` or is `skipped` by its `when`; every provider is listed, in order, and
    post only when there are providers (a policy without them ends after its validators)."""
    items: list[tuple[Stage, StepItem | ValidatorItem]] = [("pre", i) for i in policy.pre]
    items += [("validator", i) for i in policy.validators]
    steps = [_planned(stage, item, context) for stage, item in items]
    if policy.providers:
        steps += [Step("provider", name, "would_run") for name in policy.providers]
        steps += [_planned("post", item, context) for item in policy.post]
    return steps


def _planned(stage: Stage, item: StepItem | ValidatorItem, context: Mapping[str, Any]) -> Step:
    if when_matches(item.when, context):
        return Step(stage, item.id, "would_run")
    return Step(stage, item.id, "skipped", reason=SKIPPED_REASON)


SKIPPED_REASON = "when did not match the context"
