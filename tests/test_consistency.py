"""Commit order decides what is current: caches converge on the database's committed state
whatever the order in which transactions start and commit, and every writer goes through the
one write path (per-id lock, `If-Match` checked inside the transaction).

Concurrent transactions are driven from psycopg's async connections, so the event loop that
runs the registries never blocks on them.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from api_helpers import database_api
from helpers import make_settings, record
from lock_helpers import until_one_waits

from extreg.adapters.postgres import WRITE_LOCK_CLASS, PostgresSource
from extreg.api import create_app
from extreg.core.model import Extension, parse_extension
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings

DEADLINE_S = 20.0  # generous: a busy 2-core machine


async def until(condition: Callable[[], Awaitable[bool]], what: str) -> None:
    """Wait until `condition()` holds, failing with `what` after DEADLINE_S."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while not await condition():
        if loop.time() > deadline:
            raise AssertionError(f"not within {DEADLINE_S} s: {what}")
        await asyncio.sleep(0.01)


def parse(data: dict[str, Any]) -> Extension:
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)


async def stored(db: PostgresSource) -> dict[str, Extension]:
    return {e.id: e for e in await db.load_all_extensions()}


def cached(reg: Registry) -> dict[str, Extension]:
    return {e.id: e for e in reg.all()}


async def all_equal(regs: list[Registry], db: PostgresSource) -> bool:
    truth = await stored(db)
    return all(cached(r) == truth for r in regs)


@asynccontextmanager
async def nodes(settings: Settings, count: int) -> AsyncIterator[list[Registry]]:
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(Registry.open(settings)) for _ in range(count)]


async def connect(url: str) -> psycopg.AsyncConnection[Any]:
    return await psycopg.AsyncConnection.connect(url, autocommit=True)


async def drop_notify_triggers(url: str) -> None:
    conn = await connect(url)
    async with conn:
        for table in ("extensions", "extension_versions", "extension_instances"):
            await conn.execute(f"DROP TRIGGER extreg_notify ON {table}")


async def start_first_commit_last(
    url: str, on_commit_of_second: Callable[[], Awaitable[None]]
) -> None:
    """The issue's reproduction: A begins (its `now()` fixed), B changes `x` and commits, then
    A changes `x` and commits. A's row carries the *older* `updated_at`, yet it is current."""
    a = await connect(url)
    b = await connect(url)
    async with a, b:
        await a.execute("BEGIN")
        await a.execute("SELECT now()")
        await b.execute("UPDATE extensions SET retry = 2 WHERE id = 'x'")
        await on_commit_of_second()
        await a.execute("UPDATE extensions SET enabled = false WHERE id = 'x'")
        await a.execute("COMMIT")


async def test_notifications_follow_commit_order_not_start_time(
    tmp_path: Path, db_url: str
) -> None:
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=3600
    )
    async with PostgresSource(settings) as db:
        await db.import_extensions([parse(record("x"))], "test")
        async with nodes(settings, 2) as regs:

            async def second_committed() -> None:
                async def seen() -> bool:
                    return all(r.get("x").retry == 2 for r in regs)  # type: ignore[union-attr]

                await until(seen, "B's change reached every cache")

            await start_first_commit_last(db_url, second_committed)
            final = (await stored(db))["x"]
            assert (False, 2) == (final.enabled, final.retry)

            await until(lambda: all_equal(regs, db), "every cache holds enabled=false, retry=2")
            for reg in regs:
                await reg.sync()
                assert cached(reg) == await stored(db)


async def test_sync_follows_commit_order_not_start_time(tmp_path: Path, db_url: str) -> None:
    """With no notifications at all, the sync alone converges on the same interleaving."""
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=3600
    )
    await drop_notify_triggers(db_url)
    async with PostgresSource(settings) as db:
        await db.import_extensions([parse(record("x"))], "test")
        async with nodes(settings, 1) as (reg,):

            async def second_committed() -> None:
                await reg.sync()
                assert 2 == reg.get("x").retry  # type: ignore[union-attr]

            await start_first_commit_last(db_url, second_committed)
            await reg.sync()
            assert cached(reg) == await stored(db)
            assert False is reg.get("x").enabled  # type: ignore[union-attr]


@pytest.mark.parametrize("notify", [True, False], ids=["notifications", "sync-only"])
async def test_random_interleavings_converge_on_the_database(
    tmp_path: Path, db_url: str, notify: bool
) -> None:
    """Property-style: writers whose begin, updates and commit (or rollback) interleave at
    random, as row locks allow, leave every node equal to the database."""
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=3600
    )
    if not notify:
        await drop_notify_triggers(db_url)
    ids = ["a", "b", "c"]
    rng = random.Random(8)
    async with PostgresSource(settings) as db:
        await db.import_extensions([parse(record(i)) for i in ids], "test")
        async with nodes(settings, 2) as regs:
            for _ in range(25):
                await run_random_writers(db_url, ids, rng)
                if notify:
                    await until(lambda: all_equal(regs, db), "every node equals the database")
                for reg in regs:
                    await reg.sync()
                    assert cached(reg) == await stored(db)


