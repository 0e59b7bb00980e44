"""The invoker against a real NATS server: the wire contract, retries, limits, routing, health,
the breaker on the call path, and a NATS outage. Registries run on fixtures here; the database
side (health persistence, automation) is in test_health_store.py and test_automation.py."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from helpers import make_settings
from invoke_helpers import (
    FakeClock,
    constant,
    fixture_settings,
    listen,
    open_invoker,
    subject,
    wait_for,
)
from nats.aio.client import Client

from extreg import (
    CircuitOpen,
    ExtensionDisabled,
    ExtensionNotFound,
    ExtensionTimeout,
    InvalidResponse,
    InvocationError,
    MaxRetriesExceeded,
    PayloadTooLarge,
)
from extreg.adapters.nats import subscriptions_active
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import Extension, parse_extension
from extreg.invoke import TransportUnavailable
from extreg.local.natsserver import NatsServer
from extreg.local.samples import Flaky, SampleRunner

MESSAGE = {"message_id": "m-1", "message_type": "chat", "payload": "  Hello   WORLD  ",
           "metadata": {"channel": "telegram"}}  # fmt: skip
CONTEXT = {"trace_id": "t-1", "tenant_id": "acme"}


def rec(ext_id: str, on: str, **values: Any) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": 200, **values}


# -- the reference extensions ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("ext_id", "payload", "expected"),
    [
        ("normalize_text", MESSAGE,
         {"payload": {**MESSAGE, "payload": "hello world",
                      "metadata": {"channel": "telegram", "normalized": "true"}},
          "metadata": {"detected_lang": "en"}}),
        ("pii_guard", {**MESSAGE, "payload": "my card is 4111 1111 1111 1111"},
         {"status": "reject", "reason": "pii_detected", "details": {"pii_types": ["card_number"]}}),
        ("pii_guard", MESSAGE, {"status": "ok"}),
        ("mask_pii", {**MESSAGE, "payload": "Call 555-123-4567 or mail jo@ex.com; "
                                            "card 4111-1111-1111-1111, ssn 123-45-6789"},
         {"payload": {**MESSAGE, "payload": "Call [PHONE_MASKED] or mail [EMAIL_MASKED]; "
                                            "card [CARD_MASKED], ssn [SSN_MASKED]",
                      "metadata": {"channel": "telegram", "pii_masked": "true"}}}),
        ("test_provider", {"prompt": "Summarise this ticket"},
         {"provider_id": "test_provider", "output": "Test response: Summarise this ticket",
          "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
          "metadata": {"model": "test-echo-1", "finish_reason": "stop"}}),
    ],
)  # fmt: skip
async def test_reference_extensions(
    tmp_path: Path,
    nats_url: str,
    sample_extensions: SampleRunner,
    ext_id: str,
    payload: Any,
    expected: dict[str, Any],
) -> None:
    """Each reference extension, called through the invoker, answers exactly as the contract
    says."""
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        reply = await inv.invoke(ext_id, {"payload": payload, "metadata": {"lang": "en"}}, CONTEXT)
    assert expected == reply


async def test_envelope_and_headers(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """The extension receives the contract's envelope, with trace_id and tenant_id also as
    NATS headers; ids missing from the context come from the request."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on))
    async with listen(nats_client, on, constant(b"{}")) as seen, open_invoker(settings) as inv:
        await inv.invoke("x", {"payload": [1], "metadata": {"k": "v"}}, CONTEXT)
        await inv.invoke("x", {"payload": 2, "trace_id": "t-9", "tenant_id": "other"}, {})
    first, second = seen.messages
    assert {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "payload": [1],
        "metadata": {"k": "v"},
    } == msgspec.json.decode(first.data)
    assert {"trace_id": "t-1", "tenant_id": "acme"} == first.headers
    assert {
        "trace_id": "t-9",
        "tenant_id": "other",
        "payload": 2,
        "metadata": {},
    } == msgspec.json.decode(second.data)
    assert {"trace_id": "t-9", "tenant_id": "other"} == second.headers


