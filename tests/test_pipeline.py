"""The pipeline runner (`Invoker.run_policy`) against a real NATS server: every mode and
`on_fail` against ok, reject, timeout and error replies, `when`, validators in flight together
and cancelled once the outcome is certain (their late replies touch no health figure),
provider fallback and the provider hook, the errors and the steps they carry, the logs.
Metrics are in test_pipeline_metrics.py, the pure decisions in test_pipeline_decisions.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import make_settings, record
from invoke_helpers import SAMPLE_RECORDS, fixture_settings, open_invoker, subject, wait_for
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs

from extreg import (
    CircuitOpen,
    ExtensionNotFound,
    ExtensionTimeout,
    InvalidResponse,
    NoProvider,
    PolicyDisabled,
    PolicyError,
    PolicyNotFound,
    Settings,
    StepFailed,
    ValidatorBlocked,
)
from extreg.adapters.nats import subscriptions_active
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from extreg.core.pipeline import DRY_RUN_REFUSED, SKIPPED_REASON, Step
from extreg.core.policy import PolicyLimits, parse_policy
from extreg.errors import InvalidRecord
from extreg.invoke import Invoker, PolicyResult
from extreg.invoke.pipeline import NO_HOOK_REASON
from extreg.local.samples import SampleRunner

MESSAGE = {"message_id": "m-1", "message_type": "chat", "payload": "Hello",
           "metadata": {"channel": "web"}}  # fmt: skip
DEADLINE_S = 30.0  # generous: a held reply waits for a condition, never for a clock
SUBJECTS = {"pre": "beamline.ext.pre", "validator": "beamline.ext.validate",
            "post": "beamline.ext.post", "provider": "beamline.provider"}  # fmt: skip


REPLY_TIMEOUT_MS = 10_000  # an answering responder is never timed out, however busy the machine
SILENT_TIMEOUT_MS = 100  # where a timeout is the point


def ext(ext_id: str, kind: str, **values: Any) -> dict[str, Any]:
    """A record on a subject no other test uses."""
    on = f"{SUBJECTS[kind]}.{ext_id}.{subject()}"
    values.setdefault("timeout_ms", REPLY_TIMEOUT_MS)
    return record(ext_id, type=kind, subject=on, **values)


def timeout_for(kind: str) -> int:
    return SILENT_TIMEOUT_MS if kind == "timeout" else REPLY_TIMEOUT_MS


def settings_for(
    tmp_path: Path,
    nats_url: str,
    records: list[dict[str, Any]],
    *policies: dict[str, Any],
    **values: Any,
) -> Settings:
    """Fixture settings serving `records` and `policies` (in `policies/`)."""
    settings = fixture_settings(tmp_path, nats_url, *records, **values)
    folder = settings.fixtures_dir / "policies"
    folder.mkdir(exist_ok=True)
    for policy in policies:
        (folder / f"{policy['policy_id']}.json").write_text(json.dumps(policy), "utf-8")
    return settings


class Responder:
    """Answers one subject, each request in its own task (so a held reply holds up no other);
    `requests` are the decoded requests in arrival order."""

    def __init__(self, answer: Callable[[dict[str, Any]], Awaitable[bytes | None]]) -> None:
        self.answer = answer
        self.requests: list[dict[str, Any]] = []
        self.replied = 0


@contextlib.asynccontextmanager
async def respond(
    nc: Client, on: str, answer: Callable[[dict[str, Any]], Awaitable[bytes | None]]
) -> AsyncIterator[Responder]:
    responder = Responder(answer)
    tasks: set[asyncio.Task[None]] = set()

    async def reply(msg: Msg) -> None:
        body = await responder.answer(json.loads(msg.data))
        if body is not None and msg.reply:
            await nc.publish(msg.reply, body)
            await nc.flush()
            responder.replied += 1

    async def handle(msg: Msg) -> None:
        responder.requests.append(json.loads(msg.data))
        task = asyncio.create_task(reply(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    sub = await nc.subscribe(on, cb=handle)
    await subscriptions_active(nc)
    try:
        yield responder
    finally:
        for task in list(tasks):
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sub.unsubscribe()


def answer_with(reply: Any) -> Callable[[dict[str, Any]], Awaitable[bytes | None]]:
    body = reply if isinstance(reply, bytes) or reply is None else json.dumps(reply).encode()

    async def answer(request: dict[str, Any]) -> bytes | None:
        return body

    return answer


def held_until(
    event: asyncio.Event, reply: dict[str, Any]
) -> Callable[[dict[str, Any]], Awaitable[bytes | None]]:
    """Answer `reply`, but only once `event` is set (within the deadline)."""

    async def answer(request: dict[str, Any]) -> bytes | None:
        await asyncio.wait_for(event.wait(), DEADLINE_S)
        return json.dumps(reply).encode()

    return answer


def statuses(steps: list[Step]) -> list[tuple[str, str, str]]:
    return [(s.stage, s.id, s.status) for s in steps]


def calls(inv: Invoker, ext_id: str) -> tuple[int, int]:
    health = inv.health.get_health(ext_id)
    return health["success_count"], health["failure_count"]


# Replies by kind: what a responder answers (None: it stays silent, so the call times out;
# b"...": not JSON, an InvalidResponse).
PRE_REPLIES: dict[str, Any] = {
    "ok": {"payload": {**MESSAGE, "payload": "changed"}, "metadata": {"lang": "en"}},
    "timeout": None,
    "error": b"not json",
}
VALIDATOR_REPLIES: dict[str, Any] = {
    "ok": {"status": "ok"},
    "reject": {"status": "reject", "reason": "pii_detected", "details": {"pii_types": ["ssn"]}},
    "timeout": None,
    "error": b"not json",
}
ERRORS = {"timeout": ExtensionTimeout, "error": InvalidResponse}


async def echo_provider(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
    return {"output": f"answer to {message['payload']}", "metadata": {"model": name}}


# -- the table: pre and post modes ------------------------------------------------------------


@pytest.mark.parametrize("stage", ["pre", "post"])
@pytest.mark.parametrize("mode", ["required", "optional"])
@pytest.mark.parametrize("kind", ["ok", "timeout", "error"])
async def test_pre_and_post_modes(
    tmp_path: Path, nats_url: str, nats_client: Client, stage: str, mode: str, kind: str
) -> None:
    """As the original: an ok reply is applied (`ok`); an error or a timeout fails a
    `required` step (`StepFailed`, cause the extension's error) and passes over an `optional`
    one (`failed`, the message as it was)."""
    step = ext("step", stage, timeout_ms=timeout_for(kind))
    policy: dict[str, Any] = {"policy_id": "p", stage: [{"id": "step", "mode": mode}]}
    if stage == "post":
        policy["providers"] = ["hook:m"]
    settings = settings_for(tmp_path, nats_url, [step], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, step["subject"], answer_with(PRE_REPLIES[kind])),
    ):
        run = inv.run_policy("p", MESSAGE, {"trace_id": "t-1"}, provider=echo_provider)
        if kind != "ok" and mode == "required":
            with pytest.raises(StepFailed) as caught:
                await run
            steps, error = caught.value.steps, caught.value
            assert isinstance(error.cause, ERRORS[kind])
        else:
            result = await run
            steps, error = result.steps, None
    statuses_seen = statuses(steps)
    expected = (stage, "step", "ok" if kind == "ok" else "failed")
    assert expected == statuses_seen[-1], steps
    if stage == "post":
        assert ("provider", "hook:m", "ok") == statuses_seen[0]
    if error is None and kind == "ok":
        assert "changed" == result.message["payload"]
        assert "en" == result.context["lang"]
    elif error is None:
        assert steps[-1].reason  # the error's reason
        want = "answer to Hello" if stage == "post" else "Hello"
        assert want == result.message["payload"]


# -- the table: validators' on_fail -------------------------------------------------------------


@pytest.mark.parametrize("on_fail", ["block", "warn", "ignore"])
@pytest.mark.parametrize("kind", ["ok", "reject", "timeout", "error"])
async def test_validator_on_fail(
    tmp_path: Path, nats_url: str, nats_client: Client, on_fail: str, kind: str
) -> None:
    """As the original: a reject, a timeout or an error is a failure; `block` stops the run
    (`ValidatorBlocked` with the validator's reason and details, or the error's reason and
    the error as cause), `warn` and `ignore` go on (`warned`, `ignored`)."""
    guard = ext("guard", "validator", timeout_ms=timeout_for(kind))
    policy = {"policy_id": "p", "validators": [{"id": "guard", "on_fail": on_fail}]}
    settings = settings_for(tmp_path, nats_url, [guard], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, guard["subject"], answer_with(VALIDATOR_REPLIES[kind])),
    ):
        run = inv.run_policy("p", MESSAGE, {})
        if kind != "ok" and on_fail == "block":
            with pytest.raises(ValidatorBlocked) as caught:
                await run
            blocked = caught.value
            assert [("validator", "guard", "rejected")] == statuses(blocked.steps)
            assert "guard" == blocked.extension_id
            if kind == "reject":
                assert ("pii_detected", {"pii_types": ["ssn"]}) == (
                    blocked.reason,
                    blocked.details,
                )
                assert blocked.cause is None
            else:
                assert isinstance(blocked.cause, ERRORS[kind])
                assert blocked.cause.reason == blocked.reason == blocked.steps[0].reason
            return
        result = await run
    status = (
        "ok" if kind == "ok" else {"block": "rejected", "warn": "warned"}.get(on_fail, "ignored")
    )
    assert [("validator", "guard", status)] == statuses(result.steps), result.steps
    assert MESSAGE == result.message
    assert result.provider_id is None


# -- the run as a whole -------------------------------------------------------------------------


async def test_pre_steps_chain_and_share_one_generated_trace_id(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Each pre step gets the message the previous one left and the merged context; the
    request carries the policy id and the item's config; the policy's tenant fills a context
    without one; one trace id, generated, goes to every step and into the result."""
    first, second = ext("first", "pre"), ext("second", "pre")
    policy = {"policy_id": "p", "tenant_id": "acme",
              "pre": [{"id": "first", "config": {"lowercase": True}}, {"id": "second"}]}  # fmt: skip
    settings = settings_for(tmp_path, nats_url, [first, second], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, first["subject"],
                answer_with({"payload": "one", "metadata": {"lang": "en"}})) as one,
        respond(nats_client, second["subject"], answer_with({"payload": {"payload": "two"}})) as two,
    ):  # fmt: skip
        result = await inv.run_policy("p", MESSAGE, {"channel": "web"})
    trace_id = result.context["trace_id"]
    assert isinstance(trace_id, str) and 32 == len(trace_id)
    assert {"trace_id": trace_id, "tenant_id": "acme", "channel": "web", "lang": "en"} == (
        result.context
    )
    assert {"payload": "two"} == result.message
    assert [("pre", "first", "ok"), ("pre", "second", "ok")] == statuses(result.steps)
    (sent_first,), (sent_second,) = one.requests, two.requests
    assert {
        "trace_id": trace_id,
        "tenant_id": "acme",
        "payload": MESSAGE,
        "metadata": {"channel": "web", "policy_id": "p", "config": {"lowercase": True}},
    } == sent_first
    assert {**MESSAGE, "payload": "one"} == sent_second["payload"]
    assert {"channel": "web", "lang": "en", "policy_id": "p"} == sent_second["metadata"]
    assert trace_id == sent_second["trace_id"]


