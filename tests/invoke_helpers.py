"""Helpers of the invoker tests: registries on a fixtures folder, and NATS listeners that
count what reaches a subject (and answer, or not)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from helpers import make_settings
from nats.aio.client import Client
from nats.aio.msg import Msg

from extreg import Registry, Settings
from extreg.adapters.nats import subscriptions_active
from extreg.core.health import HealthMonitor
from extreg.invoke import Invoker
from extreg.local.samples import SAMPLE_EXTENSIONS

SAMPLE_RECORDS = [s.record() for s in SAMPLE_EXTENSIONS]


def subject() -> str:
    """A subject no other test uses."""
    return f"test.{uuid.uuid4().hex}.v1"


def fixture_settings(
    tmp_path: Path, nats_url: str, *records: dict[str, Any], **values: Any
) -> Settings:
    """Settings serving `records` (default: the samples) from a fixtures folder, on `nats_url`."""
    folder = tmp_path / "fixtures"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "records.json").write_text(json.dumps(list(records or SAMPLE_RECORDS)), "utf-8")
    return make_settings(
        tmp_path, source="fixtures", fixtures_dir=folder, nats_url=nats_url, **values
    )


@contextlib.asynccontextmanager
async def open_invoker(settings: Settings, **kwargs: Any) -> AsyncIterator[Invoker]:
    """A registry and an invoker on it, both closed afterwards."""
    async with (
        Registry.open(settings) as registry,
        Invoker.open(registry, settings, **kwargs) as inv,
    ):
        yield inv


class Listener:
    """Counts the requests reaching one subject; answers each with `answer(msg)` unless None."""

    def __init__(self, answer: Callable[[Msg], bytes | None] | None) -> None:
        self.answer = answer
        self.messages: list[Msg] = []

    @property
    def count(self) -> int:
        return len(self.messages)


@contextlib.asynccontextmanager
async def listen(
    nc: Client, on: str, answer: Callable[[Msg], bytes | None] | None = None
) -> AsyncIterator[Listener]:
    """Subscribe `on` for the duration; see `Listener`."""
    listener = Listener(answer)

    async def handle(msg: Msg) -> None:
        listener.messages.append(msg)
        reply = listener.answer(msg) if listener.answer else None
        if reply is not None and msg.reply:
            await nc.publish(msg.reply, reply)

    sub = await nc.subscribe(on, cb=handle)
    await subscriptions_active(nc)
    try:
        yield listener
    finally:
        await nc.flush()
        await sub.unsubscribe()


class FakeClock:
    """A clock (see `extreg.core.clock`) that moves only when a test calls `advance`, so a
    breaker timeout passes exactly when the test says, however loaded the machine is."""

    def __init__(self, monotonic: float = 1_000.0, wall: float = 1_780_000_000.0) -> None:
        self._monotonic = monotonic
        self._wall = wall

    def monotonic(self) -> float:
        return self._monotonic

    def time(self) -> float:
        return self._wall

    def advance(self, seconds: float) -> None:
        self._monotonic += seconds
        self._wall += seconds


def record_calls(monitor: HealthMonitor, ext_id: str, ok: int, bad: int) -> None:
    """`ok` successful and `bad` failed calls of 1 ms, recorded straight into `monitor`."""
    for _ in range(ok):
        monitor.record(ext_id, True, 1.0)
    for _ in range(bad):
        monitor.record(ext_id, False, 1.0)


def constant(reply: bytes) -> Callable[[Msg], bytes]:
    return lambda msg: reply


async def wait_for(
    condition: Callable[[], bool], timeout: float = 10.0, step: float = 0.01
) -> float:
    """Poll until `condition()` holds; the seconds it took; AssertionError after `timeout`."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)
    return time.perf_counter() - started
