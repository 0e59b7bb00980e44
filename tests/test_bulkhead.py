"""The bulkhead through the real Invoker and a real NATS server: never more calls in flight to
an extension than its limit, refusals at once with `Overloaded` and not counted against the
extension, the metadata override, and the adaptive limit following its windows."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from invoke_helpers import FakeClock, constant, fixture_settings, listen, open_invoker, subject
from nats.aio.client import Client
from nats.aio.msg import Msg

from extreg import CircuitOpen, Overloaded
from extreg.adapters.nats import subscriptions_active
from extreg.core.concurrency import PROBE_LIMIT
from extreg.core.model import parse_extension
from extreg.errors import InvalidRecord


def rec(ext_id: str, on: str, **values: Any) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": 5000, **values}


class Held:
    """A responder that holds every request until `release` is set; counts how many it
    holds at once."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.holding = 0
        self.most = 0
        self.arrived = 0


@contextlib.asynccontextmanager
async def held(nc: Client, on: str) -> AsyncIterator[Held]:
    state = Held()
    tasks: set[asyncio.Task[None]] = set()

    async def answer(msg: Msg) -> None:
        state.holding += 1
        state.most = max(state.most, state.holding)
        await state.release.wait()
        state.holding -= 1
        await nc.publish(msg.reply, b"{}")

    async def handle(msg: Msg) -> None:
        state.arrived += 1
        task = asyncio.create_task(answer(msg))
        tasks.add(task)
        task.add_done_callback(tasks.discard)

    sub = await nc.subscribe(on, cb=handle)
    await subscriptions_active(nc)
    try:
        yield state
    finally:
        state.release.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await sub.unsubscribe()


async def until(condition: Any, what: str) -> None:
    for _ in range(1000):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"never: {what}")


@pytest.mark.parametrize(
    ("values", "metadata"),
    [({"extension_max_concurrency": 4}, {}), ({}, {"max_concurrency": 4})],
    ids=["setting", "metadata, setting unlimited"],
)
async def test_never_more_in_flight_than_the_limit_and_refusals_are_no_failures(
    tmp_path: Path,
    nats_url: str,
    nats_client: Client,
    values: dict[str, Any],
    metadata: dict[str, Any],
) -> None:
    """20 calls at once against a limit of 4: the extension holds 4, the other 16 fail at
    once with `Overloaded` (0 attempts, nothing sent), and neither health nor the breaker
    counts them; once the 4 are answered, calls go through again."""
    on = subject()
    settings = fixture_settings(
        tmp_path, nats_url, rec("x", on, metadata=metadata), circuit_breaker_enabled=True, **values
    )
    outcomes: list[str] = []
    async with held(nats_client, on) as responder, open_invoker(settings) as inv:
        inv.observer = lambda ext_id, kind, version, outcome, seconds: outcomes.append(outcome)
        calls = [asyncio.create_task(inv.invoke("x", {"payload": 1})) for _ in range(20)]
        await until(lambda: sum(c.done() for c in calls) == 16, "16 calls refused")
        refused = [c.exception() for c in calls if c.done()]
        assert all(isinstance(e, Overloaded) and e.attempts == 0 for e in refused), refused
        await until(lambda: responder.holding == 4, "4 calls held")
        assert (4, 4) == (responder.arrived, responder.most)
        responder.release.set()
        assert [{}] * 4 == [r for r in await asyncio.gather(*(c for c in calls if not c.done()))]
        assert {} == await inv.invoke("x", {"payload": 1})
        health = inv.health.get_health("x")
        assert (5, 0) == (health["success_count"], health["failure_count"])
        assert 0 == inv.breaker.snapshot("x").consecutive_failures
    assert 16 == outcomes.count("overloaded")