async def test_callers_context_is_copied_and_its_ids_kept(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    pre = ext("pre", "pre")
    policy = {"policy_id": "p", "tenant_id": "acme", "pre": [{"id": "pre"}]}
    settings = settings_for(tmp_path, nats_url, [pre], policy)
    context = {"trace_id": "t-1", "tenant_id": "other"}
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, pre["subject"], answer_with({"metadata": {"lang": "en"}})) as seen,
    ):
        result = await inv.run_policy("p", MESSAGE, context)
    assert {"trace_id": "t-1", "tenant_id": "other"} == context
    assert ("t-1", "other") == (seen.requests[0]["trace_id"], seen.requests[0]["tenant_id"])
    assert {"trace_id": "t-1", "tenant_id": "other", "lang": "en"} == result.context


async def test_a_replys_metadata_cannot_set_dry_run_or_the_ids(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A pre reply whose metadata says `dry_run` (which makes `invoke` answer {} unsent)
    switches nothing off: the blocking validator after it is still asked and blocks, with
    the caller's ids; the reserved keys reach neither the context nor a request."""
    pre, guard = ext("pre", "pre"), ext("guard", "validator")
    policy = {"policy_id": "p", "pre": [{"id": "pre"}], "validators": [{"id": "guard"}]}
    settings = settings_for(tmp_path, nats_url, [pre, guard], policy)
    forged = {"dry_run": True, "trace_id": "forged", "tenant_id": "forged", "lang": "en"}
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, pre["subject"], answer_with({"metadata": forged})),
        respond(nats_client, guard["subject"], answer_with(VALIDATOR_REPLIES["reject"])) as seen,
    ):
        with pytest.raises(ValidatorBlocked) as caught:
            await inv.run_policy("p", MESSAGE, {"trace_id": "t-1", "tenant_id": "acme"})
    assert [("pre", "pre", "ok"), ("validator", "guard", "rejected")] == statuses(
        caught.value.steps
    )
    (asked,) = seen.requests
    assert ("t-1", "acme") == (asked["trace_id"], asked["tenant_id"])
    assert {"lang": "en", "policy_id": "p"} == asked["metadata"]


