"""Change notifications that carry their record (migration 008; docs/design.md, "Change feed").

A listener applies a notification's record without reading PostgreSQL; one that does not fit
the payload is read back; a record that breaks a rule is left out as a read leaves it out;
and the cache never moves back when a notification is older than a read it already holds.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import psycopg
from helpers import make_settings, record
from test_registry import insert, sql, wait_for

from extreg import Registry
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from testsupport.pgcount import StatementCounter
from testsupport.pgprocess import PostgresProcess


def full_record(ext_id: str, **values: object) -> dict[str, object]:
    return record(
        ext_id,
        versions=[
            {"version": "1.0.0", "subject": f"beamline.ext.pre.{ext_id}.v1"},
            {"version": "2.0.0", "subject": f"beamline.ext.pre.{ext_id}.v2", "enabled": False},
        ],
        instances=[
            {"instance_id": "a", "subject": f"beamline.ext.pre.{ext_id}.a", "weight": 30},
            {"instance_id": "b", "subject": f"beamline.ext.pre.{ext_id}.b"},
        ],
        **values,
    )


def parsed(data: dict[str, object]):  # type: ignore[no-untyped-def]
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)


async def notifications(url: str, count: int, write) -> list[str]:  # type: ignore[no-untyped-def]
    """The payloads of the first `count` notifications sent while `write()` runs."""
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True)
    async with conn:
        await conn.execute("LISTEN extreg_changes")
        await write()
        payloads = []
        async for notify in conn.notifies(timeout=10, stop_after=count):
            payloads.append(notify.payload)
        return payloads


async def test_a_write_notifies_once_with_the_record_as_a_read_renders_it(
    tmp_path: Path, db_url: str
) -> None:
    """One notification per extension and transaction, however many rows changed, carrying
    the record exactly as the adapter's read returns it (versions, instances, stamps)."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db:

        async def write() -> None:
            await db.import_extensions([parsed(full_record("rich"))], "test")
            await db.upsert_extension(parsed(record("plain")), "test")

        payloads = await notifications(db_url, 3, write)
        assert len(payloads) == 2, payloads  # 1 extension row + 2 versions + 2 instances: one
        notices = [db.notice(p) for p in payloads]
        assert [n.key for n in notices] == ["rich", "plain"]
        assert all(n.xid is not None for n in notices)
        assert notices[0].record == await db.load_extension("rich")
        assert notices[1].record == await db.load_extension("plain")

        async def delete() -> None:
            await db.delete_extension("rich", "test")

        [gone] = await notifications(db_url, 1, delete)
        notice = db.notice(gone)
        assert (notice.key, notice.record) == ("rich", None)
        assert notice.xid is not None


async def test_a_record_too_large_to_carry_is_notified_by_id(tmp_path: Path, db_url: str) -> None:
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db:
        big = parsed(record("big", config={"blob": "x" * 9000}))

        async def write() -> None:
            await db.upsert_extension(big, "test")

        [payload] = await notifications(db_url, 1, write)
        notice = db.notice(payload)
        assert (notice.key, notice.xid, notice.record) == ("big", None, None)
    async with Registry.open(settings) as reg:
        async with PostgresSource(settings) as db:
            await db.upsert_extension(parsed(record("big", config={"blob": "y" * 9000})), "test")
        await wait_for(lambda: (e := reg.get("big")) is not None and e.config["blob"][0] == "y")


async def test_a_carried_change_reaches_the_cache_without_a_statement(
    tmp_path: Path, pg_server: PostgresProcess
) -> None:
    """Counted at the server: the registry's database connections send nothing between the
    commit and the change in the cache (the writer's own statements are on its connection)."""
    url = pg_server.create_database("carried")
    from extreg.adapters.migrate import migrate

    migrate(url)
    counter = StatementCounter(pg_server.root / "log", url)
    insert(url, "one", timeout_ms=100)
    settings = make_settings(tmp_path, source="database", database_url=url)
    async with Registry.open(settings) as reg:
        await asyncio.sleep(0.2)  # let the boot's statements be logged before the mark
        start = counter.mark()
        sql(url, "UPDATE extensions SET timeout_ms = 222 WHERE id = 'one'")
        await wait_for(lambda: (e := reg.get("one")) is not None and e.timeout_ms == 222)
        assert counter.count_since(start) == 1  # the UPDATE itself


async def test_a_record_that_breaks_a_rule_is_left_out_as_a_read_leaves_it(
    tmp_path: Path, db_url: str
) -> None:
    insert(db_url, "ok")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        sql(db_url, "UPDATE extensions SET subject = 'beamline.>' WHERE id = 'ok'")
        await wait_for(lambda: reg.get("ok") is None)
        assert "subject" in reg.status.invalid_records["ok"]
        sql(db_url, "UPDATE extensions SET subject = 'beamline.ext.pre.ok.v1' WHERE id = 'ok'")
        await wait_for(lambda: reg.get("ok") is not None)
        assert reg.status.invalid_records == {}


