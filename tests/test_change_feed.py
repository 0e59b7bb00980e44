"""The change feed on NATS (`change_feed=nats`; core/feed.py, adapters/nats_feed.py).

Real PostgreSQL and NATS servers; the nodes are registries in this process
(`testsupport.fleet`), each with connections of its own as separate processes would have.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import psycopg
import pytest
from helpers import make_settings, record
from invoke_helpers import SAMPLE_RECORDS

from extreg import tokens
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.auth import TokenBook
from extreg.core.model import Extension, parse_extension
from extreg.core.policy import PolicyLimits, parse_policy
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SampleRunner
from extreg.settings import Settings
from extreg.tokens import TokenFollower, TokenStore
from testsupport.fleet import Fleet
from testsupport.natscluster import NatsCluster
from testsupport.pgprocess import PostgresProcess

_subjects = itertools.count()


def ext(ext_id: str, **values: object) -> Extension:
    return parse_extension(record(ext_id, **values), max_timeout_ms=60_000, max_retries=10)


def fleet_settings(
    tmp_path: Path, nats_url: str, **values: object
) -> Callable[[str, str], Settings]:
    """Settings of each node: its own data folder, the feed under a subject of this test's."""
    subject = f"extreg.feed.t{next(_subjects)}"

    def settings_for(name: str, database_url: str) -> Settings:
        return make_settings(
            tmp_path / name,
            source="database",
            database_url=database_url,
            nats_url=nats_url,
            change_feed="nats",
            change_feed_subject=subject,
            **values,
        )

    return settings_for


async def stored(tmp_path: Path, db_url: str) -> dict[str, Extension]:
    async with PostgresSource(make_settings(tmp_path, database_url=db_url)) as db:
        return {e.id: e for e in await db.load_all_extensions()}


async def test_one_node_publishes_and_the_others_follow_without_a_database_connection(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=4) as fleet:
        publisher = await fleet.wait_publisher()
        await publisher.registry.database.upsert_extension(ext("one", timeout_ms=321), "test")
        await fleet.wait(lambda r: (e := r.get("one")) is not None and e.timeout_ms == 321)
        assert set(fleet.connections()) == {publisher.name}  # the followers hold none
        # Any node takes an admin write (its pool connects for it), and every node sees it.
        follower = next(n for n in fleet.nodes if n is not publisher)
        await follower.registry.database.upsert_extension(ext("two"), "test")
        await fleet.wait(lambda r: r.get("two") is not None)
        assert all(r.status.source == "database" and not r.status.stale for r in fleet.registries)
        # A heartbeat at a follower's position counts as a sync (the sync alerts hold).
        await fleet.wait(lambda r: r.status.last_sync_at is not None)


async def test_when_the_publisher_stops_another_takes_over(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=3) as fleet:
        first = await fleet.wait_publisher()
        await first.stop()
        fleet.nodes.remove(first)
        second = await fleet.wait_publisher()
        assert second is not first
        await second.registry.database.upsert_extension(ext("after"), "test")
        await fleet.wait(lambda r: r.get("after") is not None)


async def test_a_nats_outage_during_changes_loses_none(
    tmp_path: Path, db_url: str, nats_server_factory: Callable[..., NatsServer]
) -> None:
    """Changes keep committing while the NATS server restarts: afterwards every node holds
    exactly what the database holds (the gap is noticed and a snapshot taken)."""
    server = nats_server_factory()
    async with Fleet(fleet_settings(tmp_path, server.url), db_url, size=3) as fleet:
        publisher = await fleet.wait_publisher()
        db = publisher.registry.database
        for i in range(30):
            await db.upsert_extension(ext(f"e{i}", timeout_ms=100 + i), "test")
            if i == 10:
                await asyncio.to_thread(server.restart)
        want = await stored(tmp_path, db_url)
        assert len(want) == 30
        await fleet.wait(lambda r: {e.id: e for e in r.all()} == want)


async def test_a_change_too_large_for_one_message_reaches_every_node(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    """An import larger than NATS's max_payload is announced as a reset: nodes take a
    snapshot (sent in parts)."""
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=2) as fleet:
        publisher = await fleet.wait_publisher()
        records = [ext(f"bulk{i:04d}", config={"blob": f"{i}" * 600}) for i in range(2500)]
        await publisher.registry.database.import_extensions(records, "test")
        await fleet.wait(lambda r: len(r.all()) == 2500)
        want = await stored(tmp_path, db_url)
        assert all({e.id: e for e in r.all()} == want for r in fleet.registries)