async def test_a_limit_change_keeps_the_calls_in_flight_counted(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Raising the limit (the record changed, the registry reloaded) while calls are held
    lets exactly the difference more in: of two more calls, one is held, one is refused."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on, metadata={"max_concurrency": 2}))
    async with held(nats_client, on) as responder, open_invoker(settings) as inv:
        first = [asyncio.create_task(inv.invoke("x", {"payload": 1})) for _ in range(2)]
        await until(lambda: responder.holding == 2, "2 calls held")
        fixture_settings(tmp_path, nats_url, rec("x", on, metadata={"max_concurrency": 3}))
        await inv.registry.reload()
        assert 3 == inv._bulkheads["x"].limit
        more = [asyncio.create_task(inv.invoke("x", {"payload": 1})) for _ in range(2)]
        await until(lambda: sum(c.done() for c in more) == 1, "one refused")
        [refused] = [c.exception() for c in more if c.done()]
        assert isinstance(refused, Overloaded)
        await until(lambda: responder.holding == 3, "3 calls held")
        assert (3, 3) == (responder.arrived, responder.most)
        let_in = [c for c in more if not c.done()]
        responder.release.set()
        assert [{}] * 3 == await asyncio.gather(*first, *let_in)


async def test_the_adaptive_limit_probes_then_follows_its_windows(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """With `adaptive_concurrency_enabled`, an extension starts at the probe limit; once its
    first window of answered calls has closed (on the invoker's clock) the limit is the
    initial one, and the bulkhead enforces it."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on), adaptive_concurrency_enabled=True)
    clock = FakeClock()

    async def answer(msg: Msg) -> None:
        await nats_client.publish(msg.reply, b"{}")

    sub = await nats_client.subscribe(on, cb=answer)
    await subscriptions_active(nats_client)
    try:
        async with open_invoker(settings, clock=clock) as inv:
            bulkhead = inv._bulkheads["x"]
            assert PROBE_LIMIT == bulkhead.limit
            adaptive = bulkhead.adaptive
            assert adaptive is not None
            for _ in range(adaptive.min_samples):
                await inv.invoke("x", {"payload": 1})
            clock.advance(adaptive.window_s)
            for _ in range(adaptive.min_samples):  # the clock is read every min_samples
                await inv.invoke("x", {"payload": 1})
            assert adaptive.initial == bulkhead.limit
            assert adaptive.baseline is not None and adaptive.baseline > 0
    finally:
        await sub.unsubscribe()


@pytest.mark.parametrize("value", [0, -1, "4", 2.5, True, None])
def test_a_max_concurrency_that_cannot_be_used_is_refused_naming_it(value: Any) -> None:
    """The metadata override goes through the one validation path of every record source."""
    data = rec("x", "a.b", metadata={"max_concurrency": value})
    if value is None:
        assert parse_extension(data, max_timeout_ms=60_000, max_retries=10).metadata
        return
    with pytest.raises(InvalidRecord) as raised:
        parse_extension(data, max_timeout_ms=60_000, max_retries=10)
    assert [("metadata.max_concurrency", f"must be a positive integer (got {value!r})")] == [
        (field, message) for field, message in raised.value.problems
    ]


async def test_every_way_out_of_a_call_gives_its_place_back(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """A refusal by the circuit, a failure, and a cancelled call each release the bulkhead
    (no place leaks: a limit of 1 still lets the next call in)."""
    on = subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("x", on, metadata={"max_concurrency": 1}),
        circuit_breaker_enabled=True,
    )
    async with held(nats_client, on) as responder, open_invoker(settings) as inv:
        bulkhead = inv._bulkheads["x"]
        inv.breaker.force_open("x")
        with pytest.raises(CircuitOpen):
            await inv.invoke("x", {"payload": 1})
        assert 0 == bulkhead.in_flight
        inv.breaker.reset("x")
        call = asyncio.create_task(inv.invoke("x", {"payload": 1}))
        await until(lambda: responder.holding == 1, "the call held")
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
        assert 0 == bulkhead.in_flight
        responder.release.set()
        assert {} == await inv.invoke("x", {"payload": 1})
        assert 0 == bulkhead.in_flight


async def test_the_adaptive_limit_stays_under_the_fixed_cap(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """`max_concurrency` 2 with the adaptive limit: the probe and the limit never pass 2."""
    on = subject()
    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("x", on, metadata={"max_concurrency": 2}),
        adaptive_concurrency_enabled=True,
    )
    clock = FakeClock()
    async with listen(nats_client, on, constant(b"{}")), open_invoker(settings, clock=clock) as inv:
        bulkhead = inv._bulkheads["x"]
        assert 2 == bulkhead.limit
        for _ in range(3):
            for _ in range(10):
                await inv.invoke("x", {"payload": 1})
            clock.advance(1.0)
            assert bulkhead.limit <= 2
