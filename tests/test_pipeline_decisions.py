"""The pipeline's pure decisions (`extreg.core.pipeline`): what a step sends, what a reply does
to the message and context, what a validator's answer means, when the validators' outcome is
certain, and what a dry run lists. No I/O: the runner over NATS is in test_pipeline.py."""

from __future__ import annotations

from typing import Any

import pytest

from extreg.core.pipeline import (
    DRY_RUN_REFUSED,
    RESERVED,
    SKIPPED_REASON,
    Step,
    Verdict,
    apply_reply,
    bounded,
    context_problems,
    failed_status,
    plan,
    provider_message,
    settle,
    step_metadata,
    step_request,
    verdict_of,
    when_matches,
)
from extreg.core.policy import Policy, StepItem, ValidatorItem

MESSAGE = {"message_id": "m-1", "payload": "Hello", "metadata": {"channel": "web"}}

OK, REJECT = Verdict(True), Verdict(False, "pii_detected")


def validators(*on_fail: str) -> tuple[ValidatorItem, ...]:
    return tuple(ValidatorItem(f"v{i}", on_fail=f) for i, f in enumerate(on_fail))  # type: ignore[arg-type]


# -- step_metadata and step_request ----------------------------------------------------------


def test_request_carries_the_message_the_context_but_its_ids_and_the_policy() -> None:
    """The message is the payload; the context minus trace and tenant ids (the envelope's own
    fields) is the metadata, with the policy id and the item's config."""
    metadata = step_metadata({"trace_id": "t", "tenant_id": "acme", "lang": "en"}, "support_en")
    assert {
        "payload": MESSAGE,
        "metadata": {"lang": "en", "policy_id": "support_en", "config": {"lowercase": True}},
    } == step_request(MESSAGE, metadata, {"lowercase": True})


def test_request_without_config_has_no_config_key_and_copies_nothing() -> None:
    """A request is only encoded: the message goes in as it is, and the steps of one context
    share its `step_metadata`; a config makes a new metadata, leaving the shared one be."""
    metadata = step_metadata({"trace_id": "t", "lang": "en"}, "p")
    assert {"lang": "en", "policy_id": "p"} == metadata
    request = step_request(MESSAGE, metadata, {})
    assert request["payload"] is MESSAGE and request["metadata"] is metadata
    assert {"policy_id": "p"} == step_request(MESSAGE, step_metadata({}, "p"), {})["metadata"]
    assert {"lang": "en", "policy_id": "p", "config": {"x": 1}} == (
        step_request(MESSAGE, metadata, {"x": 1})["metadata"]
    )
    assert {"lang": "en", "policy_id": "p"} == metadata


# -- context_problems -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "problems"),
    [
        ({}, []),
        ({"trace_id": "t-1", "tenant_id": "acme", "channel": "web"}, []),
        ({"trace_id": None, "tenant_id": None}, []),
        ({"trace_id": "t" * 255}, []),
        ({"trace_id": "t" * 256}, [("context.trace_id", "must be a string of at most 255 characters")]),
        ({"tenant_id": 7}, [("context.tenant_id", "must be a string of at most 255 characters")]),
        ({"dry_run": True}, [("context.dry_run", DRY_RUN_REFUSED)]),
        ({"dry_run": False}, [("context.dry_run", DRY_RUN_REFUSED)]),
        ({"trace_id": ["t"], "dry_run": 1},
         [("context.trace_id", "must be a string of at most 255 characters"),
          ("context.dry_run", DRY_RUN_REFUSED)]),
    ],
    ids=["empty", "good", "none-is-absent", "255", "256", "not-a-string", "dry-run",
         "dry-run-false", "both"],
)  # fmt: skip
def test_context_problems(context: dict[str, Any], problems: list[tuple[str, str]]) -> None:
    """The ids must be short strings when given; `dry_run` is refused whatever its value,
    pointing at the dry run that sends nothing."""
    assert problems == context_problems(context)


def test_dry_run_is_refused_with_a_pointer_to_the_dry_run() -> None:
    assert "dry-run" in DRY_RUN_REFUSED and "core.pipeline.plan" in DRY_RUN_REFUSED
    assert {"trace_id", "tenant_id", "dry_run"} == RESERVED