@pytest.mark.usefixtures("sample_extensions")
async def test_health_written_through_the_publisher_stays_exact_through_its_death(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: SampleRunner
) -> None:
    settings_for = fleet_settings(tmp_path, nats_url, health_flush_interval_seconds=0.2)
    async with PostgresSource(settings_for("setup", db_url)) as db:
        await db.import_extensions(
            [parse_extension(r, max_timeout_ms=60_000, max_retries=10) for r in SAMPLE_RECORDS],
            "test",
        )
    async with Fleet(settings_for, db_url, size=3, invokers=True) as fleet:
        publisher = await fleet.wait_publisher()
        await fleet.wait(lambda r: r.get("echo") is not None)

        async def calls(count: int) -> None:
            for node in fleet.nodes:
                assert node.invoker is not None
                for _ in range(count):
                    await node.invoker.invoke("echo", {"n": 1})

        await calls(20)
        await publisher.stop()
        fleet.nodes.remove(publisher)
        await calls(15)  # while nobody publishes: the batches wait
        await fleet.wait_publisher()
        for node in fleet.nodes:
            assert node.invoker is not None
            await node.invoker.flusher.close()
        with psycopg.connect(db_url, autocommit=True) as conn:
            row = conn.execute(
                "SELECT success_count, failure_count FROM extension_health"
                " WHERE extension_id = 'echo'"
            ).fetchone()
        assert row == (3 * 20 + 2 * 15, 0)


async def test_forty_nodes_on_forty_connections(
    tmp_path: Path, own_pg: PostgresProcess, nats_url: str
) -> None:
    """40 nodes boot on a PostgreSQL with max_connections=40, every node sees 200 changes,
    and at rest the fleet holds only the publisher's connections."""
    with psycopg.connect(own_pg.url(), autocommit=True) as conn:
        conn.execute("ALTER SYSTEM SET max_connections = 40")
    own_pg.restart()
    url = own_pg.create_database("fleet")
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        assert conn.execute("SHOW max_connections").fetchone() == ("40",)
    async with Fleet(fleet_settings(tmp_path, nats_url), url, size=40) as fleet:
        publisher = await fleet.wait_publisher()
        db = publisher.registry.database
        for i in range(200):
            await db.upsert_extension(ext(f"c{i % 50}", timeout_ms=1000 + i), "test")
        await fleet.wait(lambda r: (e := r.get("c49")) is not None and e.timeout_ms == 1199)
        want = await stored(tmp_path, url)
        await fleet.wait(lambda r: {e.id: e for e in r.all()} == want)
        held = fleet.connections()
        assert set(held) == {publisher.name}
        assert held[publisher.name] <= 3  # its LISTEN connection and a pool of at most two


async def test_the_feed_goes_on_when_a_nats_server_of_three_dies(
    tmp_path: Path, db_url: str
) -> None:
    """Nodes on a 3-server NATS cluster: the member the publisher's feed uses is killed while
    changes commit; every node ends with exactly what the database holds."""
    async with (
        NatsCluster() as cluster,
        Fleet(fleet_settings(tmp_path, cluster.url), db_url, size=3) as fleet,
    ):
        publisher = await fleet.wait_publisher()
        db = publisher.registry.database
        link = publisher.registry._feed
        assert link is not None
        for i in range(30):
            await db.upsert_extension(ext(f"k{i}", timeout_ms=100 + i), "test")
            if i == 10:
                await cluster.akill(cluster.index_of(link.nc.connected_url))
        want = await stored(tmp_path, db_url)
        assert len(want) == 30
        await fleet.wait(lambda r: {e.id: e for e in r.all()} == want)


@contextlib.asynccontextmanager
async def token_books(fleet: Fleet) -> AsyncIterator[dict[str, TokenBook]]:
    """A token follower per node (as `Runtime` runs them), with its book, until exit."""
    books: dict[str, TokenBook] = {}
    running = []
    for node in fleet.nodes:
        books[node.name] = TokenBook()
        token_follower = TokenFollower(
            books[node.name],
            TokenStore.from_settings(node.registry.settings),
            None,
            None,
            node.registry.token_relay,
        )
        await token_follower.first_load()
        running.append(asyncio.create_task(token_follower.run()))
    try:
        yield books
    finally:
        for task in running:
            task.cancel()
        await asyncio.gather(*running, return_exceptions=True)