def original_test_provider(msg: Any) -> bytes:
    """The original's reference test_provider: it reads `prompt` at the top level only."""
    prompt = msgspec.json.decode(msg.data).get("prompt") or ""
    return msgspec.json.encode(
        {
            "provider_id": "test_provider",
            "output": f"Mock response to: {prompt}",
            "usage": {},
            "metadata": {},
        }
    )


async def test_provider_request_carries_the_original_fields(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A provider gets the common envelope plus the original's provider fields: its id as
    `provider_id`, the message text as `prompt`, the request's `parameters` ({} without) and
    the request metadata as `context`; a pre extension gets the plain envelope."""
    prov_on, pre_on = subject(), subject()
    settings = fixture_settings(
        tmp_path, nats_url, rec("prov", prov_on, type="provider"), rec("pre", pre_on)
    )
    request = {"payload": MESSAGE, "metadata": {"lang": "en"}, "parameters": {"temperature": 0.2}}
    async with listen(nats_client, prov_on, constant(b"{}")) as prov, \
            listen(nats_client, pre_on, constant(b"{}")) as pre, \
            open_invoker(settings) as inv:  # fmt: skip
        await inv.invoke("prov", request, CONTEXT)
        await inv.invoke("prov", {"payload": "bare text"}, {})
        await inv.invoke("prov", {"payload": {"blocks": [1]}}, {})
        await inv.invoke("pre", request, CONTEXT)
    first, bare, no_text = (msgspec.json.decode(m.data) for m in prov.messages)
    assert {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "payload": MESSAGE,
        "metadata": {"lang": "en"},
        "provider_id": "prov",
        "prompt": "  Hello   WORLD  ",
        "parameters": {"temperature": 0.2},
        "context": {"lang": "en"},
    } == first
    assert ("bare text", {}, {}) == (bare["prompt"], bare["parameters"], bare["context"])
    assert no_text["prompt"] is None
    assert {"trace_id", "tenant_id", "payload", "metadata"} == set(
        msgspec.json.decode(pre.messages[0].data)
    )


async def test_original_reference_test_provider_answers_the_message_text(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The original's reference test_provider, called through the invoker with a message,
    answers an output built from the message text (not "Mock response to: " and nothing)."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("orig", on, type="provider"))
    message = {**MESSAGE, "payload": "Summarise this ticket"}
    async with listen(nats_client, on, original_test_provider), open_invoker(settings) as inv:
        reply = await inv.invoke("orig", {"payload": message, "metadata": {}}, CONTEXT)
    assert "Mock response to: Summarise this ticket" == reply["output"]


async def test_sample_test_provider_through_the_invoker(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """The bundled test_provider, called through the invoker with a message text, answers an
    output built from that text."""
    message = {**MESSAGE, "payload": "Summarise this ticket"}
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        reply = await inv.invoke("test_provider", {"payload": message, "metadata": {}}, CONTEXT)
    assert ("Test response: Summarise this ticket", "m-1") == (
        reply["output"],
        reply["metadata"]["message_id"],
    )


# -- timeouts and retries --------------------------------------------------------------------


async def test_timeout_with_retry_one_makes_two_attempts(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """With retry 1 and no answer, exactly two requests are sent and MaxRetriesExceeded
    reports 2 attempts."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("slow", on, timeout_ms=50, retry=1))
    async with listen(nats_client, on) as seen, open_invoker(settings) as inv:
        with pytest.raises(MaxRetriesExceeded) as caught:
            await inv.invoke("slow", {"payload": 1}, CONTEXT)
    assert (2, "slow", 2) == (seen.count, caught.value.extension_id, caught.value.attempts)
    assert "all 2 attempts timed out after 50 ms each" in caught.value.reason


async def test_timeout_without_retry(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """With retry 0 one request is sent; ExtensionTimeout after timeout_ms (not before), 1
    attempt."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("slow", on, timeout_ms=50))
    async with listen(nats_client, on) as seen, open_invoker(settings) as inv:
        started = time.perf_counter()
        with pytest.raises(ExtensionTimeout) as caught:
            await inv.invoke("slow", {"payload": 1}, CONTEXT)
        elapsed = time.perf_counter() - started
    assert (1, 1) == (seen.count, caught.value.attempts)
    assert elapsed > 0.045  # a lower bound only: a loaded machine may take longer, never less


async def test_retry_succeeds_on_second_attempt(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A timeout followed by an answer returns the answer after two requests."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("late", on, timeout_ms=50, retry=3))
    answers = iter([None, b'{"ok": true}'])
    async with listen(nats_client, on, lambda msg: next(answers)) as seen, \
            open_invoker(settings) as inv:  # fmt: skip
        assert {"ok": True} == await inv.invoke("late", {"payload": 1}, CONTEXT)
    assert 2 == seen.count


async def test_no_responders_is_not_retried(tmp_path: Path, nats_url: str) -> None:
    """Nobody listening: InvocationError 'no responders', one attempt, no retry. (Not a
    timeout waited out: that would be MaxRetriesExceeded after 4 attempts.)"""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("nobody", on, timeout_ms=2000, retry=3))
    async with open_invoker(settings) as inv:
        with pytest.raises(InvocationError) as caught:
            await inv.invoke("nobody", {"payload": 1}, CONTEXT)
    assert (f"no responders on {on}", 1) == (caught.value.reason, caught.value.attempts)


# -- the reply -------------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"not json", b"[1, 2]", b'"text"', b"", b"null"])
async def test_reply_must_be_a_json_object(
    tmp_path: Path, nats_url: str, nats_client: Client, body: bytes
) -> None:
    """A reply that is not a JSON object raises InvalidResponse (1 attempt) and counts as a
    failure in health."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("bad", on))
    async with listen(nats_client, on, constant(body)), open_invoker(settings) as inv:
        with pytest.raises(InvalidResponse) as caught:
            await inv.invoke("bad", {"payload": 1}, CONTEXT)
        assert ("bad", 1) == (caught.value.extension_id, caught.value.attempts)
        assert (0, 1) == (
            inv.health.get_health("bad")["success_count"],
            inv.health.get_health("bad")["failure_count"],
        )


async def test_flaky_invalid_mode(
    tmp_path: Path, nats_url: str, nats_client: Client, flaky_extension: Flaky
) -> None:
    """The flaky sample set to fail every call with an invalid body gives InvalidResponse."""
    await nats_client.request(
        "extreg.local.samples.flaky.control",
        b'{"failure_rate": 1.0, "failure_mode": "invalid"}',
        timeout=1,
    )
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        with pytest.raises(InvalidResponse, match="flaky: injected failure"):
            await inv.invoke("flaky", {"payload": 1}, CONTEXT)


# -- before anything is sent -----------------------------------------------------------------


async def test_payload_and_metadata_limits(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Payload or metadata over the global limit, or over an extension's own
    metadata.max_payload_size, is refused with PayloadTooLarge and nothing reaches NATS."""
    on, own = subject(), subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("x", on),
        rec("tight", own, metadata={"max_payload_size": 5}),
        extension_max_payload_size=100,
        extension_max_metadata_size=50,
    )
    big = "a" * 200
    async with listen(nats_client, on, constant(b"{}")) as seen, \
            listen(nats_client, own, constant(b"{}")) as seen_own, \
            open_invoker(settings) as inv:  # fmt: skip
        with pytest.raises(PayloadTooLarge, match="payload is 202 bytes, the limit is 100"):
            await inv.invoke("x", {"payload": big}, CONTEXT)
        with pytest.raises(PayloadTooLarge, match="metadata is 208 bytes, the limit is 50"):
            await inv.invoke("x", {"payload": 1, "metadata": {"k": big}}, CONTEXT)
        with pytest.raises(PayloadTooLarge, match="payload is 7 bytes, the limit is 5"):
            await inv.invoke("tight", {"payload": "hello"}, CONTEXT)
        assert {} == await inv.invoke("x", {"payload": "a" * 98}, CONTEXT)  # 100 bytes: allowed
        failures = inv.health.get_health("x")["failure_count"]
    assert (1, 0, 0) == (seen.count, seen_own.count, failures)


async def test_dry_run_sends_nothing(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """dry_run in the context: the call is prepared and checked, nothing is sent, {} returns."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on), extension_max_payload_size=10)
    async with (
        listen(nats_client, on, constant(b'{"a": 1}')) as seen,
        open_invoker(settings) as inv,
    ):
        assert {} == await inv.invoke("x", {"payload": 1}, {**CONTEXT, "dry_run": True})
        with pytest.raises(PayloadTooLarge):
            await inv.invoke("x", {"payload": "a" * 20}, {"dry_run": True})
        calls = inv.health.get_health("x")["success_count"]
    assert (0, 0) == (seen.count, calls)


async def test_disabled_and_unknown_fail_before_network(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A disabled or unknown extension fails with its error and nothing reaches NATS."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("off", on, enabled=False))
    async with listen(nats_client, on, constant(b"{}")) as seen, open_invoker(settings) as inv:
        with pytest.raises(ExtensionDisabled) as disabled:
            await inv.invoke("off", {"payload": 1}, CONTEXT)
        with pytest.raises(ExtensionNotFound) as unknown:
            await inv.invoke("nope", {"payload": 1}, CONTEXT)
    assert (0, "off", "nope") == (
        seen.count,
        disabled.value.extension_id,
        unknown.value.extension_id,
    )


# -- routing ---------------------------------------------------------------------------------


async def test_version_routing_by_tenant(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A version whose routing_rules list tenants gets exactly those tenants' calls (from the
    context, or from the request when the context has none); everyone else gets the row."""
    main, canary = subject(), subject()
    record = rec("routed", main, versions=[
        {"version": "v2", "subject": canary, "timeout_ms": 200, "retry": 0,
         "routing_rules": {"tenant_id": ["t1", "t2"]}},
    ])  # fmt: skip
    settings = fixture_settings(tmp_path, nats_url, record)
    async with listen(nats_client, main, constant(b'{"from": "v1"}')), \
            listen(nats_client, canary, constant(b'{"from": "v2"}')), \
            open_invoker(settings) as inv:  # fmt: skip
        got = [
            (await inv.invoke("routed", {"payload": 1}, {"tenant_id": tenant}))["from"]
            for tenant in ("t1", "t2", "t3", None)
        ]
        from_request = await inv.invoke("routed", {"payload": 1, "tenant_id": "t2"}, {})
    assert ["v2", "v2", "v1", "v1"] == got
    assert {"from": "v2"} == from_request


async def test_weighted_instances(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """Over 1,000 calls, instances get calls in proportion to their weights (75/25, within
    6 points); unhealthy and disabled instances get none."""
    subjects = {name: subject() for name in ("a", "b", "sick", "off")}
    instances = [
        {"instance_id": "a", "subject": subjects["a"], "weight": 75},
        {"instance_id": "b", "subject": subjects["b"], "weight": 25},
        {"instance_id": "sick", "subject": subjects["sick"], "weight": 100,
         "health_status": "unhealthy"},
        {"instance_id": "off", "subject": subjects["off"], "weight": 100, "enabled": False},
    ]  # fmt: skip
    settings = fixture_settings(tmp_path, nats_url, rec("spread", subject(), instances=instances))
    counts: Counter[str] = Counter()
    async with open_invoker(settings) as inv:
        listeners = {}
        for name, on in subjects.items():
            listeners[name] = await _answering(nats_client, on, name.encode())
        for _ in range(1000):
            counts[(await inv.invoke("spread", {"payload": 1}, CONTEXT))["name"]] += 1
        for sub in listeners.values():
            await sub.unsubscribe()
    assert 0 == counts["sick"] + counts["off"]
    assert 0.75 == pytest.approx(counts["a"] / 1000, abs=0.06)
    assert 1000 == counts["a"] + counts["b"]


async def _answering(nc: Client, on: str, name: bytes) -> Any:
    async def handle(msg: Any) -> None:
        await nc.publish(msg.reply, b'{"name": "' + name + b'"}')

    sub = await nc.subscribe(on, cb=handle)
    await subscriptions_active(nc)
    return sub


# -- health and breaker on the call path -----------------------------------------------------


async def test_health_counts_after_known_mix(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """7 good replies, 3 invalid ones and 2 timeouts give exactly 7 successes, 5 failures, a
    success rate of 7/12 and latencies that cover the timeouts."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("mix", on, timeout_ms=40))
    plan: list[bytes | None] = [b'{"ok": 1}'] * 7 + [b"oops"] * 3 + [None] * 2
    answers = iter(plan)
    async with listen(nats_client, on, lambda msg: next(answers)), open_invoker(settings) as inv:
        for _ in plan:
            with contextlib.suppress(InvalidResponse, ExtensionTimeout):
                await inv.invoke("mix", {"payload": 1}, CONTEXT)
        health = inv.health.get_health("mix")
        summary = inv.health.get_health_summary(inv.registry.all())
    assert (7, 5, round(7 / 12, 4), "disabled") == (  # breakers are off by default
        health["success_count"],
        health["failure_count"],
        health["success_rate"],
        health["circuit_breaker_state"],
    )
    assert health["p99_latency_ms"] >= 39 and health["avg_latency_ms"] > 0
    assert health["last_success"] is not None and health["last_failure"] is not None
    assert {"total": 1, "enabled": 1, "healthy": 0, "unhealthy": 1} == {
        k: summary[k] for k in ("total", "enabled", "healthy", "unhealthy")
    }


async def test_circuit_opens_and_recovers(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Two failures open the circuit (failure_threshold 2): the next call is refused with
    CircuitOpen without reaching NATS; after timeout_seconds a trial call goes through and its
    success closes the circuit. Time moves only by the test's clock."""
    on = subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("brk", on),
        circuit_breaker_enabled=True,
        circuit_breaker_failure_threshold=2,
        circuit_breaker_timeout_seconds=30,
    )
    answers = iter([b"bad", b"bad", b'{"ok": true}'])
    clock = FakeClock()
    async with listen(nats_client, on, lambda msg: next(answers)) as seen, \
            open_invoker(settings, clock=clock) as inv:  # fmt: skip
        for _ in range(2):
            with pytest.raises(InvalidResponse):
                await inv.invoke("brk", {"payload": 1}, CONTEXT)
        clock.advance(29.9)
        with pytest.raises(CircuitOpen):
            await inv.invoke("brk", {"payload": 1}, CONTEXT)
        assert (2, "open") == (seen.count, inv.breaker.state("brk"))
        clock.advance(0.1)
        assert {"ok": True} == await inv.invoke("brk", {"payload": 1}, CONTEXT)
        assert (3, "closed") == (seen.count, inv.breaker.state("brk"))


async def test_breaker_overrides_from_metadata(tmp_path: Path, nats_url: str) -> None:
    """circuit_breaker_* keys in an extension's metadata configure its breaker when the
    invoker starts; other extensions keep the settings' defaults."""
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("own", subject(), metadata={"circuit_breaker_failure_threshold": 2}),
        rec("plain", subject()),
        circuit_breaker_enabled=True,
    )
    async with open_invoker(settings) as inv:
        configs = (
            inv.breaker.snapshot("own").config.failure_threshold,
            inv.breaker.snapshot("plain").config.failure_threshold,
        )
    assert (2, 5) == configs


async def test_observer_sees_every_outcome(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """The observer hook (metrics) is told of each call's extension, type, version, outcome and
    duration."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on, timeout_ms=30))
    seen: list[tuple[str, str, str, str]] = []
    answers = iter([b"{}", None])
    async with listen(nats_client, on, lambda msg: next(answers)), open_invoker(settings) as inv:
        inv.observer = lambda ext_id, kind, version, outcome, seconds: seen.append(
            (ext_id, kind, version, outcome)
        )
        await inv.invoke("x", {"payload": 1})
        with pytest.raises(ExtensionTimeout):
            await inv.invoke("x", {"payload": 1})
    version = inv.registry.lookup("x").version
    assert [("x", "pre", version, "ok"), ("x", "pre", version, "timeout")] == seen


# -- NATS outage -----------------------------------------------------------------------------


async def test_nats_outage_fails_fast_and_recovers(
    tmp_path: Path, nats_server_factory: Callable[..., NatsServer]
) -> None:
    """While NATS is down, calls fail with TransportUnavailable (raised before any request,
    so no timeout is waited out) and are not counted against the extension; when NATS is back,
    calls succeed again without a new invoker."""
    server = nats_server_factory()
    settings = fixture_settings(tmp_path, server.url)
    request = {"payload": {"prompt": "hi"}}
    async with SampleRunner(server.url), open_invoker(settings) as inv:
        assert (
            "Test response: hi" == (await inv.invoke("test_provider", request, CONTEXT))["output"]
        )
        await server.astop()
        await wait_for(lambda: not inv.connected, timeout=5)
        with pytest.raises(TransportUnavailable):
            await inv.invoke("test_provider", request, CONTEXT)
        await server.astart()
        replies: list[dict[str, Any]] = []

        async def try_call() -> bool:
            try:
                replies.append(await inv.invoke("test_provider", request, CONTEXT))
            except (TransportUnavailable, InvocationError):
                return False
            return True

        deadline = time.perf_counter() + 30
        while not await try_call():
            assert time.perf_counter() < deadline, "calls did not succeed after NATS came back"
            await asyncio.sleep(0.05)
        health = inv.health.get_health("test_provider")
    assert "Test response: hi" == replies[-1]["output"]
    assert 0 == health["failure_count"]


async def test_call_waiting_when_nats_drops_fails_fast(
    tmp_path: Path, nats_server_factory: Callable[..., NatsServer]
) -> None:
    """A call waiting for a reply when the connection drops fails with TransportUnavailable
    instead of waiting out its timeout (which would raise ExtensionTimeout)."""
    server = nats_server_factory()
    on = subject()
    settings = fixture_settings(tmp_path, server.url, rec("hang", on, timeout_ms=30_000))
    async with open_invoker(settings) as inv:
        received = asyncio.Event()

        async def never_answer(msg: Any) -> None:
            received.set()

        async def quiet(exc: Exception) -> None:
            return None

        listener = await nats.connect(server.url, max_reconnect_attempts=0, error_cb=quiet)
        await listener.subscribe(on, cb=never_answer)
        await listener.flush()
        call = asyncio.create_task(inv.invoke("hang", {"payload": 1}, CONTEXT))
        out = asyncio.create_task(received.wait())  # the request is out: the call waits
        await asyncio.wait([call, out], return_when=asyncio.FIRST_COMPLETED)
        assert received.is_set(), f"the call ended before its request arrived: {call!r}"
        await server.astop()
        with pytest.raises(TransportUnavailable):
            await call
        await listener.close()


async def test_breaker_follows_registry_changes(tmp_path: Path, db_url: str, nats_url: str) -> None:
    """A metadata change made in the database reconfigures that extension's breaker (by
    notification, no restart) and a deleted extension's circuit is forgotten."""
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=db_url,
        nats_url=nats_url,
        circuit_breaker_enabled=True,
    )
    record = rec("watched", subject(), metadata={"circuit_breaker_failure_threshold": 2})
    changed = {**record, "metadata": {"circuit_breaker_failure_threshold": 7}}
    async with PostgresSource(settings) as db:
        await db.import_extensions([_parse(record)], "test")
        async with open_invoker(settings) as inv:

            def threshold() -> int:
                return inv.breaker.snapshot("watched").config.failure_threshold

            assert 2 == threshold()
            await db.upsert_extension(_parse(changed), "test")
            await wait_for(lambda: threshold() == 7)
            await db.delete_extension("watched", "test")
            await wait_for(lambda: "watched" not in inv.breaker.states())


def _parse(data: dict[str, Any]) -> Extension:
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)
