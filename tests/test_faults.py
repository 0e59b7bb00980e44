"""Fault injection: each dependency fails for real while extreg works, and recovery is checked.

Real PostgreSQL (`own_pg` / `PostgresProcess`, stopped, started, its backends terminated) and
real NATS (`nats_server_factory`, stopped and started); misbehaving extensions are tiny NATS
responders written here; nodes are `extreg serve` subprocesses killed with SIGKILL; the disk
is a 64 KiB tmpfs mounted by the test (root needed, as in CI).

Cases covered elsewhere and not repeated here (the cases below add what they lack):
- database stopped with no traffic, boot from the snapshot file, corrupt snapshot files:
  test_registry.py (`test_database_stopped_mid_run_keeps_serving_then_recovers`,
  `test_boot_from_snapshot_file_with_database_down`, `test_corrupt_snapshot_file_is_refused`);
- health across a database restart with sequential calls, and a commit that fails after the
  batch was sealed (retried unchanged, applied once): test_health_store.py
  (`test_survives_database_restart`, `test_failed_commit_is_retried_not_regrown`);
- NATS down with single calls, a call waiting when NATS drops, no responders, the reply kinds
  `not json`, `[1, 2]`, `"text"`, empty and `null`, retry 1: test_invoker.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import msgspec
import psycopg
import pytest
from fault_node import Node, health_counts, other_backends, responder, sql
from helpers import make_settings
from invoke_helpers import SAMPLE_RECORDS, fixture_settings, open_invoker, subject, wait_for
from nats.aio.client import Client
from nats.aio.msg import Msg
from structlog.testing import capture_logs
from structlog.typing import EventDict

from extreg import (
    ExtensionError,
    ExtensionTimeout,
    InvalidResponse,
    MaxRetriesExceeded,
    Registry,
    Settings,
)
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource, location_of
from extreg.adapters.snapshot_file import read_snapshot_file
from extreg.core.model import parse_extension
from extreg.errors import SourceUnavailable
from extreg.invoke import Invoker
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SampleRunner
from extreg.metrics import Metrics
from testsupport.pgprocess import PostgresProcess

REQUEST = {"payload": {"message_id": "m-1", "payload": "Hi"}, "metadata": {}}
CONTEXT = {"trace_id": "t-1", "tenant_id": "acme"}


def rec(ext_id: str, on: str, **values: Any) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": 200, **values}


async def seed(url: str, settings: Settings, *records: dict[str, Any]) -> None:
    """`records` (default: the sample extensions) in the database."""
    parsed = [
        parse_extension(r, max_timeout_ms=60_000, max_retries=10) for r in records or SAMPLE_RECORDS
    ]
    async with PostgresSource(settings) as db:
        await db.import_extensions(parsed, "test")


def sync_errors(metrics: Metrics) -> float:
    return metrics.registry.get_sample_value("extension_registry_sync_errors_total") or 0.0


# -- PostgreSQL ------------------------------------------------------------------------------


async def test_database_restart_under_invocation_traffic(
    tmp_path: Path, own_pg: PostgresProcess, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """PostgreSQL stopped (until a hundred calls were answered without it) and started again
    while four callers invoke `echo` in a loop: not one call fails (lookups are served from the cache), the
    registry goes stale and recovers by itself, the outage shows as sync errors in
    `extension_registry_sync_errors_total`, and after recovery `extension_health` holds exactly
    the calls made: none lost while the flushes failed, none written twice."""
    url = own_pg.create_database("traffic")
    migrate(url)
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=url,
        nats_url=nats_url,
        sync_interval_seconds=0.2,
        health_flush_interval_seconds=0.1,
    )
    await seed(url, settings)
    metrics = Metrics()
    answered = 0
    failures: list[BaseException] = []
    stop = asyncio.Event()
    good_syncs = 0

    def count_sync(duration_s: float, error: str | None) -> None:
        nonlocal good_syncs
        good_syncs += error is None

    async def caller() -> None:
        nonlocal answered
        while not stop.is_set():
            try:
                await inv.invoke("echo", REQUEST, CONTEXT)
                answered += 1
            except Exception as exc:  # every failure is a finding
                failures.append(exc)
            await asyncio.sleep(0.01)

    async with Registry.open(settings) as reg, Invoker.open(reg, settings) as inv:
        metrics.watch_registry(reg)
        reg.on_sync(count_sync)
        callers = [asyncio.create_task(caller()) for _ in range(4)]
        await wait_for(lambda: health_counts(url, "echo")[0] > 0, timeout=30, step=0.05)
        down_at = time.monotonic()
        await asyncio.to_thread(own_pg.stop)
        await wait_for(lambda: reg.status.stale, timeout=30)
        at_stop = answered
        await wait_for(lambda: answered - at_stop >= 100, timeout=60)
        during_outage = answered - at_stop
        await asyncio.to_thread(own_pg.start)
        await wait_for(lambda: not reg.status.stale, timeout=30)
        down_s = time.monotonic() - down_at
        errors_at_recovery = sync_errors(metrics)
        synced = good_syncs
        await wait_for(lambda: good_syncs >= synced + 2, timeout=30)  # two syncs went well
        stop.set()
        await asyncio.gather(*callers)
        errors_after = sync_errors(metrics)
        assert "echo" == reg.lookup("echo").id
    # leaving Invoker.open made the final flush
    print(
        f"calls answered {answered} ({during_outage} with the database down for"
        f" {down_s:.1f} s), failures {len(failures)}, sync errors {errors_after:g}"
    )
    assert [] == failures
    assert during_outage >= 100
    assert 1 <= errors_at_recovery <= down_s / 0.2 + 2  # at most one per due sync while down
    assert errors_at_recovery == errors_after  # nothing failed once the database was back
    assert (answered, 0) == health_counts(url, "echo")


async def test_registry_connections_killed_mid_reload(tmp_path: Path, db_url: str) -> None:
    """The database drops every connection of the registry (pg_terminate_backend, found in
    pg_stat_activity) while a reload is waiting inside its query: that reload fails with
    SourceUnavailable and changes nothing (the very same snapshot keeps serving), the
    notification connection is re-established by itself, a later change arrives by
    notification, and a reload then reports the cache identical to the database."""
    for ext_id in ("a", "b"):
        sql(
            db_url,
            "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES (%s, 'pre', %s, 100)",
            (ext_id, f"x.{ext_id}.v1"),
        )
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    metrics = Metrics()
    async with Registry.open(settings) as reg:
        metrics.watch_registry(reg)
        before = reg.snapshot
        with psycopg.connect(db_url, autocommit=True) as probe, psycopg.connect(db_url) as blocker:
            blocker.execute("LOCK TABLE extensions IN ACCESS EXCLUSIVE MODE")
            reload = asyncio.create_task(reg.reload())
            await wait_for(lambda: bool(other_backends(probe, "wait_event_type = 'Lock'")))
            killed = other_backends(probe, f"pid <> {blocker.info.backend_pid}")
            waiting = other_backends(probe, "wait_event_type = 'Lock'")
            for pid in killed:
                probe.execute("SELECT pg_terminate_backend(%s)", (pid,))
            with pytest.raises(SourceUnavailable, match="terminating connection"):
                await reload
            served_while_down = (reg.snapshot is before, reg.lookup("a").id, reg.status.stale)
            blocker.rollback()
        await wait_for(lambda: not reg.status.stale and reg.snapshot is not before, timeout=10)
        sql(
            db_url,
            "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES"
            " ('c', 'pre', 'x.c.v1', 100)",
        )
        await wait_for(lambda: reg.get("c") is not None, timeout=5)
        report = await reg.reload()
    assert 2 <= len(killed) and set(waiting) <= set(killed)  # the listener and the reloader
    assert (True, "a", True) == served_while_down
    assert (3, 0, 0, 0) == (report.count, report.added, report.removed, report.changed)
    assert 1.0 == sync_errors(metrics)  # the reload that was killed


async def test_health_flush_killed_mid_transaction(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """The flusher's connection is terminated inside its write transaction, after it claimed
    its batch number (the backend holds a transaction id) and while it waits for the health
    row: the flush reports failure, the transaction is rolled back whole (stored counts and
    the node's last_seq unchanged), the batch stays queued unsealed and absorbs the next calls,
    and the next flush writes everything exactly once. The registry's cache is untouched.
    (A failure at COMMIT, after the batch is sealed: see test_health_store.py,
    `test_failed_commit_is_retried_not_regrown`.)"""
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=db_url,
        nats_url=nats_url,
        health_flush_interval_seconds=3600,
    )
    await seed(db_url, settings)
    async with open_invoker(settings) as inv:
        snapshot = inv.registry.snapshot
        for _ in range(10):
            await inv.invoke("echo", REQUEST, CONTEXT)
        assert await inv.flush_health()
        for _ in range(7):
            await inv.invoke("echo", REQUEST, CONTEXT)
        with psycopg.connect(db_url, autocommit=True) as probe, psycopg.connect(db_url) as blocker:
            blocker.execute("SELECT 1 FROM extension_health WHERE extension_id = 'echo' FOR UPDATE")
            flush = asyncio.create_task(inv.flush_health())
            mid = "wait_event_type = 'Lock' AND backend_xid IS NOT NULL"
            await wait_for(lambda: bool(other_backends(probe, mid)))
            [flusher_pid] = other_backends(probe, mid)
            probe.execute("SELECT pg_terminate_backend(%s)", (flusher_pid,))
            flushed = await flush
            blocker.rollback()
        after_kill = (
            health_counts(db_url, "echo"),
            inv.flusher.queued(),
            sql(db_url, "SELECT last_seq FROM extreg_health_nodes"),
        )
        for _ in range(5):
            await inv.invoke("echo", REQUEST, CONTEXT)
        assert await inv.flush_health()
        shown = inv.health.get_health("echo")
        cache = (inv.registry.snapshot is snapshot, inv.registry.status.stale)
    assert not flushed
    assert ((10, 0), [(2, False, 7)], [(1,)]) == after_kill
    assert (22, 0) == health_counts(db_url, "echo")
    assert [(2,)] == sql(db_url, "SELECT last_seq FROM extreg_health_nodes")
    assert (22, 0) == (shown["success_count"], shown["failure_count"])
    assert (True, False) == cache


# -- NATS ------------------------------------------------------------------------------------


async def test_nats_restart_under_traffic(
    tmp_path: Path, nats_server_factory: Callable[..., NatsServer]
) -> None:
    """NATS stopped (until more than ten calls were refused) and started again while two
    callers invoke `echo` with the circuit breaker on: every call that fails, fails fast (a
    transport error or CircuitOpen, never ExtensionTimeout: no call waits out its timeout),
    and calls succeed again on the same invoker with the circuit closed, without any
    restart. (How fast the failures are is printed, not asserted: a loaded machine decides.)"""
    server = nats_server_factory()
    settings = fixture_settings(
        tmp_path,
        server.url,
        circuit_breaker_enabled=True,
        circuit_breaker_failure_threshold=3,
        circuit_breaker_timeout_seconds=0.3,
    )
    outcomes: list[tuple[str, float]] = []
    stop = asyncio.Event()

    async def caller() -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                await inv.invoke("echo", REQUEST, CONTEXT)
                kind = "ok"
            except ExtensionError as exc:
                kind = type(exc).__name__
            outcomes.append((kind, time.perf_counter() - started))
            await asyncio.sleep(0.005)

    async with SampleRunner(server.url), open_invoker(settings) as inv:
        callers = [asyncio.create_task(caller()) for _ in range(2)]
        await wait_for(lambda: len(outcomes) >= 10, timeout=30)
        await server.astop()
        await wait_for(
            lambda: Counter(k for k, _ in outcomes)["TransportUnavailable"] > 10, timeout=30
        )
        down = Counter(kind for kind, _ in outcomes)
        await server.astart()

        def recovered() -> bool:
            tail = [kind for kind, _ in outcomes[-20:]]
            return len(tail) == 20 and set(tail) == {"ok"}

        await wait_for(recovered, timeout=30)
        stop.set()
        await asyncio.gather(*callers)
        state = (inv.connected, inv.breaker.state("echo"))
    failed = [(kind, s) for kind, s in outcomes if kind != "ok"]
    print(
        f"outcomes {dict(Counter(kind for kind, _ in outcomes))}, slowest failure"
        f" {max(s for _, s in failed) * 1000:.1f} ms, slowest call"
        f" {max(s for _, s in outcomes) * 1000:.1f} ms"
    )
    assert down["TransportUnavailable"] > 10
    assert {kind for kind, _ in failed} <= {
        "TransportUnavailable",
        "CircuitOpen",
        "InvocationError",
    }
    assert (True, "closed") == state


# -- misbehaving extensions ------------------------------------------------------------------


def envelope(msg: Msg) -> dict[str, Any]:
    return dict(msgspec.json.decode(msg.data))


def pending_requests(inv: Invoker) -> int:
    """Requests the transport is still waiting for (a leak if non-zero when idle)."""
    return len(inv._transport._waiting)  # the leak check needs the internals


async def test_slow_extension_times_out_and_late_replies_are_dropped(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """An extension that answers only once the caller has given up, with timeout 50 ms and
    retry 2: the call fails with MaxRetriesExceeded after exactly 3 attempts (at least 3 x 50
    ms; no answer had been sent, so none was waited for), counted once as a failure in
    health; the 3 late replies arrive after that and are dropped; the next call, answered at
    once, gets its own reply, never a late one."""
    on = subject()
    gave_up = asyncio.Event()

    async def slow(msg: Msg, state: Any) -> list[bytes]:
        await gave_up.wait()
        return [msgspec.json.encode({"trace_id": envelope(msg)["trace_id"]})]

    settings = fixture_settings(tmp_path, nats_url, rec("slow", on, timeout_ms=50, retry=2))
    async with responder(nats_client, on, slow) as seen, open_invoker(settings) as inv:
        started = time.perf_counter()
        with pytest.raises(MaxRetriesExceeded) as caught:
            await inv.invoke("slow", REQUEST, {"trace_id": "slow-1"})
        elapsed = time.perf_counter() - started
        answered_before = seen.replies
        gave_up.set()
        await wait_for(lambda: seen.replies == 3, timeout=30)
        reply = await inv.invoke("slow", REQUEST, {"trace_id": "fast-2"})
        health = inv.health.get_health("slow")
        pending = pending_requests(inv)
    assert (3, 3, 0) == (caught.value.attempts, seen.requests - 1, answered_before)
    assert 3 * 0.05 <= elapsed  # a lower bound only: a loaded machine may take longer
    assert {"trace_id": "fast-2"} == reply
    assert (1, 1, 0) == (health["success_count"], health["failure_count"], pending)


async def test_garbage_replies_are_invalid_response_and_not_retried(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Replies that are not a JSON object (beyond those of test_invoker.py: non-UTF-8 bytes,
    truncated JSON, a number, a JSON object followed by junk, a UTF-8 BOM before an object)
    raise InvalidResponse on the first attempt, even with retry 3 (a wrong answer is not a
    timeout), each one counted as a failure; the message shows the start of the reply."""
    garbage = [
        b"\xff\xfe\x00\x81garbage",
        b'{"truncated": ',
        b"42",
        b'{"a": 1} trailing',
        b"\xef\xbb\xbf{}",
    ]
    on = subject()
    answers = iter(garbage)

    async def bad(msg: Msg, state: Any) -> list[bytes]:
        return [next(answers)]

    settings = fixture_settings(tmp_path, nats_url, rec("bad", on, retry=3))
    reasons = []
    async with responder(nats_client, on, bad) as seen, open_invoker(settings) as inv:
        for _ in garbage:
            with pytest.raises(InvalidResponse) as caught:
                await inv.invoke("bad", REQUEST, CONTEXT)
            reasons.append((caught.value.attempts, caught.value.reason))
        health = inv.health.get_health("bad")
    assert len(garbage) == seen.requests
    assert [1] * len(garbage) == [attempts for attempts, _ in reasons]
    assert all(reason.startswith("reply is not a JSON object: ") for _, reason in reasons)
    assert "'42'" in reasons[2][1]
    assert (0, len(garbage)) == (health["success_count"], health["failure_count"])


async def test_double_reply_first_wins(tmp_path: Path, nats_url: str, nats_client: Client) -> None:
    """An extension that answers every request twice (the second 5 ms later, while the next
    call is already waiting): each call returns its own first reply, no error is raised, the
    second replies match nothing and are dropped, health counts each call once, and no
    request is left waiting."""
    on = subject()

    async def twice(msg: Msg, state: Any) -> list[bytes]:
        trace = envelope(msg)["trace_id"]
        await asyncio.sleep(0.002)
        await nats_client.publish(msg.reply, msgspec.json.encode({"n": 1, "trace": trace}))
        await asyncio.sleep(0.005)
        return [msgspec.json.encode({"n": 2, "trace": trace})]

    settings = fixture_settings(tmp_path, nats_url, rec("twice", on))
    async with responder(nats_client, on, twice) as seen, open_invoker(settings) as inv:
        replies = [await inv.invoke("twice", REQUEST, {"trace_id": f"t-{i}"}) for i in range(20)]
        await wait_for(lambda: seen.replies == 20, timeout=30)
        # one more call: its reply comes after every second reply on the same connection, so
        # getting its own first reply proves the second ones were received and dropped
        replies.append(await inv.invoke("twice", REQUEST, {"trace_id": "t-20"}))
        health = inv.health.get_health("twice")
        pending = pending_requests(inv)
    assert [{"n": 1, "trace": f"t-{i}"} for i in range(21)] == replies
    assert (21, 0, 0) == (health["success_count"], health["failure_count"], pending)


@pytest.mark.parametrize("retry", [0, 3])
async def test_silent_extension_times_out_after_retry_plus_one_attempts(
    tmp_path: Path, nats_url: str, nats_client: Client, retry: int
) -> None:
    """An extension that never answers, timeout 50 ms: exactly retry + 1 requests reach it
    (and no more later), the call ends with ExtensionTimeout (retry 0) or MaxRetriesExceeded
    (retry 3) carrying that number of attempts, and it takes at least (retry + 1) timeouts.
    "No more later": a probe extension on the same subject is called afterwards through the
    same connection, and NATS delivers in order, so any straggler would arrive before it."""
    on = subject()

    async def never(msg: Msg, state: Any) -> list[bytes]:
        return []

    settings = fixture_settings(
        tmp_path,
        nats_url,
        rec("mute", on, timeout_ms=50, retry=retry),
        rec("probe", on, timeout_ms=50),
    )
    async with responder(nats_client, on, never) as seen, open_invoker(settings) as inv:
        started = time.perf_counter()
        with pytest.raises(ExtensionTimeout if retry == 0 else MaxRetriesExceeded) as caught:
            await inv.invoke("mute", REQUEST, CONTEXT)
        elapsed = time.perf_counter() - started
        pending = pending_requests(inv)
        with pytest.raises(ExtensionTimeout):
            await inv.invoke("probe", REQUEST, CONTEXT)
        await wait_for(lambda: seen.requests > retry + 1, timeout=30)
    attempts = retry + 1
    assert (attempts, attempts + 1, 0) == (caught.value.attempts, seen.requests, pending)
    assert attempts * 0.05 <= elapsed  # a lower bound only: a loaded machine may take longer


# -- kill -9 of a node -----------------------------------------------------------------------

BULK = 2000  # records of ~2 KB each: a ~4 MB snapshot file takes milliseconds to write


def watch_and_kill(node: Node, found: Callable[[], bool], timeout: float) -> threading.Thread:
    """A thread that SIGKILLs the node the moment `found()` is true (polled without pause)."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if found():
                os.kill(node.pid, signal.SIGKILL)
                return

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def temp_files(folder: Path) -> list[str]:
    with contextlib.suppress(FileNotFoundError):
        return sorted(n for n in os.listdir(folder) if n.endswith(".tmp"))
    return []


async def test_kill_node_during_snapshot_write(
    tmp_path: Path, own_pg: PostgresProcess, nats_url: str
) -> None:
    """A node is SIGKILLed the moment its snapshot-file write has begun (its temporary file
    appeared), three times, while records change every 20 ms: after each kill the snapshot
    file is a complete, checksummed copy of every record, the node restarts from the
    database, and with the database down it boots from that file (source snapshot_file,
    stale, every record served)."""
    url = own_pg.create_database("snapkill")
    migrate(url)
    sql(
        url,
        "INSERT INTO extensions (id, type, subject, timeout_ms, config)"
        " SELECT 'bulk-' || g, 'pre', 'bulk.' || g || '.v1', 100,"
        "        jsonb_build_object('blob', repeat('x', 2000), 'gen', 0)"
        f" FROM generate_series(1, {BULK}) g",
    )
    ids = {f"bulk-{g}" for g in range(1, BULK + 1)}
    node = Node(tmp_path / "node", url, nats_url)
    snapshot = node.data_dir / "snapshot.json"
    stop = threading.Event()

    def change() -> None:
        with psycopg.connect(url, autocommit=True) as conn:
            gen = 0
            while not stop.wait(0.02):
                gen += 1
                conn.execute(
                    "UPDATE extensions SET config = config || jsonb_build_object("
                    "'gen', %s::int) WHERE id = %s",
                    (gen, f"bulk-{gen % BULK + 1}"),
                )

    changer = threading.Thread(target=change, daemon=True)
    changer.start()
    mid_write = 0
    try:
        node.start()
        await wait_for(snapshot.exists, timeout=10)
        for _ in range(3):
            node.kill()
            node.start()
            left_before = set(temp_files(node.data_dir))

            def new_temp_file(old: set[str] = left_before) -> bool:
                return bool(set(temp_files(node.data_dir)) - old)

            # Under a stream of changes the node writes the file every 5 s (SNAPSHOT_FILE_*).
            killer = watch_and_kill(node, new_temp_file, timeout=30)
            await asyncio.to_thread(killer.join)
            assert node.proc is not None and node.proc.wait(5) == -signal.SIGKILL
            node.proc = None
            mid_write += bool(set(temp_files(node.data_dir)) - left_before)
            records, _ = read_snapshot_file(snapshot, location_of(url))
            assert ids == {r.id for r in records}
        stop.set()
        changer.join()
        await asyncio.to_thread(own_pg.stop)
        status = node.start()
        served = node.client.get("/admin/extensions/bulk-7")
        node.kill()
    finally:
        stop.set()
        node.close()
    print(f"kills inside a snapshot write (temporary file left behind): {mid_write} of 3")
    assert mid_write >= 1, "no kill landed inside a write; the test proved nothing"
    assert ("snapshot_file", True, BULK) == (status["source"], status["stale"], status["count"])
    assert (200, "bulk-7") == (served.status_code, served.json()["id"])


async def test_kill_node_during_health_flush(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A node flushing health every 20 ms under HTTP invocation traffic is SIGKILLed, once
    its flushes are seen landing, the moment one of its flush transactions is open in
    PostgreSQL (a backend holding a transaction id in pg_stat_activity), three times: the
    stored count never exceeds the calls the extension answered (a killed transaction is
    rolled back whole; the unflushed calls of a killed node are lost, never doubled), and
    after a restart 50 more calls add exactly 50."""
    on = subject()
    settings = make_settings(tmp_path, source="database", database_url=db_url, nats_url=nats_url)
    await seed(db_url, settings, rec("counted", on, timeout_ms=1000))

    async def answer(msg: Msg, state: Any) -> list[bytes]:
        return [b"{}"]

    async def traffic(client: httpx.AsyncClient) -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                await client.post("/admin/extensions/counted/invoke", json={"payload": 1})
            except httpx.HTTPError:
                return

    node = Node(tmp_path / "node", db_url, nats_url, health_flush_interval_seconds=0.02)
    bounds = []
    try:
        async with responder(nats_client, on, answer) as seen:
            for _ in range(3):
                node.start()
                landed = health_counts(db_url, "counted")[0] + 20
                async with httpx.AsyncClient(base_url=node.url, headers=node.client.headers) as c:
                    callers = [asyncio.create_task(traffic(c)) for _ in range(4)]

                    def landed_all(goal: int = landed) -> bool:
                        return health_counts(db_url, "counted")[0] >= goal

                    await wait_for(landed_all, timeout=10, step=0.02)
                    with psycopg.connect(db_url, autocommit=True) as probe:
                        killer = watch_and_kill(
                            node,
                            lambda: bool(other_backends(probe, "backend_xid IS NOT NULL")),
                            timeout=10,
                        )
                        await asyncio.to_thread(killer.join)
                    await asyncio.gather(*callers)
                assert node.proc is not None and node.proc.wait(5) == -signal.SIGKILL
                node.proc = None
                await asyncio.sleep(0.2)  # a COMMIT sent just before the kill lands by now
                bounds.append((health_counts(db_url, "counted"), seen.replies))
            node.start()
            before = health_counts(db_url, "counted")
            async with httpx.AsyncClient(base_url=node.url, headers=node.client.headers) as c:
                answers = [
                    (
                        await c.post("/admin/extensions/counted/invoke", json={"payload": i})
                    ).status_code
                    for i in range(50)
                ]
            await wait_for(lambda: health_counts(db_url, "counted")[0] >= before[0] + 50, 5)
            await asyncio.sleep(0.3)
            after = health_counts(db_url, "counted")
            stopped = await asyncio.to_thread(node.stop)
            final = health_counts(db_url, "counted")
    finally:
        node.close()
    print(f"after each kill (stored, answered): {[(s[0], r) for s, r in bounds]}")
    assert all(stored[0] <= replies and stored[1] == 0 for stored, replies in bounds), bounds
    assert [200] * 50 == answers
    assert (before[0] + 50, 0) == after == final
    assert 0 == stopped


# -- the disk under the snapshot file --------------------------------------------------------


@pytest.fixture
def tiny_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs mounted for the test (needs root, as in CI), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.fail(
            "the disk-full and read-only cases mount a tmpfs and must run as root "
            "(CI does); run this test as root"
        )
    folder = tmp_path / "tiny"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.fail(
            f"cannot mount a tmpfs on {folder} (root with mount rights is required):"
            f" {mounted.stderr.strip()}"
        )
    try:
        yield folder
    finally:
        if subprocess.run(["umount", str(folder)], capture_output=True, check=False).returncode:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True, check=False)


