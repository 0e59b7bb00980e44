"""Slow calls through the real invoker and a real NATS responder (SPEC.md "Progressive delivery
and overload", "Slow calls"; issue 14 item 5): successes slower than
`circuit_breaker_slow_call_duration_ms` open the circuit once their share of the window reaches
`circuit_breaker_slow_call_rate_threshold`, while health still counts them as successes. The
breaker's own rules, on an injected clock, are in test_breaker.py.

The responder always takes at least `DELAY_S`, well over the 50 ms threshold, so every call is
slow whatever the machine's load; no test needs a call to be fast, so none bounds a time."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from invoke_helpers import FakeClock, fixture_settings, open_invoker, subject
from nats.aio.client import Client
from nats.aio.msg import Msg

from extreg import CircuitOpen
from extreg.adapters.nats import subscriptions_active
from extreg.core.model import parse_extension
from extreg.errors import ConfigError, InvalidRecord
from extreg.settings import Settings

DELAY_S = 0.2
THRESHOLD_MS = 50
CALL = {"payload": 1}


def rec(ext_id: str, on: str, **values: Any) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": 10_000, **values}


@contextlib.asynccontextmanager
async def answer_slowly(nc: Client, on: str) -> AsyncIterator[list[Msg]]:
    """Answer every request on `on` with `{"ok": true}` after `DELAY_S`; yields the requests
    seen."""
    seen: list[Msg] = []

    async def handle(msg: Msg) -> None:
        seen.append(msg)
        await asyncio.sleep(DELAY_S)
        await nc.publish(msg.reply, b'{"ok": true}')

    sub = await nc.subscribe(on, cb=handle)
    await subscriptions_active(nc)
    try:
        yield seen
    finally:
        await nc.flush()
        await sub.unsubscribe()


async def test_slow_calls_open_the_circuit_without_any_error(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Three slow successes (min_calls 3, every call slow at the default threshold of 1.0) open
    the circuit: the fourth call is refused without reaching NATS, and health shows three
    successes and no failure."""
    on = subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("slow", on),
        circuit_breaker_enabled=True,
        circuit_breaker_min_calls=3,
        circuit_breaker_slow_call_duration_ms=THRESHOLD_MS,
    )
    async with answer_slowly(nats_client, on) as seen, \
            open_invoker(settings, clock=FakeClock()) as inv:  # fmt: skip
        for _ in range(3):
            assert {"ok": True} == await inv.invoke("slow", CALL)
        with pytest.raises(CircuitOpen, match=f"slower than {THRESHOLD_MS} ms"):
            await inv.invoke("slow", CALL)
        health = inv.health.get_health("slow")
        snapshot = inv.breaker.snapshot("slow")
    assert 3 == len(seen)
    assert ("open", "3 of 3 calls were slower than 50 ms in the window") == (
        snapshot.state,
        snapshot.open_reason,
    )
    assert (3, 0) == (health["success_count"], health["failure_count"])


async def test_slow_calls_per_extension_from_metadata(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """`circuit_breaker_slow_call_duration_ms` in one extension's metadata turns slow calls on
    for it alone: with the setting off (the default) the other, just as slow, stays closed."""
    own, plain = subject(), subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("own", own, metadata={"circuit_breaker_slow_call_duration_ms": THRESHOLD_MS}),
        rec("plain", plain),
        circuit_breaker_enabled=True,
        circuit_breaker_min_calls=3,
    )
    async with answer_slowly(nats_client, own), answer_slowly(nats_client, plain) as plain_seen, \
            open_invoker(settings, clock=FakeClock()) as inv:  # fmt: skip
        for _ in range(3):
            await inv.invoke("own", CALL)
        for _ in range(4):
            assert {"ok": True} == await inv.invoke("plain", CALL)
        with pytest.raises(CircuitOpen):
            await inv.invoke("own", CALL)
        plain_circuit = inv.breaker.snapshot("plain")
    assert ("closed", 4, 0, 4) == (
        plain_circuit.state,
        plain_circuit.window_calls,
        plain_circuit.window_slow_calls,
        len(plain_seen),
    )


def test_bad_slow_call_metadata_is_refused_at_load() -> None:
    """A record whose slow-call overrides are unusable is refused when loaded, naming each
    field and what is wrong with its value, like every other circuit breaker override."""
    metadata = {
        "circuit_breaker_slow_call_duration_ms": -5,
        "circuit_breaker": {"slow_call_rate_threshold": 1.5},
    }
    with pytest.raises(InvalidRecord) as caught:
        parse_extension(
            rec("bad", "beamline.ext.pre.bad.v1", metadata=metadata),
            max_timeout_ms=60_000,
            max_retries=10,
        )
    assert {
        ("metadata.circuit_breaker_slow_call_duration_ms", "must be at least 0 (got -5)"),
        ("metadata.circuit_breaker.slow_call_rate_threshold", "must be at most 1 (got 1.5)"),
    } == set(caught.value.problems)


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("circuit_breaker_slow_call_duration_ms", -1),
        ("circuit_breaker_slow_call_rate_threshold", 0),
        ("circuit_breaker_slow_call_rate_threshold", 1.5),
    ],
)
def test_bad_slow_call_settings_are_refused_naming_the_key(key: str, value: Any) -> None:
    """The settings refuse what the breaker could not use, naming the key."""
    with pytest.raises(ConfigError, match=key):
        Settings.load(environ={}, **{key: value})