@pytest.mark.parametrize(
    ("context", "field"),
    [({"dry_run": True}, "context.dry_run"), ({"trace_id": "t" * 256}, "context.trace_id"),
     ({"tenant_id": 42}, "context.tenant_id")],
    ids=["dry-run", "long-trace-id", "tenant-not-a-string"],
)  # fmt: skip
async def test_a_context_the_check_refuses_raises_before_anything_is_sent(
    tmp_path: Path, nats_url: str, nats_client: Client, context: dict[str, Any], field: str
) -> None:
    """The caller's context is checked first (`context_problems`): a `dry_run` key (which
    would make every step answer {} unsent, every validator ok) or an id that is no short
    string raises InvalidRecord naming the field; no step is asked, no run is reported."""
    guard = ext("guard", "validator")
    policy = {"policy_id": "p", "validators": [{"id": "guard"}]}
    settings = settings_for(tmp_path, nats_url, [guard], policy)
    told: list[str] = []
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, guard["subject"], answer_with(VALIDATOR_REPLIES["reject"])) as seen,
    ):
        inv.pipeline.observers.append(lambda policy_id, outcome, *_: told.append(outcome))
        with pytest.raises(InvalidRecord) as caught:
            await inv.run_policy("p", MESSAGE, context)
    assert ("p", "context", [field]) == (
        caught.value.record,
        caught.value.kind,
        [f for f, _ in caught.value.problems],
    )
    if field == "context.dry_run":
        assert [DRY_RUN_REFUSED] == [m for _, m in caught.value.problems]
    assert ([], []) == (seen.requests, told)


@pytest.mark.parametrize("channel", ["web", "sms"])
async def test_when_runs_or_skips_an_item(
    tmp_path: Path, nats_url: str, nats_client: Client, channel: str
) -> None:
    """An item whose `when` matches the context runs; one whose `when` is false is `skipped`
    (for pre, validators and post alike) and sent nothing."""
    pre, guard, post = ext("pre", "pre"), ext("guard", "validator"), ext("post", "post")
    web_only = {"channel": ["web", "telegram"]}
    policy = {"policy_id": "p", "pre": [{"id": "pre", "when": web_only}],
              "validators": [{"id": "guard", "when": web_only}], "providers": ["hook:m"],
              "post": [{"id": "post", "when": web_only}]}  # fmt: skip
    settings = settings_for(tmp_path, nats_url, [pre, guard, post], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, pre["subject"], answer_with({})) as seen_pre,
        respond(nats_client, guard["subject"], answer_with({"status": "ok"})) as seen_guard,
        respond(nats_client, post["subject"], answer_with({})) as seen_post,
    ):
        result = await inv.run_policy("p", MESSAGE, {"channel": channel}, echo_provider)
    status = "ok" if channel == "web" else "skipped"
    assert [("pre", "pre", status), ("validator", "guard", status), ("provider", "hook:m", "ok"),
            ("post", "post", status)] == statuses(result.steps)  # fmt: skip
    sent = len(seen_pre.requests) + len(seen_guard.requests) + len(seen_post.requests)
    assert (3 if channel == "web" else 0) == sent
    if channel == "sms":
        assert {SKIPPED_REASON} == {s.reason for s in result.steps if s.stage != "provider"}


async def test_a_policy_without_providers_ends_after_its_validators(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """No providers: the message as pre left it, no provider, post not run (not listed)."""
    pre, post = ext("pre", "pre"), ext("post", "post")
    policy = {"policy_id": "p", "pre": [{"id": "pre"}], "post": [{"id": "post"}]}
    settings = settings_for(tmp_path, nats_url, [pre, post], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, pre["subject"], answer_with({"payload": "pre-made"})),
    ):
        result = await inv.run_policy("p", MESSAGE)
    assert [("pre", "pre", "ok")] == statuses(result.steps)
    assert (None, "pre-made") == (result.provider_id, result.message["payload"])