async def run_random_writers(url: str, ids: list[str], rng: random.Random) -> None:
    """Four transactions, each: BEGIN, two or three single-row updates, COMMIT or ROLLBACK.
    Steps of different transactions are interleaved at random, except that an update waits
    (is not picked) while another open transaction holds that row, as its lock would make it;
    each transaction updates rows in id order, so no two wait for each other."""
    plans = []
    for _ in range(4):
        steps: list[tuple[str, ...]] = [("BEGIN",)]
        steps += sorted(
            (
                "UPDATE",
                rng.choice(ids),
                rng.choice(["enabled", "retry", "timeout_ms"]),
                str(rng.randint(0, 9)),
            )
            for _ in range(rng.randint(2, 3))
        )
        steps.append(("COMMIT",) if rng.random() < 0.8 else ("ROLLBACK",))
        plans.append(steps)
    conns = [await connect(url) for _ in plans]
    holder: dict[str, int] = {}  # row id -> transaction holding its lock
    try:
        while any(plans):
            ready = [
                n
                for n, steps in enumerate(plans)
                if steps and (steps[0][0] != "UPDATE" or holder.get(steps[0][1], n) == n)
            ]
            n = rng.choice(ready)
            step = plans[n].pop(0)
            if step[0] == "UPDATE":
                _, ext_id, column, value = step
                holder[ext_id] = n
                expr = {"enabled": f"{value} < 5", "retry": value, "timeout_ms": f"{value} + 100"}
                await conns[n].execute(
                    f"UPDATE extensions SET {column} = {expr[column]} WHERE id = %s", (ext_id,)
                )
                continue
            await conns[n].execute(step[0])
            if step[0] == "BEGIN":
                await conns[n].execute("SELECT now()")  # the transaction's stamp is fixed here
            else:
                for ext_id in [i for i, h in holder.items() if h == n]:
                    del holder[ext_id]
    finally:
        for conn in conns:
            await conn.close()


async def test_stale_if_match_cannot_undo_an_acknowledged_disable(
    tmp_path: Path, db_url: str
) -> None:
    """The issue's race: a PATCH with `If-Match` on node 1 against `POST .../disable` on node
    2, 100 rounds. Whenever the disable answered 200, the extension ends disabled (the PATCH,
    if it came second, answers 412)."""
    async with database_api(tmp_path / "n1", db_url) as one:
        settings = make_settings(tmp_path / "n2", source="database", database_url=db_url)
        async with (
            Registry.open(settings) as registry,
            Runtime.open(settings, registry, metrics=Metrics()) as runtime,
        ):
            transport = httpx.ASGITransport(app=create_app(runtime))
            async with httpx.AsyncClient(transport=transport, base_url="http://two") as two:
                admin = one.auth("admin")
                outcomes: dict[tuple[int, int], int] = {}
                for n in range(100):
                    enabled = await one.client.post("/admin/extensions/alpha/enable", headers=admin)
                    assert 200 == enabled.status_code
                    patch, disable = await asyncio.gather(
                        one.client.patch(
                            "/admin/extensions/alpha",
                            json={"retry": n % 5},
                            headers={**admin, "If-Match": enabled.headers["etag"]},
                        ),
                        two.post("/admin/extensions/alpha/disable", headers=admin),
                    )
                    key = (patch.status_code, disable.status_code)
                    outcomes[key] = outcomes.get(key, 0) + 1
                    assert 200 == disable.status_code
                    assert patch.status_code in (200, 412), patch.text
                    final = await registry.database.load_extension("alpha")
                    assert final is not None
                    assert False is final.enabled, f"round {n}: {key}"
                assert {(200, 200), (412, 200)} >= outcomes.keys()


WRITERS: dict[str, Callable[[PostgresSource], Coroutine[Any, Any, object]]] = {
    "set_enabled": lambda db: db.set_enabled("x", False, "test"),
    "enable_if_disabled_by": lambda db: db.enable_if_disabled_by("x", "extreg:auto", "test"),
    "delete_extension": lambda db: db.delete_extension("x", "test"),
    "import_extensions": lambda db: db.import_extensions([parse(record("x", retry=3))], "test"),
    "create": lambda db: db.upsert_extension(parse(record("new_one")), "test"),
}


@pytest.mark.parametrize("writer", sorted(WRITERS))
async def test_every_writer_takes_the_per_id_lock(tmp_path: Path, db_url: str, writer: str) -> None:
    """While another session holds the write lock of an id, every kind of write of that id
    waits for it (creation of a new id included, where there is no row to lock yet)."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db:
        await db.import_extensions([parse(record("x"))], "test")
        target = "new_one" if writer == "create" else "x"
        holder = await connect(db_url)
        async with holder:
            await holder.execute("BEGIN")
            await holder.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s) & 255)", (WRITE_LOCK_CLASS, target)
            )
            task = asyncio.create_task(WRITERS[writer](db))

            await until_one_waits(holder, f"{writer} waits for the lock", DEADLINE_S)
            assert not task.done()
            await holder.execute("COMMIT")
            await asyncio.wait_for(task, DEADLINE_S)