async def test_token_changes_reach_followers_through_the_publisher(
    tmp_path: Path, db_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A follower holds no LISTEN connection for tokens: the publisher announces a change on
    NATS and the follower re-reads (the periodic re-read is put out of reach here)."""
    monkeypatch.setattr(tokens, "REFRESH_S", 3600.0)
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=2) as fleet:
        publisher = await fleet.wait_publisher()
        follower = next(n for n in fleet.nodes if n is not publisher)
        async with token_books(fleet) as books:
            await asyncio.sleep(0.5)  # both following: the publisher LISTENs, the follower not
            assert follower.name not in fleet.connections()
            token = await TokenStore.from_settings(publisher.registry.settings).create(
                "fleet-viewer", "viewer", "test"
            )
            await fleet.wait_until(lambda: books[follower.name].check(token) is not None)
            assert follower.name not in fleet.connections()  # the read's connection is closed


async def test_a_token_made_while_nobody_publishes_reaches_followers(
    tmp_path: Path, db_url: str, nats_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A new publisher announces a token change at once: one made while none published (and
    so nobody LISTENed) reaches the followers without the periodic re-read."""
    monkeypatch.setattr(tokens, "REFRESH_S", 3600.0)
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=3) as fleet:
        first = await fleet.wait_publisher()
        settings = first.registry.settings
        async with token_books(fleet) as books:
            await first.stop()
            fleet.nodes.remove(first)
            token = await TokenStore.from_settings(settings).create("late", "viewer", "test")
            await fleet.wait_publisher()
            await fleet.wait_until(
                lambda: all(books[n.name].check(token) is not None for n in fleet.nodes)
            )
            holders = [books[n.name].check(token) for n in fleet.nodes]
            assert [(p.name, p.role) for p in holders if p] == [("late", "viewer")] * 2


async def test_a_followers_own_write_then_a_delete_elsewhere_leaves_no_ghost(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    """A follower writes (and refreshes, as the API does) while the publisher is busy; another
    node deletes the record before the publisher gets to either notification, so it publishes
    nothing about it: the follower must not keep the record (its cache is the publisher's)."""
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=2) as fleet:
        publisher = await fleet.wait_publisher()
        follower = next(n for n in fleet.nodes if n is not publisher)
        async with publisher.registry._write_lock:  # the publisher's applier waits meanwhile
            await publisher.registry.database.upsert_extension(ext("other"), "test")
            await asyncio.sleep(0.3)  # (its applier holds `other` alone, waiting for the lock)
            await follower.registry.database.upsert_extension(ext("ghost"), "test")
            await follower.registry.refresh(["ghost"])
            await publisher.registry.database.delete_extension("ghost", "test")
            await asyncio.sleep(0.3)  # both notifications queued: applied as one, "absent"
        await publisher.registry.database.upsert_extension(ext("later"), "test")
        await fleet.wait(lambda r: r.get("later") is not None)
        assert follower.registry.get("ghost") is None


async def test_a_followers_write_is_visible_on_it_when_refresh_returns(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=2) as fleet:
        publisher = await fleet.wait_publisher()
        follower = next(n for n in fleet.nodes if n is not publisher)
        await follower.registry.database.upsert_extension(ext("mine", timeout_ms=432), "test")
        await follower.registry.refresh(["mine"])
        assert (e := follower.registry.get("mine")) is not None and e.timeout_ms == 432


async def test_policy_writes_go_on_while_a_node_publishes(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    """The publisher's advisory lock is a class of its own: a policy whose id falls in lock
    bucket 0 of policy writes is written while a node publishes."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT i FROM generate_series(0, 5000) AS i WHERE hashtext('p' || i) & 255 = 0 LIMIT 1"
        ).fetchone()
    assert row is not None
    policy_id = f"p{row[0]}"
    async with Fleet(fleet_settings(tmp_path, nats_url), db_url, size=1) as fleet:
        publisher = await fleet.wait_publisher()
        policy = parse_policy({"policy_id": policy_id}, limits=PolicyLimits())
        async with asyncio.timeout(30):
            await publisher.registry.database.import_policies([policy], "test")
        await fleet.wait(lambda r: r.policy(policy_id) is not None)


async def test_two_databases_on_one_nats_and_subject_do_not_mix(
    tmp_path: Path, pg_server: PostgresProcess, nats_url: str
) -> None:
    """Each node follows the publisher of its own database (the `Extreg-Database` header)."""
    urls = {}
    for name in ("prod", "staging"):
        urls[name] = pg_server.create_database(f"mix_{name}")
        migrate(urls[name])
    settings_for = fleet_settings(tmp_path, nats_url)  # one subject for both
    async with (
        Fleet(settings_for, urls["prod"], size=2) as prod,
        Fleet(settings_for, urls["staging"], size=2) as staging,
    ):
        for fleet, name in ((prod, "prod"), (staging, "staging")):
            publisher = await fleet.wait_publisher()
            await publisher.registry.database.upsert_extension(ext(f"only_{name}"), "test")
        await prod.wait(lambda r: [e.id for e in r.all()] == ["only_prod"])
        await staging.wait(lambda r: [e.id for e in r.all()] == ["only_staging"])
        assert {r.feed_role for r in prod.registries} == {"publisher", "follower"}
        assert {r.feed_role for r in staging.registries} == {"publisher", "follower"}
        assert all(r.get("only_staging") is None for r in prod.registries)
