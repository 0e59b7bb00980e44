"""The registry in each source mode, its freshness machinery, and its failure behaviour.

Everything runs against a real PostgreSQL; tests that stop the database start their own.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest
from helpers import make_settings, record
from invoke_helpers import FakeClock
from structlog.testing import capture_logs
from structlog.typing import EventDict

from extreg import ExtensionDisabled, ExtensionNotFound, Registry
from extreg.adapters.postgres import location_of
from extreg.adapters.snapshot_file import Origin, read_snapshot_file
from extreg.errors import FixtureError, SourceUnavailable
from testsupport.pgprocess import PostgresProcess, free_port


def write_fixtures(folder: Path, *records: dict[str, object], name: str = "ext.json") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(json.dumps(list(records)), encoding="utf-8")
    return folder


def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


def insert(url: str, ext_id: str, **values: object) -> None:
    row = {"type": "pre", "subject": f"beamline.ext.pre.{ext_id}.v1", "timeout_ms": 100, **values}
    cols = ", ".join(["id", *row])
    marks = ", ".join(["%s"] * (len(row) + 1))
    sql(url, f"INSERT INTO extensions ({cols}) VALUES ({marks})", (ext_id, *row.values()))


def unreachable_url() -> str:
    return f"postgresql://postgres:hunter2@127.0.0.1:{free_port()}/nothing"


DEADLINE_S = 30.0  # generous: fails only what never happens


async def wait_for(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> float:
    """Poll until `condition()` holds; return the seconds it took, fail after `timeout`."""
    started = time.perf_counter()
    while not condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.005)
    return time.perf_counter() - started


# -- the seed's eight dual-mode cases ----------------------------------------------------------


async def test_fixtures_mode(tmp_path: Path, db_url: str) -> None:
    """source=fixtures serves the fixtures even with a reachable database holding other rows."""
    insert(db_url, "from_db")
    folder = write_fixtures(tmp_path / "fx", record("fx_a"), record("fx_b", type="post"))
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder, database_url=db_url)
    async with Registry.open(settings) as reg:
        assert ["fx_a", "fx_b"] == [e.id for e in reg.all()]
        status = reg.status
        assert ("fixtures", "fixtures", None, False) == (
            status.mode,
            status.source,
            status.fallback_reason,
            status.stale,
        )


async def test_database_mode(tmp_path: Path, db_url: str) -> None:
    """source=database serves the database's rows, fresh."""
    insert(db_url, "db_a")
    insert(db_url, "db_b", enabled=False)
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        assert ["db_a", "db_b"] == [e.id for e in reg.all()]
        assert ("database", "database", False, 2, 1) == (
            reg.status.mode,
            reg.status.source,
            reg.status.stale,
            reg.status.count,
            reg.status.enabled_count,
        )


async def test_auto_mode_database_available(tmp_path: Path, db_url: str) -> None:
    """source=auto with the database up serves the database, not the fixtures."""
    insert(db_url, "db_a")
    folder = write_fixtures(tmp_path / "fx", record("fx_a"))
    settings = make_settings(tmp_path, source="auto", fixtures_dir=folder, database_url=db_url)
    async with Registry.open(settings) as reg:
        assert ["db_a"] == [e.id for e in reg.all()]
        assert ("database", None) == (reg.status.source, reg.status.fallback_reason)


async def test_auto_mode_database_unavailable(tmp_path: Path) -> None:
    """source=auto with the database down falls back to fixtures and says why, without the
    password."""
    folder = write_fixtures(tmp_path / "fx", record("fx_a"))
    settings = make_settings(
        tmp_path, source="auto", fixtures_dir=folder, database_url=unreachable_url()
    )
    async with Registry.open(settings) as reg:
        assert ["fx_a"] == [e.id for e in reg.all()]
        status = reg.status
        assert "fixtures" == status.source
        assert status.fallback_reason is not None
        assert "unavailable" in status.fallback_reason
        assert "hunter2" not in json.dumps(status.as_dict())