def fill(folder: Path) -> None:
    """Write to `folder` until its filesystem is full."""
    with (folder / "filler").open("wb", buffering=0) as fh, contextlib.suppress(OSError):
        while True:
            fh.write(b"\0" * 1024)


def remount(folder: Path, mode: str) -> None:
    subprocess.run(["mount", "-o", f"remount,{mode}", str(folder)], check=True)


@pytest.mark.parametrize("fault", ["full", "read_only"])
async def test_snapshot_disk_full_or_read_only(
    tmp_path: Path, db_url: str, tiny_disk: Path, fault: str
) -> None:
    """With the snapshot file's disk full (or remounted read-only), a write of the snapshot
    file fails with one clear error log line naming the file and the reason, the previous file
    stays byte for byte intact with no temporary file left behind, and the registry keeps
    serving and applying changes; once the disk is writable again the next change is written."""
    insert = "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES (%s, 'pre', %s, 100)"
    sql(db_url, insert, ("a", "x.a.v1"))
    settings = make_settings(tmp_path, source="database", database_url=db_url, data_dir=tiny_disk)
    path = settings.snapshot_path
    reason = {"full": "No space left on device", "read_only": "Read-only file system"}[fault]
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            await wait_for(path.exists, timeout=5)
            good = path.read_bytes()
            if fault == "full":
                fill(tiny_disk)
            else:
                remount(tiny_disk, "ro")

            def refused() -> list[EventDict]:
                return [e for e in events if e["event"] == "snapshot_file_not_written"]

            sql(db_url, insert, ("b", "x.b.v1"))
            await wait_for(lambda: bool(refused()), timeout=5)
            during = (
                reg.lookup("b").id,
                reg.status.source,
                reg.status.stale,
                path.read_bytes() == good,
                temp_files(tiny_disk),
            )
            if fault == "full":
                (tiny_disk / "filler").unlink()
            else:
                remount(tiny_disk, "rw")
            sql(db_url, insert, ("c", "x.c.v1"))
            await wait_for(lambda: reg.get("c") is not None, timeout=5)
            await wait_for(
                lambda: len(read_snapshot_file(path, location_of(db_url))[0]) == 3, timeout=5
            )
    assert ("b", "database", False, True, []) == during
    assert [("error", f"cannot write snapshot file {path}: {reason}")] == [
        (e["log_level"], e["error"]) for e in refused()
    ]
    assert ["a", "b", "c"] == sorted(r.id for r in read_snapshot_file(path, location_of(db_url))[0])
