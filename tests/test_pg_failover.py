"""Issue 15, item 3: PostgreSQL high availability (SPEC.md, "Scale: past one machine").

Two registries ("nodes") follow a primary and its streaming standby through one multi-host URL
(`target_session_attrs=read-write`). The primary goes away (a clean shutdown, or a crash) and
the standby is promoted. Shown: lookups never fail on either node; a write through the
registry's `PostgresSource` succeeds on the new primary once it is promoted (retried until
then, as a client would); the change reaches both caches through their change listeners,
which must have moved to the new primary by themselves (no `refresh`, and a sync interval
far longer than the test); and no status or error ever shows the database password.

Waits are on conditions with generous deadlines; how long each step took is printed, never
asserted (a loaded machine decides).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from helpers import make_settings, record

from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource, location_of
from extreg.core.model import Extension, parse_extension
from extreg.errors import ExtregError, SourceUnavailable
from extreg.registry import Registry
from extreg.settings import Settings
from testsupport.pgha import PostgresPair

PASSWORD = "failover-pw-7d1e"  # must never appear in a status, a display or an error
IDS = ("alpha", "beta", "gamma", "delta")
DEADLINE_S = 60.0  # for every awaited condition; fails only what never happens


@pytest.fixture
def pair() -> Iterator[PostgresPair]:
    with PostgresPair(password=PASSWORD) as running:
        yield running


def ext(ext_id: str, **values: object) -> Extension:
    return parse_extension(record(ext_id, **values), max_timeout_ms=60_000, max_retries=10)


@dataclass
class LookupLoad:
    """Looks every id up on every registry, one lookup per loop turn, and keeps what each
    node's status said (to check for the password afterwards)."""

    registries: list[Registry]
    lookups: int = 0
    failures: list[str] = field(default_factory=list)
    statuses: set[str] = field(default_factory=set)
    stale_seen: bool = False

    async def run(self) -> None:
        while True:
            for registry in self.registries:
                for ext_id in IDS:
                    try:
                        registry.lookup(ext_id)
                    except ExtregError as exc:
                        self.failures.append(f"{ext_id}: {exc!r}")
                    self.lookups += 1
                    await asyncio.sleep(0)
                status = registry.status
                self.stale_seen |= status.stale
                self.statuses.add(repr(status))


async def wait_until(condition: Callable[[], bool], what: str) -> float:
    """Seconds until `condition()` held; fails after DEADLINE_S."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > DEADLINE_S:
            pytest.fail(f"{what}: not within {DEADLINE_S:g} s")
        await asyncio.sleep(0.01)
    return time.monotonic() - started


@dataclass
class Writer:
    """Writes through a `PostgresSource` as a client would: retrying while the database is
    unavailable, until a deadline."""

    db: PostgresSource
    refused: int = 0
    succeeded_at: float = 0.0

    async def write(self, change: Extension) -> None:
        started = time.monotonic()
        while True:
            try:
                await self.db.upsert_extension(change, "test:failover")
                self.succeeded_at = time.monotonic()
                return
            except SourceUnavailable as exc:
                assert PASSWORD not in str(exc)
                self.refused += 1
                if time.monotonic() - started > DEADLINE_S:
                    pytest.fail(f"no write succeeded within {DEADLINE_S:g} s: {exc}")
                await asyncio.sleep(0.05)


def timeout_of(registry: Registry, ext_id: str) -> int:
    return registry.lookup(ext_id).timeout_ms


@pytest.mark.parametrize(
    ("failure", "feed"), [("stop", "listen"), ("kill", "listen"), ("kill", "nats")]
)
async def test_lookups_never_fail_and_writes_resume_across_a_failover(
    tmp_path: Path, pair: PostgresPair, nats_url: str, failure: str, feed: str
) -> None:
    """With `change_feed=nats`, the publisher's listener moves to the new primary the same way
    (or another node takes over), and the follower gets the changes from it."""
    migrate(pair.primary.create_database("extreg"))
    url = pair.multi_host_url("extreg")

    def settings_of(node: str) -> Settings:
        return make_settings(
            tmp_path / node,
            source="database",
            database_url=url,
            nats_url=nats_url,
            change_feed=feed,
            change_feed_subject=f"extreg.feed.failover.{failure}",
        )

    settings = settings_of("a")
    async with PostgresSource(settings) as seeder:
        await seeder.import_extensions([ext(i) for i in IDS], "test:seed")
    async with Registry.open(settings) as registry, Registry.open(settings_of("b")) as other:
        assert [100] * 4 == [timeout_of(registry, i) for i in IDS]
        load = LookupLoad([registry, other])
        tasks = [asyncio.create_task(load.run())]
        try:
            await asyncio.to_thread(pair.wait_replayed)
            await asyncio.to_thread(pair.stop_primary if failure == "stop" else pair.kill_primary)
            writer = Writer(registry.database)
            tasks.append(writing := asyncio.create_task(writer.write(ext("alpha", timeout_ms=201))))
            await wait_until(lambda: writer.refused >= 1, "a write refused while no primary")
            promoted_at = time.monotonic()
            await asyncio.to_thread(pair.promote)
            promoted_s = time.monotonic() - promoted_at
            await writing
            written_s = writer.succeeded_at - promoted_at
            seen_s = await wait_until(
                lambda: timeout_of(registry, "alpha") == 201, "the write reached the cache"
            )
            await wait_until(lambda: timeout_of(other, "alpha") == 201, "it reached node b")
            # The caches got that write by a reload or a notification; either way both
            # listeners now follow the new primary, so the next write comes by notification.
            await Writer(registry.database).write(ext("beta", timeout_ms=202))
            notified_s = await wait_until(
                lambda: timeout_of(registry, "beta") == 202 == timeout_of(other, "beta"),
                "a write after the failover reached both caches",
            )
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        print(
            f"\n{failure}: {writer.refused} writes refused; promotion {promoted_s:.2f} s; first"
            f" write {written_s:.2f} s after the promotion began; in the cache {seen_s:.2f} s"
            f" after that; next write in both caches in {notified_s:.3f} s;"
            f" {load.lookups:,} lookups, stale seen: {load.stale_seen}"
        )
        assert [] == load.failures[:5]
        assert load.lookups > 0
        assert not registry.status.stale and not other.status.stale
        shown = [*load.statuses, repr(registry.status), repr(other.status)]
        assert not [s for s in shown if PASSWORD in s]
        assert registry.status.database is not None and "********" in registry.status.database


def test_a_multi_host_url_is_shown_without_its_password() -> None:
    url = (
        f"postgresql://postgres:{PASSWORD}@10.0.0.1:5432,10.0.0.2:5433/extreg"
        "?target_session_attrs=read-write"
    )
    settings = Settings.load(environ={}, source="database", database_url=url)
    assert (
        "postgresql://postgres:********@10.0.0.1:5432,10.0.0.2:5433/extreg"
        "?target_session_attrs=read-write"
    ) == settings.db_display
    assert PASSWORD not in repr(settings)
    assert PASSWORD not in location_of(url)