async def test_periodic_sync_picks_up_plain_sql_change(tmp_path: Path, db_url: str) -> None:
    """With notifications switched off in the database, the periodic sync alone brings in an
    insert, an update and a delete made with plain SQL."""
    insert(db_url, "keep")
    insert(db_url, "gone")
    for table in ("extensions", "extension_versions", "extension_instances"):
        sql(db_url, f"DROP TRIGGER extreg_notify ON {table}")
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=0.2
    )
    async with Registry.open(settings) as reg:
        insert(db_url, "new")
        sql(db_url, "UPDATE extensions SET timeout_ms = 777 WHERE id = 'keep'")
        sql(db_url, "DELETE FROM extensions WHERE id = 'gone'")
        await wait_for(
            lambda: (
                [e.id for e in reg.all()] == ["keep", "new"]
                and reg.lookup("keep").timeout_ms == 777
            )
        )
        assert reg.status.last_sync_at is not None


async def test_times_come_from_the_given_clock(tmp_path: Path, db_url: str) -> None:
    """`Registry.open(..., clock=)` dates loads and syncs by that clock, not the system's."""
    insert(db_url, "a")
    clock = FakeClock(wall=1_780_000_000.0)
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=0.05
    )
    async with Registry.open(settings, clock=clock) as reg:
        loaded = reg.status.loaded_at
        clock.advance(60)
        await wait_for(lambda: reg.status.last_sync_at is not None)
        synced = reg.status.last_sync_at
    start = datetime.fromtimestamp(1_780_000_000.0, UTC)
    assert (start, start + timedelta(seconds=60)) == (loaded, synced)


async def test_reload_fixtures(tmp_path: Path) -> None:
    """reload() in fixtures mode reads the folder again and reports what changed."""
    folder = write_fixtures(tmp_path / "fx", record("a"), record("b"))
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    async with Registry.open(settings) as reg:
        write_fixtures(folder, record("a", timeout_ms=300), record("c"))
        report = await reg.reload()
        assert ("fixtures", 2, 1, 1, 1) == (
            report.source,
            report.count,
            report.added,
            report.removed,
            report.changed,
        )
        assert 300 == reg.lookup("a").timeout_ms


async def test_reload_database(tmp_path: Path, db_url: str) -> None:
    """reload() in database mode reads every row again (here, one no notification announced)."""
    insert(db_url, "a")
    sql(db_url, "DROP TRIGGER extreg_notify ON extensions")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        insert(db_url, "b")
        assert ["a"] == [e.id for e in reg.all()]
        report = await reg.reload()
        assert ("database", 2, 1) == (report.source, report.count, report.added)
        assert ["a", "b"] == [e.id for e in reg.all()]


async def test_reload_auto_mode(tmp_path: Path, db_url: str) -> None:
    """reload() in auto mode reads the database when it is up, and the fixtures when it is not."""
    insert(db_url, "a")
    folder = write_fixtures(tmp_path / "fx", record("fx"))
    settings = make_settings(tmp_path, source="auto", fixtures_dir=folder, database_url=db_url)
    async with Registry.open(settings) as reg:
        sql(db_url, "DROP TRIGGER extreg_notify ON extensions")
        insert(db_url, "b")
        assert ("database", 2) == ((r := await reg.reload()).source, r.count)
    down = make_settings(
        tmp_path, source="auto", fixtures_dir=folder, database_url=unreachable_url()
    )
    async with Registry.open(down) as reg:
        write_fixtures(folder, record("fx"), record("fx2"))
        report = await reg.reload()
        assert ("fixtures", 2) == (report.source, report.count)


# -- reads -------------------------------------------------------------------------------------