# -- apply_reply ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "message", "context"),
    [
        ({}, MESSAGE, {"lang": "en"}),
        ({"payload": {"payload": "x"}}, {"payload": "x"}, {"lang": "en"}),
        ({"payload": "bye"}, {**MESSAGE, "payload": "bye"}, {"lang": "en"}),
        ({"payload": 42}, MESSAGE, {"lang": "en"}),
        ({"metadata": {"detected_lang": "fr"}}, MESSAGE, {"lang": "en", "detected_lang": "fr"}),
        ({"metadata": {"lang": "de", "trace_id": "forged"}}, MESSAGE, {"lang": "de"}),
        ({"metadata": {"dry_run": True, "tenant_id": "x"}}, MESSAGE, {"lang": "en"}),
        ({"metadata": "not an object"}, MESSAGE, {"lang": "en"}),
    ],
    ids=["empty", "dict-payload", "string-payload", "other-payload", "metadata-merged",
         "ids-not-overwritten", "dry-run-not-set", "non-dict-metadata"],
)  # fmt: skip
def test_apply_reply(reply: dict[str, Any], message: Any, context: dict[str, Any]) -> None:
    """A reply's dict payload replaces the message, a string becomes its `payload` field,
    anything else leaves it; its metadata is merged into the context, but the reserved keys
    (the ids, and `dry_run`, which would make every later step answer {} unsent)."""
    got_message, got_context = apply_reply(dict(MESSAGE), {"lang": "en"}, reply)
    assert (message, context) == (got_message, got_context)


def test_apply_reply_leaves_the_inputs_unchanged() -> None:
    message, context = dict(MESSAGE), {"lang": "en"}
    apply_reply(message, context, {"payload": "bye", "metadata": {"x": "1"}})
    assert (MESSAGE, {"lang": "en"}) == (message, context)


def test_apply_reply_returns_what_it_did_not_change_as_is() -> None:
    """An empty or missing metadata makes no new context (the runner then reuses the
    context's request metadata)."""
    message, context = dict(MESSAGE), {"lang": "en"}
    replies: list[dict[str, Any]] = [{}, {"metadata": {}}, {"payload": None}]
    for reply in replies:
        got_message, got_context = apply_reply(message, context, reply)
        assert (message, context) == (got_message, got_context)
        assert got_message is message and got_context is context


# -- provider_message ---------------------------------------------------------------------------


def test_provider_output_becomes_the_payload_and_the_provider_is_named() -> None:
    reply = {"output": "Summary", "metadata": {"model": "m1"}, "usage": {"total_tokens": 3}}
    assert {
        "message_id": "m-1",
        "payload": "Summary",
        "metadata": {"channel": "web", "model": "m1", "provider_id": "prov"},
    } == provider_message(MESSAGE, reply, "prov")


def test_provider_message_without_metadata_anywhere() -> None:
    assert {"payload": None, "metadata": {"provider_id": "p"}} == provider_message({}, {}, "p")


# -- verdict_of -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "verdict"),
    [
        ({}, Verdict(True)),
        ({"status": "ok", "reason": "ignored"}, Verdict(True)),
        ({"status": "reject", "reason": "pii_detected", "details": {"n": 1}},
         Verdict(False, "pii_detected", {"n": 1})),
        ({"status": "reject"}, Verdict(False, "rejected")),
        ({"status": "reject", "reason": 7}, Verdict(False, "7")),
        ({"status": "maybe", "reason": "x"}, Verdict(False, "unknown validator status 'maybe'")),
        ({"status": None}, Verdict(False, "unknown validator status 'None'")),
    ],
    ids=["no-status", "ok", "reject", "reject-no-reason", "reason-not-text", "unknown-status",
         "null-status"],
)  # fmt: skip
def test_verdict_of(reply: dict[str, Any], verdict: Verdict) -> None:
    """No status is ok; `reject` carries reason and details; any other status fails closed."""
    assert verdict == verdict_of(reply)