async def test_step_failed_carries_the_steps_so_far(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A required step that times out: `StepFailed` with every step so far, the failing one
    last with the timeout's reason, the timeout as cause (the API's 504)."""
    first, second = ext("first", "pre"), ext("second", "pre", timeout_ms=50)
    policy = {"policy_id": "p", "pre": [{"id": "first"}, {"id": "second"}]}
    settings = settings_for(tmp_path, nats_url, [first, second], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, first["subject"], answer_with({})),
        respond(nats_client, second["subject"], answer_with(None)),
    ):
        with pytest.raises(StepFailed) as caught:
            await inv.run_policy("p", MESSAGE)
    error = caught.value
    assert [("pre", "first", "ok"), ("pre", "second", "failed")] == statuses(error.steps)
    assert all(isinstance(s, Step) for s in error.steps)
    assert isinstance(error.cause, ExtensionTimeout)
    assert error.steps[-1].reason == error.cause.reason
    assert error.cause.reason in error.reason and "second" in error.reason
    assert "p" == error.policy_id
    assert error.steps[-1].latency_ms >= 50.0  # a lower bound: it waited for the timeout


async def test_a_disabled_or_unknown_extension_fails_its_step(
    tmp_path: Path, nats_url: str
) -> None:
    """ExtensionDisabled is an error like any other: an optional step fails and the run goes
    on; a required one stops it."""
    off = ext("off", "pre", enabled=False)
    policy = {"policy_id": "p", "pre": [{"id": "off", "mode": "optional"}]}
    strict = {"policy_id": "strict", "pre": [{"id": "off"}]}
    settings = settings_for(tmp_path, nats_url, [off], policy, strict)
    async with open_invoker(settings) as inv:
        result = await inv.run_policy("p", MESSAGE)
        with pytest.raises(StepFailed) as caught:
            await inv.run_policy("strict", MESSAGE)
    assert [Step("pre", "off", "failed", result.steps[0].latency_ms, "extension is disabled")] == (
        result.steps
    )
    assert [("pre", "off", "failed")] == statuses(caught.value.steps)


# What the retyped extension would answer if it were called: a reply its new type makes, which
# the old stage would take for a success (a pre's reply has no `status`: a validator's ok).
RETYPED_REPLIES = {"pre": {"payload": "from the pre"}, "post": {"output": "from the post"},
                   "validator": {"payload": "from the validator"}}  # fmt: skip


@pytest.mark.parametrize(
    ("stage", "now"), [("validator", "pre"), ("pre", "validator"), ("provider", "post")]
)
async def test_a_step_whose_extension_was_retyped_is_unavailable(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client, stage: str, now: str
) -> None:
    """The policy's `step` is deleted and recreated as an extension of another type (the
    policy stays stored, reported unusable): its step is not called, but fails as a missing
    extension does (ExtensionNotFound, saying what it is now): a blocking validator blocks, a
    required pre fails the run, a provider is passed over for the next."""
    field = {"validator": "validators", "pre": "pre", "provider": "providers"}[stage]
    item: Any = "step" if stage == "provider" else {"id": "step"}
    body: dict[str, Any] = {"policy_id": "p", field: [item]}
    if stage == "provider":
        body[field].append("good")
    before, after, good = ext("step", stage), ext("step", now), ext("good", "provider")
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, nats_url=nats_url,
        sync_interval_seconds=3600,
    )  # fmt: skip

    def parsed(data: dict[str, Any]) -> Any:
        return parse_extension(data, max_timeout_ms=60_000, max_retries=10)

    async with PostgresSource(settings) as db:
        await db.import_extensions([parsed(before), parsed(good)], "test")
        await db.import_policies([parse_policy(body, limits=PolicyLimits())], "test")
        async with (
            open_invoker(settings) as inv,
            respond(nats_client, after["subject"], answer_with(RETYPED_REPLIES[now])) as seen,
            respond(nats_client, good["subject"], answer_with({"output": "good answer"})),
        ):
            assert await db.delete_extension("step", "test")
            await db.import_extensions([parsed(after)], "test")
            await inv.registry.refresh(["step"])
            assert now == inv.registry.snapshot.by_id["step"].type
            assert ["p"] == list(inv.registry.snapshot.unusable_policies)
            run = inv.run_policy("p", MESSAGE)
            reason = f"is now a {now} extension, not a {stage}"
            if stage == "provider":
                result = await run
                assert [("provider", "step", "failed"), ("provider", "good", "ok")] == (
                    statuses(result.steps)
                )
                assert ("good", reason) == (result.provider_id, result.steps[0].reason)
            else:
                error = ValidatorBlocked if stage == "validator" else StepFailed
                with pytest.raises(error) as caught:
                    await run
                assert [(stage, "step", "rejected" if stage == "validator" else "failed")] == (
                    statuses(caught.value.steps)
                )
                assert isinstance(caught.value.cause, ExtensionNotFound)
                assert ("step", reason) == (
                    caught.value.cause.extension_id,
                    caught.value.cause.reason,
                )
                assert reason == caught.value.steps[0].reason
        assert [] == seen.requests


@pytest.mark.parametrize(("enabled", "error"), [(None, PolicyNotFound), (False, PolicyDisabled)])
async def test_policy_not_found_or_disabled(
    tmp_path: Path, nats_url: str, enabled: bool | None, error: type[PolicyError]
) -> None:
    policies = [] if enabled is None else [{"policy_id": "p", "enabled": enabled}]
    settings = settings_for(tmp_path, nats_url, [ext("x", "pre")], *policies)
    async with open_invoker(settings) as inv:
        with pytest.raises(error) as caught:
            await inv.run_policy("p", MESSAGE)
    assert ("p", []) == (caught.value.policy_id, caught.value.steps)


# -- validators together ------------------------------------------------------------------------


async def test_validators_are_all_in_flight_at_once(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Three validators: each responder holds its reply until all three requests have
    arrived, so the run can only finish if the three were asked together (a sequential run
    would wait on the first one's reply, which never comes until the deadline)."""
    guards = [ext(f"g{i}", "validator", timeout_ms=60_000) for i in range(3)]
    policy = {"policy_id": "p", "validators": [{"id": g["id"]} for g in guards]}
    settings = settings_for(tmp_path, nats_url, guards, policy)
    arrived = asyncio.Event()
    responders: list[Responder] = []

    def all_three_arrived() -> None:
        if sum(len(r.requests) for r in responders) == 3:
            arrived.set()

    async def answer(request: dict[str, Any]) -> bytes | None:
        all_three_arrived()
        await asyncio.wait_for(arrived.wait(), DEADLINE_S)
        return b'{"status": "ok"}'

    async with contextlib.AsyncExitStack() as stack:
        inv = await stack.enter_async_context(open_invoker(settings))
        for guard in guards:
            responders.append(
                await stack.enter_async_context(respond(nats_client, guard["subject"], answer))
            )
        result = await inv.run_policy("p", MESSAGE)
    assert arrived.is_set()
    assert [("validator", g["id"], "ok") for g in guards] == statuses(result.steps)


