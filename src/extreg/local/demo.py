"""`extreg serve --demo`: an embedded NATS server, the sample extensions and gentle traffic.

So that a newcomer's first `scripts/run` shows a registry at work: real calls through the
invoker, health numbers moving, the `flaky` extension's circuit opening and recovering on a
fixed cycle, and the bundled `support_en` policy run end to end, mostly passing and now and
then blocked by `pii_guard`, so policy runs show both outcomes. Everything here is started and stopped by `demo_services`; nothing
outlives Ctrl-C. NATS listens on a free port (a fixed one would clash with a NATS already on
the machine or a second demo); its URL is printed, shown in `status`, and published in
`data_dir/demo-nats.json` while the demo runs, where `Settings()` finds it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog

from ..adapters.fixtures import read_fixtures
from ..adapters.postgres import PostgresSource
from ..core.model import parse_extension
from ..core.policy import PolicyLimits
from ..errors import ExtensionError, PolicyError
from ..published import published
from ..settings import BUNDLED_FIXTURES, DEMO_NATS_FILE, Settings
from .natsserver import NatsServer
from .samples import SAMPLE_EXTENSIONS, SampleRunner, run_samples
from .samples.flaky import FlakySettings

log = structlog.get_logger("extreg.local.demo")

DEMO_ACTOR = "extreg:demo"
CALLS_PER_SECOND = 4
# The bundled policy: normalize_text -> pii_guard -> test_provider -> mask_pii.
POLICY_ID = "support_en"
POLICY_RUNS_PER_SECOND = 2
# The flaky extension's cycle: (seconds, failure share). A failing phase opens its circuit
# (five timeouts in a row); the healthy phase after it lets the half-open trials close it.
FLAKY_CYCLE = ((45.0, 0.02), (25.0, 0.9))
# Breaker settings that make the cycle visible within a minute.
DEMO_SETTINGS = {
    "circuit_breaker_enabled": True,
    "circuit_breaker_timeout_seconds": 10,
    "health_flush_interval_seconds": 2,
}

REQUESTS: dict[str, dict[str, Any]] = {
    "normalize_text": {
        "payload": {
            "message_id": "m-1",
            "message_type": "chat",
            "payload": "  Hello   WORLD  ",
            "metadata": {},
        }
    },
    "pii_guard": {"payload": {"message_id": "m-2", "payload": "my card is 4111 1111 1111 1111"}},
    "mask_pii": {"payload": {"message_id": "m-3", "payload": "mail me at a@example.com"}},
    "test_provider": {"payload": {"message_id": "m-4", "payload": "Summarize the ticket"}},
    "flaky": {"payload": {"message_id": "m-5", "payload": "are you there?"}},
    "echo": {"payload": {"message_id": "m-6", "payload": "ping"}},
}
# The messages the policy runs on, in turn: clean ones pass (an e-mail address or a phone
# number is masked by post), the one with a card number is blocked by pii_guard: one run in
# eight, so a blocked run (one info line, policy_run_blocked) every four seconds.
POLICY_MESSAGES: tuple[dict[str, Any], ...] = (
    {"message_id": "p-1", "message_type": "chat", "payload": "  Hello, I can NOT log in  "},
    {"message_id": "p-2", "message_type": "chat", "payload": "Where is my order?"},
    {"message_id": "p-3", "message_type": "chat", "payload": "Mail me at a@example.com"},
    {"message_id": "p-4", "message_type": "chat", "payload": "Thanks, it works now"},
    {"message_id": "p-5", "message_type": "chat", "payload": "my card is 4111 1111 1111 1111"},
    {"message_id": "p-6", "message_type": "chat", "payload": "Call me on +1 555 123 4567"},
    {"message_id": "p-7", "message_type": "chat", "payload": "Can I change my plan?"},
    {"message_id": "p-8", "message_type": "chat", "payload": "The app  crashes on START"},
)


@dataclass
class DemoServices:
    settings: Settings
    nats: NatsServer
    samples: SampleRunner


@contextlib.asynccontextmanager
async def demo_services(settings: Settings) -> AsyncIterator[DemoServices]:
    """Start NATS and the sample extensions; yield settings pointing at them."""
    nats = NatsServer()
    await nats.astart()
    try:
        samples = await run_samples(nats.url)
        try:
            demo_settings = settings.replace(nats_url=nats.url, **DEMO_SETTINGS)
            with published(demo_nats_file(settings), nats.url):
                log.info("demo_nats", nats_url=nats.url, published_in=str(demo_nats_file(settings)))
                yield DemoServices(demo_settings, nats, samples)
        finally:
            await samples.stop()
    finally:
        await nats.astop()


def demo_nats_file(settings: Settings) -> Path:
    """Where the running demo publishes its NATS URL: `Settings()` (so the CLI and scripts)
    in the same folder read it when nothing else names `nats_url`."""
    return settings.data_dir / DEMO_NATS_FILE


async def register_samples(settings: Settings) -> None:
    """Make sure every sample extension (flaky and echo too) and the bundled policy
    (`support_en`) have a record; one already there is left as it is."""
    async with PostgresSource(settings) as db:
        parsed = [
            parse_extension(
                sample.record(),
                max_timeout_ms=settings.extension_max_timeout_ms,
                max_retries=settings.extension_max_retries,
            )
            for sample in SAMPLE_EXTENSIONS
        ]
        existing = await db.ids()
        missing = [e for e in parsed if e.id not in existing]
        if missing:
            await db.import_extensions(missing, DEMO_ACTOR)
            log.info("demo_extensions_registered", ids=[e.id for e in missing])
        bundled = await read_fixtures(
            BUNDLED_FIXTURES,
            max_timeout_ms=settings.extension_max_timeout_ms,
            max_retries=settings.extension_max_retries,
            policy_limits=PolicyLimits.from_settings(settings),
        )
        policies = [p for p in bundled.policies if await db.load_policy(p.policy_id) is None]
        if policies:
            await db.import_policies(policies, DEMO_ACTOR)
            log.info("demo_policies_registered", ids=[p.policy_id for p in policies])


async def traffic(invoker: Any, samples: SampleRunner, stop: asyncio.Event) -> None:
    """Call the sample extensions a few times a second, run the bundled policy, and cycle
    the flaky one."""
    cycle = asyncio.create_task(_cycle_flaky(samples, stop))
    policy_runs = asyncio.create_task(_run_policies(invoker, stop))
    ids = itertools.cycle(
        [
            "normalize_text",
            "pii_guard",
            "mask_pii",
            "flaky",
            "test_provider",
            "flaky",
            "echo",
            "flaky",
        ]
    )
    try:
        await _every(1 / CALLS_PER_SECOND, stop, lambda: _call(invoker, next(ids)), set())
    finally:
        cycle.cancel()
        policy_runs.cancel()


async def _every(
    interval: float,
    stop: asyncio.Event,
    start: Callable[[], Coroutine[Any, Any, None]],
    in_flight: set[asyncio.Task[None]],
) -> None:
    """Start `start()` as a task of its own every `interval` seconds until `stop` is set, so
    a slow call does not hold up the next. The tasks are kept in `in_flight` until done (the
    loop only keeps weak references), where a caller that must cancel them finds them."""
    while not stop.is_set():
        task = asyncio.create_task(start())
        in_flight.add(task)
        task.add_done_callback(in_flight.discard)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), interval)


async def _call(invoker: Any, ext_id: str) -> None:
    context = {"trace_id": f"demo-{uuid.uuid4().hex[:8]}", "tenant_id": "demo"}
    try:
        await invoker.invoke(ext_id, REQUESTS[ext_id], context)
    except ExtensionError as exc:
        log.debug("demo_call_failed", extension_id=ext_id, reason=exc.reason)


async def _run_policies(invoker: Any, stop: asyncio.Event) -> None:
    """Run `support_en` a few times a second on `POLICY_MESSAGES`, in turn, each run as a
    task of its own (a slow run does not hold up the next)."""
    in_flight: set[asyncio.Task[None]] = set()
    messages = itertools.cycle(POLICY_MESSAGES)
    try:
        await _every(
            1 / POLICY_RUNS_PER_SECOND,
            stop,
            lambda: _run_policy(invoker, next(messages)),
            in_flight,
        )
    finally:
        for task in list(in_flight):  # before the invoker they use closes
            task.cancel()


async def _run_policy(invoker: Any, message: dict[str, Any]) -> None:
    context = {
        "trace_id": f"demo-{uuid.uuid4().hex[:8]}",
        "tenant_id": "demo",
        "channel": "web",
    }
    try:
        await invoker.run_policy(POLICY_ID, message, context)
    except PolicyError as exc:
        log.debug("demo_policy_run_failed", policy_id=POLICY_ID, reason=exc.reason)


async def _cycle_flaky(samples: SampleRunner, stop: asyncio.Event) -> None:
    for seconds, rate in itertools.cycle(FLAKY_CYCLE):
        samples.flaky.settings = FlakySettings(failure_rate=rate)
        log.info("demo_flaky_phase", failure_rate=rate, seconds=seconds)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)
        if stop.is_set():
            return
