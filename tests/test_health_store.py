"""Health persistence with a real PostgreSQL: additive writes from several nodes, exactly once
across a database restart and a failed commit, cluster-wide totals read back, and no database
statement on the invocation path (counted at the server)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import make_settings
from invoke_helpers import SAMPLE_RECORDS, open_invoker, wait_for
from nats.aio.client import Client

from extreg import Registry, Settings
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.adapters.postgres_health import HealthBatch
from extreg.core.health import HealthMonitor
from extreg.core.model import parse_extension
from extreg.invoke import Invoker, adopt_totals
from extreg.local.samples import Flaky, SampleRunner
from testsupport.pgcount import StatementCounter
from testsupport.pgprocess import PostgresProcess

REQUEST = {"payload": {"message_id": "m-1", "payload": "Hi"}, "metadata": {}}
CONTEXT = {"trace_id": "t-1", "tenant_id": "acme"}


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def health_row(url: str, ext_id: str) -> tuple[int, int, int, float, int] | None:
    """(success_count, failure_count, latency_samples, latency_total_ms, sketch count)."""
    rows = query(url, "SELECT success_count, failure_count, latency_samples, latency_total_ms,"
                      " (latency_sketch->>'count')::float::int FROM extension_health"
                      " WHERE extension_id = %s", (ext_id,))  # fmt: skip
    return rows[0] if rows else None


async def seed(url: str, settings: Settings) -> None:
    """The sample records in the database."""
    records = [parse_extension(r, max_timeout_ms=60_000, max_retries=10) for r in SAMPLE_RECORDS]
    async with PostgresSource(settings) as db:
        await db.import_extensions(records, "test")


def db_settings(tmp_path: Path, url: str, nats_url: str, **values: Any) -> Settings:
    values.setdefault("health_flush_interval_seconds", 3600)  # flushed by hand unless asked
    return make_settings(tmp_path, source="database", database_url=url, nats_url=nats_url, **values)


async def calls(inv: Invoker, ok: int, failed: int, flaky: Flaky) -> None:
    """`ok` successful and `failed` invalid-reply calls of the flaky sample."""
    flaky.control({"failure_rate": 0.0})
    for _ in range(ok):
        await inv.invoke("flaky", REQUEST, CONTEXT)
    flaky.control({"failure_rate": 1.0, "failure_mode": "invalid"})
    for _ in range(failed):
        with pytest.raises(Exception, match="not a JSON object"):
            await inv.invoke("flaky", REQUEST, CONTEXT)
    flaky.control({"reset": True})


@pytest.fixture
async def seeded_db(db_url: str, tmp_path: Path, nats_url: str) -> AsyncIterator[str]:
    await seed(db_url, db_settings(tmp_path, db_url, nats_url))
    yield db_url


# -- the write ---------------------------------------------------------------------------------


async def test_batch_is_applied_once(tmp_path: Path, seeded_db: str, nats_url: str) -> None:
    """A batch written twice under the same (node, seq), as after a commit whose outcome was
    lost, is applied once: the second write reports False and changes nothing."""
    monitor = HealthMonitor()
    for ms in (10.0, 20.0, 30.0):
        monitor.record("flaky", True, ms)
    monitor.record("flaky", False, 40.0)
    batch = HealthBatch("node-a", 1)
    batch.absorb(monitor.drain_deltas(), {})
    async with PostgresSource(db_settings(tmp_path, seeded_db, nats_url)) as db:
        assert (True, False) == (await db.update_health(batch), await db.update_health(batch))
        assert (3, 1, 4, 100.0, 4) == health_row(seeded_db, "flaky")
        assert [(1,)] == query(
            seeded_db, "SELECT last_seq FROM extreg_health_nodes WHERE node_id = 'node-a'"
        )
        _, rows = await db.read_health(None, ["flaky"], recent_since=0.0)
    assert 1 == len(rows)
    totals = rows[0].totals
    assert (3, 1, 100.0, 4.0) == (
        totals.success_count,
        totals.failure_count,
        totals.latency_sum_ms,
        totals.sketch.count,
    )
    assert 20.0 == pytest.approx(totals.quantile(0.5), rel=0.02)


async def test_two_nodes_sum_exactly(
    tmp_path: Path,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """Two invokers (two nodes: own registries, own monitors) on one database: the stored counts
    are the exact sums, the sketch holds every call, and each node then shows the
    cluster-wide totals."""
    settings = db_settings(tmp_path, seeded_db, nats_url)
    async with open_invoker(settings) as node_a, open_invoker(settings) as node_b:
        await calls(node_a, 30, 5, flaky_extension)
        await calls(node_b, 20, 10, flaky_extension)
        local = [n.health.get_health("flaky")["success_count"] for n in (node_a, node_b)]
        assert (True, True) == (await node_a.flush_health(), await node_b.flush_health())
        await node_a.flush_health()  # reads back node_b's numbers too
        shown_a = node_a.health.get_health("flaky")
        shown_b = node_b.health.get_health("flaky")
        nodes = {node_a.flusher.node_id, node_b.flusher.node_id}
    stored = health_row(seeded_db, "flaky")
    assert [30, 20] == local
    assert (50, 15, 65, 65) == (stored[0], stored[1], stored[2], stored[4])  # type: ignore[index]
    assert (50, 15, round(50 / 65, 4)) == (
        shown_a["success_count"],
        shown_a["failure_count"],
        shown_a["success_rate"],
    )
    assert (50, 15) == (shown_b["success_count"], shown_b["failure_count"])
    assert [(True,)] == query(seeded_db, "SELECT avg_latency_ms = round((latency_total_ms / 65)"
                                         "::numeric, 2) FROM extension_health"
                                         " WHERE extension_id = 'flaky'")  # fmt: skip
    assert sorted(nodes) == [
        r[0] for r in query(seeded_db, "SELECT node_id FROM extreg_health_nodes ORDER BY node_id")
    ]


async def test_shown_totals_keep_unwritten_calls(
    tmp_path: Path,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """After a read-back, the monitor shows database totals plus this node's calls not yet
    written, and those calls are still written by the next flush (once)."""
    settings = db_settings(tmp_path, seeded_db, nats_url)
    async with open_invoker(settings) as inv:
        await calls(inv, 4, 0, flaky_extension)
        await inv.flush_health()
        await calls(inv, 3, 1, flaky_extension)
        _, rows = await inv.registry.database.read_health(None, ["flaky"], recent_since=0.0)
        adopt_totals(inv.health, rows[0].totals)
        shown = inv.health.get_health("flaky")
        await inv.flush_health()
        after = inv.health.get_health("flaky")
    assert (7, 1) == (shown["success_count"], shown["failure_count"])
    assert (7, 1) == (after["success_count"], after["failure_count"])
    assert (7, 1, 8) == health_row(seeded_db, "flaky")[:3]  # type: ignore[index]


# -- exactly once across failures ------------------------------------------------------------


async def test_survives_database_restart(
    tmp_path: Path,
    own_pg: PostgresProcess,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """Calls made before, during and after a database outage all reach extension_health exactly
    once: the flusher keeps failed batches, merges new deltas into the unsent one, and writes
    them when the database is back, with no call lost or counted twice."""
    url = own_pg.create_database("outage")
    migrate(url)
    settings = db_settings(tmp_path, url, nats_url, health_flush_interval_seconds=0.1)
    await seed(url, settings)
    async with open_invoker(settings) as inv:
        await calls(inv, 10, 2, flaky_extension)
        await wait_for(lambda: (health_row(url, "flaky") or ())[:2] == (10, 2), step=0.05)
        own_pg.stop()
        await calls(inv, 20, 3, flaky_extension)
        await wait_for(lambda: inv.flusher.unwritten_calls >= 23, timeout=30)  # a flush failed
        waiting = (inv.flusher.waiting_batches, inv.flusher.unwritten_calls)
        own_pg.start()
        await calls(inv, 5, 0, flaky_extension)
        await wait_for(lambda: inv.flusher.waiting_batches == 0, timeout=30)
        # one more call, written by a later flush: had anything been written twice meanwhile,
        # the row would hold more than the 41 calls made
        await calls(inv, 1, 0, flaky_extension)
        await wait_for(
            lambda: sum((health_row(url, "flaky") or (0, 0))[:2]) >= 41, timeout=30, step=0.05
        )
    assert waiting[0] in (1, 2) and waiting[1] >= 23
    stored = health_row(url, "flaky")
    assert stored is not None
    assert (36, 5, 41, 41) == (stored[0], stored[1], stored[2], stored[4])


async def test_failed_commit_is_retried_not_regrown(
    tmp_path: Path,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """A batch whose commit fails (a deferred trigger makes COMMIT raise a connection failure)
    is sealed: newer calls go into a new batch, the sealed one is retried unchanged, and once
    commits work again both are applied exactly once, in order."""
    query(seeded_db, """
        CREATE TABLE fail_commit (on_ boolean);
        INSERT INTO fail_commit VALUES (true);
        CREATE FUNCTION fail_commit() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF (SELECT on_ FROM fail_commit) THEN
                RAISE EXCEPTION 'commit refused' USING ERRCODE = '08006';
            END IF;
            RETURN NULL;
        END $$;
        CREATE CONSTRAINT TRIGGER fail_commit AFTER INSERT OR UPDATE ON extreg_health_nodes
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION fail_commit();
    """)  # fmt: skip
    settings = db_settings(tmp_path, seeded_db, nats_url)
    async with open_invoker(settings) as inv:
        await calls(inv, 6, 1, flaky_extension)
        assert not await inv.flush_health()
        await calls(inv, 4, 2, flaky_extension)
        assert not await inv.flush_health()
        queued = inv.flusher.queued()
        query(seeded_db, "UPDATE fail_commit SET on_ = false")
        assert await inv.flush_health()
    assert [(1, True, 7), (2, False, 6)] == queued
    assert (10, 3, 13) == health_row(seeded_db, "flaky")[:3]  # type: ignore[index]
    assert [(2,)] == query(seeded_db, "SELECT last_seq FROM extreg_health_nodes")


async def test_final_flush_on_exit(
    tmp_path: Path,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """Leaving `Invoker.open` writes what is left, with no periodic flush having run."""
    settings = db_settings(tmp_path, seeded_db, nats_url)
    async with open_invoker(settings) as inv:
        await calls(inv, 3, 2, flaky_extension)
        assert health_row(seeded_db, "flaky") is None
    assert (3, 2, 5) == health_row(seeded_db, "flaky")[:3]  # type: ignore[index]


# -- the hot path issues no SQL ----------------------------------------------------------------


async def test_no_database_statement_per_invocation(
    tmp_path: Path,
    pg_server: PostgresProcess,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
) -> None:
    """1,000 invocations issue 0 statements, counted at the server from its statement log
    (flusher paused); the counter does see the statements of one health flush."""
    counter = StatementCounter(pg_server.root / "log", seeded_db)
    settings = db_settings(tmp_path, seeded_db, nats_url)
    async with Registry.open(settings) as registry, Invoker.open(registry, settings) as inv:
        start = counter.mark()
        for _ in range(1000):
            await inv.invoke("echo", REQUEST, CONTEXT)
        during_calls = counter.count_since(start)
        start = counter.mark()
        await inv.flush_health()
        during_flush = counter.count_since(start)
    assert 0 == during_calls
    assert during_flush > 0


async def test_health_of_sample_shows_in_cli_rows(
    tmp_path: Path,
    seeded_db: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    nats_client: Client,
) -> None:
    """The seed's columns are filled for other readers (extreg health, dashboards): counts,
    average and percentiles, last latency and the circuit state."""
    settings = db_settings(tmp_path, seeded_db, nats_url, circuit_breaker_enabled=True)
    async with open_invoker(settings) as inv:
        for _ in range(5):
            await inv.invoke("normalize_text", REQUEST, CONTEXT)
    rows = query(seeded_db, "SELECT success_count, failure_count, avg_latency_ms > 0,"
                            " p50_latency_ms > 0, p99_latency_ms >= p50_latency_ms,"
                            " last_latency_ms IS NOT NULL, circuit_breaker_state, latency_sum >= 0"
                            " FROM extension_health WHERE extension_id = 'normalize_text'")  # fmt: skip
    assert [(5, 0, True, True, True, True, "closed", True)] == rows