async def test_a_blocking_reject_cancels_the_slow_validators(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The first validator rejects at once: the run raises ValidatorBlocked while the two
    others still hold their replies (their responders saw the request), and lists only the
    blocking step. Their late replies, released afterwards, add no success and no failure to
    health or the breaker: the witness is a later direct call to each, whose reply (sent
    after the late one on the same connection) is the only call counted."""
    fast = ext("fast", "validator")
    slow = [ext(f"slow{i}", "validator", timeout_ms=60_000) for i in range(2)]
    policy = {"policy_id": "p", "validators": [{"id": "fast"}] + [{"id": s["id"]} for s in slow]}
    settings = settings_for(tmp_path, nats_url, [fast, *slow], policy, circuit_breaker_enabled=True)
    release = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        inv = await stack.enter_async_context(open_invoker(settings))
        await stack.enter_async_context(
            respond(nats_client, fast["subject"], answer_with(VALIDATOR_REPLIES["reject"]))
        )
        held = [
            await stack.enter_async_context(
                respond(nats_client, s["subject"], held_until(release, {"status": "ok"}))
            )
            for s in slow
        ]
        with pytest.raises(ValidatorBlocked) as caught:
            await inv.run_policy("p", MESSAGE)
        assert 0 == sum(h.replied for h in held)  # they had not answered when the run ended
        await wait_for(lambda: all(len(h.requests) == 1 for h in held), DEADLINE_S)
        release.set()
        await wait_for(lambda: all(h.replied == 1 for h in held), DEADLINE_S)
        for s in slow:
            assert (0, 0) == calls(inv, s["id"])
            await inv.invoke(s["id"], {"payload": {}})  # its reply follows the late one
            assert (1, 0) == calls(inv, s["id"])
            circuit = inv.breaker.snapshot(s["id"])
            assert (1, 0) == (circuit.window_calls, circuit.window_failures)
    assert [("validator", "fast", "rejected")] == statuses(caught.value.steps)
    assert ("pii_detected", "fast") == (caught.value.reason, caught.value.extension_id)
    assert (1, 0) == calls(inv, "fast")  # a reject is a good reply of the extension


async def test_validators_decide_as_a_sequential_run_would(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The second validator rejects at once, the first is still out: the outcome waits for
    the first. When it answers ok, the second blocks (both listed); when it rejects too, the
    first one is the blocking one and the second is not listed."""
    first, second = ext("first", "validator", timeout_ms=60_000), ext("second", "validator")
    policy = {"policy_id": "p", "validators": [{"id": "first"}, {"id": "second"}]}
    settings = settings_for(tmp_path, nats_url, [first, second], policy)
    verdict: dict[str, Any] = {"status": "ok"}
    release = asyncio.Event()

    async def first_answer(request: dict[str, Any]) -> bytes | None:
        await asyncio.wait_for(release.wait(), DEADLINE_S)
        return json.dumps(verdict).encode()

    second_reject = {"status": "reject", "reason": "second_says_no"}
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, first["subject"], first_answer) as seen_first,
        respond(nats_client, second["subject"], answer_with(second_reject)),
    ):
        for first_verdict, blocker in (({"status": "ok"}, "second"),
                                       ({"status": "reject", "reason": "first_says_no"}, "first")):  # fmt: skip
            verdict, asked = first_verdict, calls(inv, "second")[0] + 1
            release.clear()
            run = asyncio.create_task(inv.run_policy("p", MESSAGE))
            # the invoker has the second's reject (a good reply: counted as a success)...
            await wait_for(lambda: calls(inv, "second")[0] == asked, DEADLINE_S)  # noqa: B023
            await asyncio.sleep(0)
            assert not run.done()  # ...and that alone decides nothing while the first is out
            release.set()
            with pytest.raises(ValidatorBlocked) as caught:
                await run
            assert blocker == caught.value.extension_id
            if blocker == "second":
                assert [("validator", "first", "ok"), ("validator", "second", "rejected")] == (
                    statuses(caught.value.steps)
                )
                assert "second_says_no" == caught.value.reason
            else:
                assert [("validator", "first", "rejected")] == statuses(caught.value.steps)
                assert "first_says_no" == caught.value.reason
        assert 2 == len(seen_first.requests)