async def test_lookup_present_missing_disabled_and_by_type(tmp_path: Path) -> None:
    """lookup returns enabled records and raises the precise error otherwise; lookup_by_type
    lists only enabled records of that type; get and all include disabled ones."""
    folder = write_fixtures(
        tmp_path / "fx",
        record("on"),
        record("off", enabled=False),
        record("val", type="validator"),
        record("on2"),
    )
    async with Registry.open(
        make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    ) as reg:
        assert "on" == reg.lookup("on").id
        with pytest.raises(ExtensionNotFound) as missing:
            reg.lookup("nope")
        assert "nope" == missing.value.extension_id
        with pytest.raises(ExtensionDisabled):
            reg.lookup("off")
        assert ["on", "on2"] == [e.id for e in reg.lookup_by_type("pre")]
        assert ["val"] == [e.id for e in reg.lookup_by_type("validator")]
        assert () == reg.lookup_by_type("provider")
        assert reg.get("off") is not None and reg.get("off").enabled is False  # type: ignore[union-attr]
        assert reg.get("nope") is None
        assert 4 == len(reg.all())


async def test_readers_never_miss_during_reloads(tmp_path: Path) -> None:
    """A reader thread looking up an id present before and after 100 reloads never misses it."""
    folder = write_fixtures(tmp_path / "fx", *(record(f"e{i}") for i in range(200)))
    async with Registry.open(
        make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    ) as reg:
        misses = 0
        lookups = 0
        stop = threading.Event()

        def reader() -> None:
            nonlocal misses, lookups
            while not stop.is_set():
                for i in range(200):
                    try:
                        reg.lookup(f"e{i}")
                    except ExtensionNotFound:
                        misses += 1
                    lookups += 1

        thread = threading.Thread(target=reader)
        thread.start()
        for _ in range(100):
            await reg.reload()
            await asyncio.sleep(0)
        stop.set()
        thread.join()
        assert 0 == misses
        assert lookups > 0
        assert 101 == reg.status.generation


# -- freshness ---------------------------------------------------------------------------------


async def test_notification_applies_sql_change(tmp_path: Path, db_url: str) -> None:
    """An insert, an update and a delete made with plain SQL in another connection reach the
    cache through notifications (the periodic sync is an hour away, so nothing else brings
    them; how fast they arrive is a benchmark's figure)."""
    insert(db_url, "a")
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, sync_interval_seconds=3600
    )
    async with Registry.open(settings) as reg:
        insert(db_url, "b")
        await wait_for(lambda: reg.get("b") is not None)
        sql(db_url, "UPDATE extensions SET enabled = false WHERE id = 'a'")
        await wait_for(lambda: not reg.get("a").enabled)  # type: ignore[union-attr]
        sql(
            db_url,
            "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry,"
            " routing_rules) VALUES ('b', 'v2', 'x.b.v2', 50, 0, '{\"tenant_id\": [\"t1\"]}')",
        )
        await wait_for(lambda: len(reg.lookup("b").versions) == 1)
        assert {"tenant_id": ["t1"]} == reg.lookup("b").versions[0].routing_rules
        sql(db_url, "DELETE FROM extensions WHERE id = 'b'")
        await wait_for(lambda: reg.get("b") is None)
        assert ["a"] == [e.id for e in reg.all()]