def test_a_validators_reason_is_bounded_and_made_printable() -> None:
    """The reason is the extension's text: it reaches logs, steps and answers at most 200
    characters long (saying how long it was), control characters escaped."""
    verdict = verdict_of({"status": "reject", "reason": "x" * 10_000 + "\n\x1b[31m"})
    assert verdict.reason == "x" * 200 + "... (10006 characters)"
    assert "\\n\\x1b" == verdict_of({"status": "reject", "reason": "\n\x1b"}).reason
    assert "pii_detected" == bounded("pii_detected")
    assert 200 + len("... (201 characters)") == len(bounded("é" * 201))


# -- settle -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("on_fail", "verdicts", "expected"),
    [
        (("block", "block", "block"), [None, None, None], None),
        (("block", "block", "block"), [OK, OK, OK], 3),
        (("block", "block", "block"), [REJECT, None, None], 0),
        (("block", "block", "block"), [None, REJECT, None], None),
        (("block", "block", "block"), [OK, REJECT, None], 1),
        (("block", "block", "block"), [OK, OK, None], None),
        (("warn", "ignore", "block"), [REJECT, REJECT, OK], 3),
        (("warn", "block", "block"), [REJECT, None, REJECT], None),
        (("warn", "block", "block"), [REJECT, OK, REJECT], 2),
        (("block", "warn"), [OK, REJECT], 2),
        ((), [], 0),
    ],
    ids=["all-pending", "all-ok", "first-blocks", "later-blocks-earlier-pending",
         "second-blocks", "last-pending", "warn-ignore-go-on", "pending-before-block",
         "third-blocks", "warn-last", "none"],
)  # fmt: skip
def test_settle(
    on_fail: tuple[str, ...], verdicts: list[Verdict | None], expected: int | None
) -> None:
    """Certain once every answer before the first blocking reject is in (a sequential run
    stops there); a pending answer before it keeps the outcome open."""
    assert expected == settle(validators(*on_fail), verdicts)


@pytest.mark.parametrize(
    ("on_fail", "status"), [("block", "rejected"), ("warn", "warned"), ("ignore", "ignored")]
)
def test_failed_status(on_fail: str, status: str) -> None:
    assert status == failed_status(validators(on_fail)[0])


# -- when and plan ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("when", "context", "matches"),
    [
        ({}, {}, True),
        ({"channel": ["web", "telegram"]}, {"channel": "web"}, True),
        ({"channel": ["web", "telegram"]}, {"channel": "sms"}, False),
        ({"channel": "web"}, {}, False),
        ({"channel": "web", "tenant_id": "acme"}, {"channel": "web", "tenant_id": "acme"}, True),
        ({"channel": "web", "tenant_id": "acme"}, {"channel": "web", "tenant_id": "x"}, False),
    ],
)
def test_when_matches_like_routing_rules(
    when: dict[str, Any], context: dict[str, Any], matches: bool
) -> None:
    assert matches is when_matches(when, context)


def test_plan_lists_every_step_would_run_or_skipped() -> None:
    policy = Policy(
        "p",
        pre=(StepItem("n"), StepItem("only_sms", when={"channel": "sms"})),
        validators=(ValidatorItem("g"),),
        providers=("prov", "openai:gpt-4.1-mini"),
        post=(StepItem("m"),),
    )
    assert [
        Step("pre", "n", "would_run"),
        Step("pre", "only_sms", "skipped", reason=SKIPPED_REASON),
        Step("validator", "g", "would_run"),
        Step("provider", "prov", "would_run"),
        Step("provider", "openai:gpt-4.1-mini", "would_run"),
        Step("post", "m", "would_run"),
    ] == plan(policy, {"channel": "web"})


def test_plan_without_providers_ends_after_the_validators() -> None:
    policy = Policy("p", pre=(StepItem("n"),), post=(StepItem("m"),))
    assert [Step("pre", "n", "would_run")] == plan(policy, {})


def test_step_as_dict_rounds_the_latency() -> None:
    assert {
        "stage": "pre",
        "id": "n",
        "status": "ok",
        "latency_ms": 1.235,
        "reason": None,
    } == Step("pre", "n", "ok", 1.23456).as_dict()