async def test_extension_supplied_reasons_are_bounded_everywhere_they_go(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A validator's reject reason and an extension error's reason are text of others: the
    step, the error and its log line get at most 200 characters of it, control characters
    escaped (a `warn` validator's log line too)."""
    guard, warn = ext("guard", "validator"), ext("warn_guard", "validator")
    huge = "r" * 5_000 + "\n\x1b[2J"
    shown = "r" * 200 + "... (5005 characters)"
    blocking = {"policy_id": "p", "validators": [{"id": "warn_guard", "on_fail": "warn"},
                                                 {"id": "guard"}]}  # fmt: skip
    hooked = {"policy_id": "h", "providers": ["hook:m"]}
    settings = settings_for(tmp_path, nats_url, [guard, warn], blocking, hooked)
    reject = answer_with({"status": "reject", "reason": huge})

    async def failing(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        raise InvalidResponse(name, huge, 1)

    async with (
        open_invoker(settings) as inv,
        respond(nats_client, guard["subject"], reject),
        respond(nats_client, warn["subject"], reject),
    ):
        with capture_logs() as logs, pytest.raises(ValidatorBlocked) as blocked:
            await inv.run_policy("p", MESSAGE)
        with pytest.raises(NoProvider) as no_provider:
            await inv.run_policy("h", MESSAGE, provider=failing)
    assert shown == blocked.value.reason
    assert [shown, shown] == [s.reason for s in blocked.value.steps]
    lines = [e for e in logs if e["event"] in ("validator_warned", "policy_run_blocked")]
    assert [shown, shown] == [e["reason"] for e in lines]
    assert shown == no_provider.value.steps[-1].reason
    assert no_provider.value.reason.endswith(shown)


async def test_warned_and_ignored_rejects_go_on_and_a_warn_is_logged(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    warn, ignore = ext("warn_guard", "validator"), ext("ignore_guard", "validator")
    policy = {"policy_id": "p", "validators": [{"id": "warn_guard", "on_fail": "warn"},
                                               {"id": "ignore_guard", "on_fail": "ignore"}]}  # fmt: skip
    settings = settings_for(tmp_path, nats_url, [warn, ignore], policy)
    reject = answer_with(VALIDATOR_REPLIES["reject"])
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, warn["subject"], reject),
        respond(nats_client, ignore["subject"], reject),
    ):
        with capture_logs() as logs:
            result = await inv.run_policy("p", MESSAGE, {"trace_id": "t-9"})
    assert [("validator", "warn_guard", "warned"), ("validator", "ignore_guard", "ignored")] == (
        statuses(result.steps)
    )
    warned = [e for e in logs if e["event"] == "validator_warned"]
    assert [
        {
            "event": "validator_warned",
            "log_level": "warning",
            "policy_id": "p",
            "stage": "validator",
            "step": "warn_guard",
            "reason": "pii_detected",
            "trace_id": "t-9",
            "tenant_id": None,
        }
    ] == warned
    assert not [e for e in logs if e["event"].startswith("policy_run")]


async def test_a_cancelled_run_cancels_its_validators(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The caller gives up while two validators are out: both calls are cancelled (no task
    outlives the test, the conftest checks) and count in no health figure."""
    guards = [ext(f"g{i}", "validator", timeout_ms=60_000) for i in range(2)]
    policy = {"policy_id": "p", "validators": [{"id": g["id"]} for g in guards]}
    settings = settings_for(tmp_path, nats_url, guards, policy)
    never = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        inv = await stack.enter_async_context(open_invoker(settings))
        held = [
            await stack.enter_async_context(
                respond(nats_client, g["subject"], held_until(never, {"status": "ok"}))
            )
            for g in guards
        ]
        run = asyncio.create_task(inv.run_policy("p", MESSAGE))
        await wait_for(lambda: all(len(h.requests) == 1 for h in held), DEADLINE_S)
        run.cancel()
        with pytest.raises(asyncio.CancelledError):
            await run
        assert [(0, 0), (0, 0)] == [calls(inv, g["id"]) for g in guards]


# -- providers ----------------------------------------------------------------------------------


async def test_providers_fall_back_past_an_open_circuit_and_a_failure(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The first provider's circuit is open, the second answers no JSON, the third answers:
    two failed steps then an ok one; its output is the payload post sees, and it is named."""
    tripped, broken, good = (ext(n, "provider") for n in ("tripped", "broken", "good"))
    post = ext("post", "post")
    policy = {
        "policy_id": "p",
        "providers": ["tripped", "broken", "good"],
        "post": [{"id": "post"}],
    }
    settings = settings_for(
        tmp_path, nats_url, [tripped, broken, good, post], policy, circuit_breaker_enabled=True
    )
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, tripped["subject"], answer_with({"output": "never"})) as seen_tripped,
        respond(nats_client, broken["subject"], answer_with(b"oops")),
        respond(nats_client, good["subject"],
                answer_with({"output": "Summary", "metadata": {"model": "m1"}})) as seen_good,
        respond(nats_client, post["subject"], answer_with({})) as seen_post,
    ):  # fmt: skip
        inv.breaker.force_open("tripped")
        result = await inv.run_policy("p", MESSAGE, {"trace_id": "t-1"})
    assert [("provider", "tripped", "failed"), ("provider", "broken", "failed"),
            ("provider", "good", "ok"), ("post", "post", "ok")] == statuses(result.steps)  # fmt: skip
    assert "circuit" in (result.steps[0].reason or "")
    assert "not a JSON object" in (result.steps[1].reason or "")
    assert not seen_tripped.requests
    assert "good" == result.provider_id
    expected = {**MESSAGE, "payload": "Summary",
                "metadata": {"channel": "web", "model": "m1", "provider_id": "good"}}  # fmt: skip
    assert expected == result.message
    assert expected == seen_post.requests[0]["payload"]
    (asked,) = seen_good.requests  # the provider fields of the wire contract
    assert ("good", "Hello", MESSAGE) == (asked["provider_id"], asked["prompt"], asked["payload"])


async def test_the_provider_hook_serves_name_model_entries(tmp_path: Path, nats_url: str) -> None:
    """A `name:model` entry calls the hook with the name, the message and the context; its
    reply is a provider's."""
    policy = {"policy_id": "p", "tenant_id": "acme", "providers": ["openai:gpt-4.1-mini"]}
    settings = settings_for(tmp_path, nats_url, [ext("x", "pre")], policy)
    seen: list[tuple[str, dict[str, Any], dict[str, Any]]] = []

    async def hook(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        seen.append((name, message, context))
        return {"output": "hi", "usage": {"total_tokens": 2}}

    async with open_invoker(settings) as inv:
        result = await inv.run_policy("p", MESSAGE, {"trace_id": "t-1"}, provider=hook)
    assert [("openai:gpt-4.1-mini", MESSAGE, {"trace_id": "t-1", "tenant_id": "acme"})] == seen
    assert "openai:gpt-4.1-mini" == result.provider_id
    assert {**MESSAGE, "payload": "hi",
            "metadata": {"channel": "web", "provider_id": "openai:gpt-4.1-mini"}} == result.message  # fmt: skip
    assert [("provider", "openai:gpt-4.1-mini", "ok")] == statuses(result.steps)


async def test_a_hook_entry_without_hook_or_with_a_failing_one_is_passed_over(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """No hook: that entry fails, saying so, and the next is tried. A hook that raises, or
    answers no object, fails its entry (the exception's class named, not its text)."""
    good = ext("good", "provider")
    policy = {"policy_id": "p", "providers": ["openai:gpt", "good"]}
    settings = settings_for(tmp_path, nats_url, [good], policy)

    async def raising(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        raise RuntimeError("secret-key-in-text")

    async def not_an_object(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        return ["no"]

    async with (
        open_invoker(settings) as inv,
        respond(nats_client, good["subject"], answer_with({"output": "ok"})),
    ):
        runs = [
            await inv.run_policy("p", MESSAGE, provider=h) for h in (None, raising, not_an_object)
        ]
    for result in runs:
        assert [("provider", "openai:gpt", "failed"), ("provider", "good", "ok")] == statuses(
            result.steps
        )
        assert "good" == result.provider_id
    reasons = [r.steps[0].reason or "" for r in runs]
    assert NO_HOOK_REASON == reasons[0]
    assert "RuntimeError" in reasons[1] and "secret" not in reasons[1]
    assert "list" in reasons[2]


async def test_a_hook_that_does_not_answer_times_out_like_an_extension(
    tmp_path: Path, nats_url: str
) -> None:
    """A hook call is bounded by `extension_max_timeout_ms`: a hook that never answers is a
    failed entry with an ExtensionTimeout (the API's 504, not a 502) and the next entry is
    tried; a hook's own TimeoutError reads the same way."""
    policy = {"policy_id": "p", "providers": ["stuck:m", "own:m", "good:m"]}
    only_stuck = {"policy_id": "stuck", "providers": ["stuck:m"]}
    records = [ext("x", "pre", timeout_ms=50)]
    settings = settings_for(tmp_path, nats_url, records, policy, only_stuck,
                            extension_max_timeout_ms=50)  # fmt: skip

    async def hook(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        if name == "stuck:m":
            await asyncio.Event().wait()
        if name == "own:m":
            raise TimeoutError
        return {"output": "answer"}

    async with open_invoker(settings) as inv:
        result = await inv.run_policy("p", MESSAGE, provider=hook)
        with pytest.raises(NoProvider) as caught:
            await inv.run_policy("stuck", MESSAGE, provider=hook)
    assert [("provider", "stuck:m", "failed"), ("provider", "own:m", "failed"),
            ("provider", "good:m", "ok")] == statuses(result.steps)  # fmt: skip
    assert "within 50 ms" in (result.steps[0].reason or "")
    assert result.steps[0].latency_ms >= 50.0  # a lower bound: it waited for the bound
    assert isinstance(caught.value.cause, ExtensionTimeout)
    assert ("stuck:m", 1) == (caught.value.cause.extension_id, caught.value.cause.attempts)


async def test_a_hook_changing_its_arguments_in_place_changes_nothing_of_the_run(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The hook gets copies: what it writes into the message or the context reaches neither
    post's request nor the result (the run's request metadata is cached per context)."""
    pre, post = ext("pre", "pre"), ext("post", "post")
    policy = {"policy_id": "p", "pre": [{"id": "pre"}], "providers": ["hook:m"],
              "post": [{"id": "post"}]}  # fmt: skip
    settings = settings_for(tmp_path, nats_url, [pre, post], policy)

    async def meddling(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        message["leaked"] = True
        context["leaked"] = True
        return {"output": "answer"}

    async with (
        open_invoker(settings) as inv,
        respond(nats_client, pre["subject"], answer_with({})),
        respond(nats_client, post["subject"], answer_with({})) as seen_post,
    ):
        result = await inv.run_policy("p", MESSAGE, {"trace_id": "t-1"}, provider=meddling)
    (asked,) = seen_post.requests
    assert "leaked" not in asked["payload"] and "leaked" not in asked["metadata"]
    assert {"trace_id": "t-1"} == result.context
    assert "leaked" not in result.message


async def test_no_provider_carries_the_steps_and_the_last_error(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Every provider passed over: NoProvider lists each attempt; its cause is the last
    extension error (here an open circuit: the API's 503)."""
    broken, tripped = ext("broken", "provider"), ext("tripped", "provider")
    policy = {"policy_id": "p", "providers": ["broken", "tripped", "openai:gpt"]}
    settings = settings_for(
        tmp_path, nats_url, [broken, tripped], policy, circuit_breaker_enabled=True
    )
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, broken["subject"], answer_with(b"oops")),
    ):
        inv.breaker.force_open("tripped")
        with pytest.raises(NoProvider) as caught:
            await inv.run_policy("p", MESSAGE)
    error = caught.value
    assert [("provider", "broken", "failed"), ("provider", "tripped", "failed"),
            ("provider", "openai:gpt", "failed")] == statuses(error.steps)  # fmt: skip
    assert isinstance(error.cause, CircuitOpen) and "tripped" == error.cause.extension_id
    assert "tripped" in error.reason


async def test_no_provider_without_any_extension_error_has_no_cause(
    tmp_path: Path, nats_url: str
) -> None:
    policy = {"policy_id": "p", "providers": ["openai:gpt"]}
    settings = settings_for(tmp_path, nats_url, [ext("x", "pre")], policy)
    async with open_invoker(settings) as inv:
        with pytest.raises(NoProvider) as caught:
            await inv.run_policy("p", MESSAGE)
    assert caught.value.cause is None
    assert [Step("provider", "openai:gpt", "failed", 0.0, NO_HOOK_REASON)] == caught.value.steps


async def test_no_responders_on_a_provider_is_a_failure_of_that_provider(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    gone, good = ext("gone", "provider"), ext("good", "provider")
    policy = {"policy_id": "p", "providers": ["gone", "good"]}
    settings = settings_for(tmp_path, nats_url, [gone, good], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, good["subject"], answer_with({"output": "ok"})),
    ):
        result = await inv.run_policy("p", MESSAGE)
    assert "good" == result.provider_id
    assert "no responders" in (result.steps[0].reason or "")
    assert (0, 1) == calls(inv, "gone")


# -- logs, the result, the samples ------------------------------------------------------------


async def test_a_blocked_run_logs_one_info_line_with_its_step(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    guard = ext("guard", "validator")
    policy = {"policy_id": "p", "validators": [{"id": "guard"}]}
    settings = settings_for(tmp_path, nats_url, [guard], policy)
    async with (
        open_invoker(settings) as inv,
        respond(nats_client, guard["subject"], answer_with(VALIDATOR_REPLIES["reject"])),
    ):
        with capture_logs() as logs, pytest.raises(ValidatorBlocked):
            await inv.run_policy("p", MESSAGE, {"trace_id": "t-2", "tenant_id": "acme"})
    assert [
        {
            "event": "policy_run_blocked",
            "log_level": "info",
            "policy_id": "p",
            "outcome": "blocked",
            "stage": "validator",
            "step": "guard",
            "reason": "pii_detected",
            "trace_id": "t-2",
            "tenant_id": "acme",
        }
    ] == [e for e in logs if e["event"].startswith("policy_run")]


async def test_a_failed_run_logs_one_warning_with_its_step(tmp_path: Path, nats_url: str) -> None:
    gone = ext("gone", "pre")  # nothing answers its subject
    policy = {"policy_id": "p", "pre": [{"id": "gone"}]}
    async with open_invoker(settings_for(tmp_path, nats_url, [gone], policy)) as inv:
        with capture_logs() as logs, pytest.raises(StepFailed):
            await inv.run_policy("p", MESSAGE, {"trace_id": "t-3"})
    [line] = [e for e in logs if e["event"].startswith("policy_run")]
    assert ("policy_run_failed", "warning", "step_failed", "pre", "gone") == (
        line["event"],
        line["log_level"],
        line["outcome"],
        line["stage"],
        line["step"],
    )
    assert "no responders" in line["reason"]


async def test_an_observer_that_raises_changes_no_run(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """An observer that raises is logged (its exception's class, not its text) and passed
    over: a good run still answers its result, a blocked one still raises ValidatorBlocked,
    and the observers after it still hear of both."""
    guard = ext("guard", "validator")
    policy = {"policy_id": "p", "validators": [{"id": "guard"}]}
    settings = settings_for(tmp_path, nats_url, [guard], policy)
    verdicts = [b'{"status": "ok"}', json.dumps(VALIDATOR_REPLIES["reject"]).encode()]
    told: list[str] = []

    def broken(policy_id: str, outcome: str, seconds: float, steps: Any) -> None:
        raise RuntimeError("secret-in-text")

    async def verdict(request: dict[str, Any]) -> bytes:
        return verdicts.pop(0)

    async with (
        open_invoker(settings) as inv,
        respond(nats_client, guard["subject"], verdict),
    ):
        inv.pipeline.observers[:] = [broken, lambda _, outcome, *__: told.append(outcome)]
        with capture_logs() as logs:
            result = await inv.run_policy("p", MESSAGE)
            with pytest.raises(ValidatorBlocked):
                await inv.run_policy("p", MESSAGE)
    assert [("validator", "guard", "ok")] == statuses(result.steps)
    assert ["ok", "blocked"] == told
    failed = [e for e in logs if e["event"] == "policy_observer_failed"]
    assert [("ok", "RuntimeError"), ("blocked", "RuntimeError")] == [
        (e["outcome"], e["error"]) for e in failed
    ]
    assert "secret" not in repr(failed)


async def test_result_as_dict(tmp_path: Path, nats_url: str) -> None:
    policy = {"policy_id": "p", "providers": ["hook:m"]}
    settings = settings_for(tmp_path, nats_url, [ext("x", "pre")], policy)
    async with open_invoker(settings) as inv:
        result = await inv.run_policy("p", MESSAGE, {"trace_id": "t"}, echo_provider)
    assert isinstance(result, PolicyResult)
    plain = result.as_dict()
    assert {
        "policy_id": "p",
        "message": result.message,
        "context": {"trace_id": "t"},
        "provider_id": "hook:m",
        "steps": [result.steps[0].as_dict()],
    } == plain
    assert "provider" == plain["steps"][0]["stage"]
    json.dumps(plain)


async def test_the_bundled_policy_over_the_sample_extensions(
    tmp_path: Path, nats_url: str, nats_client: Client, sample_extensions: SampleRunner
) -> None:
    """support_en end to end: normalize_text, pii_guard, test_provider, mask_pii. A message
    with a card number is blocked by pii_guard (reason pii_detected)."""
    bundled = Path(__file__).parents[1] / "src/extreg/fixtures/policies/support_en.json"
    policy = json.loads(bundled.read_text("utf-8"))
    records = [{**r, "timeout_ms": REPLY_TIMEOUT_MS} for r in SAMPLE_RECORDS]
    settings = settings_for(tmp_path, nats_url, records, policy)
    async with open_invoker(settings) as inv:
        result = await inv.run_policy(
            "support_en", {**MESSAGE, "payload": "  Mail JO@EX.COM  please "}, {"trace_id": "t"}
        )
        with pytest.raises(ValidatorBlocked) as caught:
            await inv.run_policy("support_en", {**MESSAGE, "payload": "card 4111 1111 1111 1111"})
    assert [("pre", "normalize_text", "ok"), ("validator", "pii_guard", "ok"),
            ("provider", "test_provider", "ok"), ("post", "mask_pii", "ok")] == statuses(result.steps)  # fmt: skip
    assert "test_provider" == result.provider_id
    assert "Test response: mail [EMAIL_MASKED] please" == result.message["payload"]
    assert "en" == result.context["detected_lang"]
    assert ("pii_detected", "pii_guard") == (caught.value.reason, caught.value.extension_id)
    assert [("pre", "normalize_text", "ok"), ("validator", "pii_guard", "rejected")] == statuses(
        caught.value.steps
    )