async def test_database_stopped_mid_run_keeps_serving_then_recovers(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    """With the database stopped, lookups keep answering and status says stale; when it
    returns, the registry recovers by itself and catches up with changes."""
    url = own_pg.create_database("reg")
    from extreg.adapters.migrate import migrate

    migrate(url)
    insert(url, "a")
    settings = make_settings(
        tmp_path, source="database", database_url=url, sync_interval_seconds=0.5
    )
    async with Registry.open(settings) as reg:
        own_pg.stop()
        await wait_for(lambda: reg.status.stale)
        assert "a" == reg.lookup("a").id
        assert "database" == reg.status.source
        assert reg.status.last_error is not None
        own_pg.start()
        insert(url, "b")
        await wait_for(lambda: not reg.status.stale and reg.get("b") is not None)
        assert ["a", "b"] == [e.id for e in reg.all()]


async def test_boot_from_snapshot_file_with_database_down(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    """source=database boots from the last-known-good snapshot file when the database is down,
    marked stale; then switches to the database when it comes back."""
    url = own_pg.create_database("snap")
    from extreg.adapters.migrate import migrate

    migrate(url)
    insert(url, "a")
    insert(url, "b", enabled=False)
    settings = make_settings(tmp_path, source="database", database_url=url)
    async with Registry.open(settings) as reg:
        served = reg.all()
    own_pg.stop()
    async with Registry.open(settings) as reg:
        assert served == reg.all()
        assert ("snapshot_file", True) == (reg.status.source, reg.status.stale)
        own_pg.start()
        await wait_for(lambda: reg.status.source == "database" and not reg.status.stale)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edit"])
async def test_corrupt_snapshot_file_is_refused(tmp_path: Path, damage: str) -> None:
    """A torn, garbage or edited snapshot file is refused with a clear error, so source=database
    with the database down does not boot on it."""
    settings = make_settings(tmp_path, source="database", database_url=unreachable_url())
    from extreg.adapters.snapshot_file import write_snapshot_file
    from extreg.core.model import parse_extension

    ext = parse_extension(record("a"), max_timeout_ms=60000, max_retries=10)
    location = location_of(settings.conninfo)
    write_snapshot_file(settings.snapshot_path, [ext], Origin(location, "nothing", "1"))
    data = settings.snapshot_path.read_bytes()
    damaged = {
        "truncate": data[: len(data) - 10],
        "garbage": b"\x00\xff not a snapshot",
        "edit": data.replace(b'"timeout_ms":100', b'"timeout_ms":900'),
    }[damage]
    settings.snapshot_path.write_bytes(damaged)
    with pytest.raises(SourceUnavailable) as refused:
        async with Registry.open(settings):
            pass
    message = str(refused.value)
    assert "snapshot" in message
    assert "hunter2" not in message
    assert [ext] == read_snapshot_file_or_none(settings.snapshot_path, data, location)


def read_snapshot_file_or_none(path: Path, good: bytes, location: str) -> list[object]:
    """Restore the good bytes and read them, to show the file format itself round-trips."""
    path.write_bytes(good)
    return list(read_snapshot_file(path, location)[0])


async def watcher_live(folder: Path, events: list[EventDict]) -> None:
    """Touch a file that is no fixture until the folder watcher reloads: it is watching now."""
    for attempt in range(300):
        (folder / "ready.txt").write_text(str(attempt), encoding="utf-8")
        try:
            await wait_for(lambda: any(e["event"] == "reloaded" for e in events), 0.1)
            return
        except AssertionError:
            continue
    raise AssertionError("the fixtures watcher never started")


async def test_bad_fixtures_leave_the_cache_untouched(tmp_path: Path) -> None:
    """A reload with a bad fixtures folder raises and keeps serving the previous snapshot;
    the folder watcher rejects a bad edit (logged) and applies a good one."""
    folder = write_fixtures(tmp_path / "fx", record("a"))
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            await watcher_live(folder, events)
            before = reg.snapshot
            (folder / "bad.json").write_text('[{"id": "b", "type": "pre"', encoding="utf-8")
            with pytest.raises(FixtureError):
                await reg.reload()
            await wait_for(lambda: any(e["event"] == "fixtures_rejected" for e in events))
            assert before is reg.snapshot  # the watcher saw the bad file and kept the cache
            (folder / "bad.json").write_text(json.dumps(record("b")), encoding="utf-8")
            await wait_for(lambda: reg.get("b") is not None)
            assert ["a", "b"] == [e.id for e in reg.all()]


def test_snapshot_write_removes_old_leftovers_of_killed_writes(tmp_path: Path) -> None:
    """A temporary file left by a writer killed mid-write is removed by the next write once it
    is older than a minute; a fresh one (possibly another writer's) is left alone."""
    import os

    from extreg.adapters.snapshot_file import write_snapshot_file
    from extreg.core.model import parse_extension

    path = tmp_path / "snapshot.json"
    old = tmp_path / ".snapshot.json.abc.tmp"
    fresh = tmp_path / ".snapshot.json.def.tmp"
    old.write_bytes(b"x" * 100)
    fresh.write_bytes(b"y" * 100)
    os.utime(old, (time.time() - 120, time.time() - 120))
    origin = Origin("here:5432/db", "db", "1")
    write_snapshot_file(
        path, [parse_extension(record("a"), max_timeout_ms=60000, max_retries=10)], origin
    )
    assert (False, True) == (old.exists(), fresh.exists())
    assert ["a"] == [e.id for e in read_snapshot_file(path, origin.location)[0]]


# -- the snapshot file: written at once, kept per database, retried ---------------------------


async def test_short_lived_process_leaves_a_snapshot_file(tmp_path: Path, db_url: str) -> None:
    """A registry opened and closed at once (a CLI command, a script) leaves the file, with
    a change made just before the close in it."""
    insert(db_url, "a")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        insert(db_url, "b")
        await reg.refresh(["b"])
    records, _ = read_snapshot_file(settings.snapshot_path, location_of(db_url))
    assert ["a", "b"] == sorted(r.id for r in records)


async def test_snapshot_file_is_refused_for_another_database(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    """The file written from database A is not served when the registry boots against
    database B while B is down: the boot fails with an error naming both, password-free."""
    from extreg.adapters.migrate import migrate

    url_a = own_pg.create_database("db_a")
    own_pg.create_database("db_b")
    migrate(url_a)
    insert(url_a, "from_a")
    settings_a = make_settings(tmp_path, source="database", database_url=url_a)
    async with Registry.open(settings_a):
        pass
    assert settings_a.snapshot_path.exists()
    own_pg.stop()
    url_b = own_pg.url("db_b").replace("postgres@", "postgres:hunter2@")
    settings_b = make_settings(tmp_path, source="database", database_url=url_b)
    with pytest.raises(SourceUnavailable) as refused:
        async with Registry.open(settings_b):
            pass
    message = str(refused.value)
    assert "db_a" in message and "db_b" in message and "refusing" in message
    assert "hunter2" not in message
    async with Registry.open(settings_a) as reg:  # its own database still boots from it
        assert ["from_a"] == [e.id for e in reg.all()]
        assert "snapshot_file" == reg.status.source


async def test_failed_snapshot_write_is_retried_without_a_new_change(
    tmp_path: Path, db_url: str
) -> None:
    """When the file cannot be written, the registry retries on its own: once the obstacle
    goes, the file appears without any further change to the database."""
    insert(db_url, "a")
    blocker = tmp_path / "blocked"
    blocker.write_text("a file where the snapshot's folder should be")
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, snapshot_file=blocker / "snapshot.json"
    )
    with capture_logs() as events:
        async with Registry.open(settings):
            await wait_for(lambda: any(e["event"] == "snapshot_file_not_written" for e in events))
            assert not settings.snapshot_path.exists()
            blocker.unlink()
            await wait_for(settings.snapshot_path.exists)
    assert ["a"] == [
        r.id for r in read_snapshot_file(settings.snapshot_path, location_of(db_url))[0]
    ]


def test_scrub_masks_the_password_raw_and_url_encoded() -> None:
    from extreg.adapters.postgres import scrub

    error = RuntimeError("connect to postgresql://u:p%40ss@h/db as u with p@ss failed")
    assert "connect to postgresql://u:********@h/db as u with ******** failed" == scrub(
        error, "p@ss"
    )


async def test_a_failed_boot_closes_its_connections(
    tmp_path: Path, pg_server: PostgresProcess
) -> None:
    """source=database on a database without extreg tables and no snapshot file: the boot fails
    with a clear error, and every connection it opened is closed."""
    url = pg_server.create_database("no_tables")
    settings = make_settings(tmp_path, source="database", database_url=url)
    with pytest.raises(SourceUnavailable, match="extreg migrate"):
        async with Registry.open(settings):
            pass

    def connections() -> int:
        with psycopg.connect(pg_server.url(), autocommit=True) as conn:
            row = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'no_tables'"
            ).fetchone()
        return int(row[0]) if row else 0

    await wait_for(lambda: connections() == 0, 20)