async def test_a_notification_older_than_a_read_does_not_move_the_cache_back(
    tmp_path: Path, db_url: str
) -> None:
    """The interleaving of a notification queued while a read saw a newer commit: the read's
    snapshot saw the notification's transaction, so the notification is skipped; one the read
    did not see is applied."""
    insert(db_url, "x", timeout_ms=100)
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db, Registry.open(settings) as reg:

        async def to_200() -> None:
            sql(db_url, "UPDATE extensions SET timeout_ms = 200 WHERE id = 'x'")

        [old] = await notifications(db_url, 1, to_200)
        sql(db_url, "UPDATE extensions SET timeout_ms = 300 WHERE id = 'x'")
        await reg.refresh(["x"])  # a read that saw both commits
        assert reg.get("x").timeout_ms == 300  # type: ignore[union-attr]
        await reg._apply_notices([db.notice(old)])  # the first commit's, arriving late
        assert reg.get("x").timeout_ms == 300  # type: ignore[union-attr]

        async def to_400() -> None:
            sql(db_url, "UPDATE extensions SET timeout_ms = 400 WHERE id = 'x'")

        [new] = await notifications(db_url, 1, to_400)
        await reg._apply_notices([db.notice(new)])  # a commit the read did not see
        assert reg.get("x").timeout_ms == 400  # type: ignore[union-attr]


async def test_concurrent_writers_of_one_extension_leave_the_cache_as_committed(
    tmp_path: Path, db_url: str
) -> None:
    """Two plain-SQL transactions change one extension without conflicting row locks (one
    updates its row, one adds an instance, which locks it only KEY SHARE) and commit one after
    the other: the notification of the second carries the first's change too."""
    insert(db_url, "x", timeout_ms=100)
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        a = await psycopg.AsyncConnection.connect(db_url)
        b = await psycopg.AsyncConnection.connect(db_url)
        async with a, b:
            await a.execute("UPDATE extensions SET timeout_ms = 555 WHERE id = 'x'")
            await b.execute(
                "INSERT INTO extension_instances (extension_id, instance_id, subject)"
                " VALUES ('x', 'i1', 'beamline.ext.pre.x.i1')"
            )
            b_commit = asyncio.create_task(b.commit())  # waits for a's row lock at commit
            await asyncio.sleep(0.2)
            assert not b_commit.done()
            await a.commit()
            await b_commit
        async with PostgresSource(settings) as db:
            stored = await db.load_extension("x")
        assert stored is not None and stored.timeout_ms == 555 and len(stored.instances) == 1
        await wait_for(lambda: reg.get("x") == stored)


def test_the_payload_shape_is_json_with_id_and_xid(db_url: str) -> None:
    """What a tool listening on `extreg_changes` sees (documented in docs/design.md)."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("LISTEN extreg_changes")
        insert(db_url, "shape")
        [notify] = list(conn.notifies(timeout=10, stop_after=1))
    payload = msgspec.json.decode(notify.payload)
    assert set(payload) == {"id", "xid", "record"}
    assert payload["id"] == "shape" and payload["record"]["id"] == "shape"
    assert int(payload["xid"]) > 0


async def test_a_writer_not_in_read_committed_is_notified_by_id(
    tmp_path: Path, db_url: str
) -> None:
    """A REPEATABLE READ transaction would render the record with its own, older snapshot
    (missing commits it does not see): its notification names the id, to be read back."""
    insert(db_url, "x")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db:

        async def write() -> None:
            await write_in_repeatable_read(db_url, 808)

        [payload] = await notifications(db_url, 1, write)
        notice = db.notice(payload)
        assert (notice.key, notice.xid, notice.record) == ("x", None, None)
    async with Registry.open(settings) as reg:
        await write_in_repeatable_read(db_url, 909)
        await wait_for(lambda: (e := reg.get("x")) is not None and e.timeout_ms == 909)


async def write_in_repeatable_read(url: str, timeout_ms: int) -> None:
    conn = await psycopg.AsyncConnection.connect(url)
    async with conn:
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        await conn.execute("UPDATE extensions SET timeout_ms = %s WHERE id = 'x'", (timeout_ms,))
        await conn.commit()


async def test_a_notified_record_encodes_as_a_read_one_whatever_the_writers_time_zone(
    tmp_path: Path, db_url: str
) -> None:
    """Times render in UTC in notifications and reads alike, so ETags (made from the encoded
    record) agree however the writer's session is set."""
    insert(db_url, "x")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with PostgresSource(settings) as db:

        async def write() -> None:
            with psycopg.connect(db_url, autocommit=True) as conn:
                conn.execute("SET TimeZone = 'Asia/Tokyo'")
                conn.execute("UPDATE extensions SET timeout_ms = 321 WHERE id = 'x'")

        [payload] = await notifications(db_url, 1, write)
        notified = db.notice(payload).record
        read = await db.load_extension("x")
        assert notified is not None and read is not None
        assert msgspec.json.encode(notified) == msgspec.json.encode(read)
