"""Recent health: status from the last `health_window_seconds` (an injected clock moves the
window), and the per-interval series, exact across two nodes and across a restart, from a real
PostgreSQL, through the functions the API calls and through the API itself."""

from __future__ import annotations

import sys
import threading
import time
from pathlib import Path

import pytest
from api_helpers import database_api
from invoke_helpers import FakeClock, open_invoker, record_calls
from test_health_store import calls, db_settings, health_row, seed

from extreg.adapters.postgres import PostgresSource
from extreg.adapters.postgres_health import HealthBatch
from extreg.core.health import HealthMonitor
from extreg.core.intervals import INTERVAL_S, series, step_for
from extreg.health_view import health_series
from extreg.local.samples import Flaky, SampleRunner

EXT = "flaky"
T0 = 1_780_000_000.0  # a multiple of INTERVAL_S


def test_status_follows_the_window_as_it_fills_and_drains() -> None:
    """healthy -> unhealthy -> degraded -> healthy -> unknown as calls enter and leave a
    60-second window on an injected clock (the window holds the whole interval its start falls
    in); the all-time numbers never forget."""
    clock = FakeClock(wall=T0)
    monitor = HealthMonitor(clock=clock.time, window_s=60)
    seen = []
    record_calls(monitor, EXT, 20, 0)  # t0: 20 good
    seen.append(monitor.status(EXT))
    clock.advance(10)
    record_calls(monitor, EXT, 0, 20)  # t0+10: 20 bad -> 0.50
    seen.append(monitor.status(EXT))
    clock.advance(30)
    record_calls(monitor, EXT, 80, 0)  # t0+40: 80 good -> 100/120 = 0.83
    seen.append(monitor.status(EXT))
    clock.advance(35)  # t0+75: the window reaches back into t0+10's interval: 80/100 = 0.80
    seen.append(monitor.status(EXT))
    clock.advance(10)  # t0+85: the bad ones are out -> 80/80
    seen.append(monitor.status(EXT))
    clock.advance(30)  # t0+115: nothing recent
    seen.append(monitor.status(EXT))
    assert ["healthy", "unhealthy", "degraded", "degraded", "healthy", "unknown"] == seen
    health = monitor.get_health(EXT)
    assert (100, 20, 0) == (
        health["success_count"],
        health["failure_count"],
        health["recent"]["calls"],
    )


def test_recent_window_survives_a_drain_and_a_merge() -> None:
    """What was drained (written) and what came from elsewhere still counts as recent: the
    window covers every call of its intervals, not only the undrained ones."""
    clock = FakeClock(wall=T0)
    node_a, node_b = (HealthMonitor(clock=clock.time, window_s=60) for _ in range(2))
    record_calls(node_a, EXT, 9, 1)
    record_calls(node_b, EXT, 0, 10)
    for delta in node_b.drain_deltas():
        node_a.merge(delta)
    node_a.drain_deltas()
    recent = node_a.get_health(EXT)["recent"]
    assert (20, 0.45, "unhealthy") == (
        recent["calls"],
        recent["success_rate"],
        node_a.status(EXT),
    )


def test_series_has_every_step_oldest_first_and_wider_steps_for_long_ranges() -> None:
    """15 minutes: 90 points 10 s apart, the last one the interval of `now`; 6 hours: at most
    360 points, each summing whole intervals exactly."""
    clock = FakeClock(wall=T0 + 5)
    monitor = HealthMonitor(clock=clock.time)
    record_calls(monitor, EXT, 3, 1)
    clock.advance(-INTERVAL_S * 30)
    record_calls(monitor, EXT, 2, 0)
    clock.advance(INTERVAL_S * 30)
    short = series(monitor.intervals(EXT), clock.time(), 15)
    assert (90, T0, INTERVAL_S) == (len(short), short[-1]["t"], short[1]["t"] - short[0]["t"])
    assert [(2, 0), (4, 1)] == [(p["calls"], p["failures"]) for p in short if p["calls"]]
    assert [None] == list({p["p95_latency_ms"] for p in short if not p["calls"]})
    long = series(monitor.intervals(EXT), clock.time(), 360)
    assert (360, 60) == (len(long), step_for(360))
    assert (6, 1) == (sum(p["calls"] for p in long), sum(p["failures"] for p in long))


async def test_series_exact_across_two_nodes_and_a_restart(
    tmp_path: Path,
    db_url: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """Two nodes' calls in one interval: both nodes' series show the same point with every
    call (its p95 that of the merged sketch, as the all-time row's), their `recent` agrees,
    and a node started after both stopped shows the same series and recent numbers."""
    settings = db_settings(tmp_path, db_url, nats_url)
    await seed(db_url, settings)
    clock = FakeClock(wall=time.time() // INTERVAL_S * INTERVAL_S)
    async with (
        open_invoker(settings, clock=clock) as node_a,
        open_invoker(settings, clock=clock) as node_b,
    ):
        await calls(node_a, 30, 5, flaky_extension)
        await calls(node_b, 20, 10, flaky_extension)
        assert (True, True) == (await node_a.flush_health(), await node_b.flush_health())
        await node_a.flush_health()  # reads back node_b's calls too
        answers = [
            await health_series(EXT, 15, node.health, node.registry) for node in (node_a, node_b)
        ]
        recents = [node.health.get_health(EXT)["recent"] for node in (node_a, node_b)]
    async with open_invoker(settings, clock=clock) as node_c:
        answers.append(await health_series(EXT, 15, node_c.health, node_c.registry))
        recents.append(node_c.health.get_health(EXT)["recent"])
    async with PostgresSource(settings) as db:
        _, rows = await db.read_health(None, [EXT], recent_since=0.0)
    p95 = round(rows[0].totals.quantile(0.95), 2)
    point = {"calls": 65, "failures": 15, "p95_latency_ms": p95}
    for answer in answers:
        busy = [p for p in answer["points"] if p["calls"]]
        assert [point] == [{k: p[k] for k in point} for p in busy]
        assert (False, 90) == (answer["stale"], len(answer["points"]))
    assert answers[0] == answers[1] == answers[2]
    assert [(65, round(50 / 65, 4))] == list({(r["calls"], r["success_rate"]) for r in recents})
    assert 65 == health_row(db_url, EXT)[2]  # type: ignore[index]


async def test_series_api_shape_events_and_bad_input(tmp_path: Path, db_url: str) -> None:
    """A server without an invoker answers health from what the nodes wrote to the database
    (recent calls, status; a disabled extension leaves the summary's statuses).
    GET .../health/series: points from the database for one extension and for all, a
    disable and its actor among the events; an unknown extension 404, a range outside
    1..360 minutes 422 naming `minutes`."""
    async with database_api(tmp_path, db_url) as api:
        monitor = HealthMonitor()
        for ok in (True, True, False):
            monitor.record("alpha", ok, 7.0)
        batch = HealthBatch("node-x", 1)
        batch.absorb(monitor.drain_deltas(), {})
        assert await api.runtime.registry.database.update_health(batch)
        before = await api.client.get("/admin/extensions/health", headers=api.auth("viewer"))
        disabled = await api.client.post(
            "/admin/extensions/alpha/disable", headers=api.auth("operator")
        )
        one = await api.client.get(
            "/admin/extensions/alpha/health/series?minutes=5", headers=api.auth("viewer")
        )
        every = await api.client.get("/admin/extensions/health/series", headers=api.auth("viewer"))
        missing = await api.client.get(
            "/admin/extensions/nosuch/health/series", headers=api.auth("viewer")
        )
        after = await api.client.get("/admin/extensions/health", headers=api.auth("viewer"))
        bad = [
            await api.client.get(
                f"/admin/extensions/health/series?minutes={m}", headers=api.auth("viewer")
            )
            for m in ("0", "361", "soon")
        ]
    alpha = before.json()["extensions"][0]["health"]
    assert (3, 0.6667, "unhealthy") == (
        alpha["recent"]["calls"],
        alpha["recent"]["success_rate"],
        alpha["status"],
    )
    counts = ("enabled", "healthy", "degraded", "unhealthy", "unknown")
    assert [(1, 0, 0, 1, 0), (0, 0, 0, 0, 0)] == [
        tuple(answer.json()["summary"][k] for k in counts) for answer in (before, after)
    ]
    assert (200, 200, 200) == (disabled.status_code, one.status_code, every.status_code)
    body = one.json()
    assert ("alpha", 5, INTERVAL_S, 30) == (
        body["extension_id"],
        body["minutes"],
        body["interval_seconds"],
        len(body["points"]),
    )
    busy = [p for p in body["points"] if p["calls"]]
    assert [(3, 1)] == [(p["calls"], p["failures"]) for p in busy]
    assert 7.0 == pytest.approx(busy[0]["p50_latency_ms"], rel=0.01)
    assert [("alpha", "disable", "otto-operator")] == [
        (e["extension_id"], e["kind"], e["by"]) for e in body["events"]
    ]
    assert (None, 90, 3) == (
        every.json()["extension_id"],
        len(every.json()["points"]),
        sum(p["calls"] for p in every.json()["points"]),
    )
    assert ("ExtensionNotFound", 404) == (missing.json()["error"], missing.status_code)
    for answer in bad:
        assert 422 == answer.status_code
        assert "minutes" in answer.text


def test_gauges_read_from_another_thread_while_calls_open_new_intervals() -> None:
    """/metrics renders in a worker thread while the event loop records: the counts it reads
    there (`HealthMonitor.counts`) must not trip over an interval opened or drained meanwhile."""
    clock = FakeClock(wall=T0)
    monitor = HealthMonitor(clock=clock.time, window_s=21_600, keep_s=21_600)
    errors: list[BaseException] = []
    done = threading.Event()

    def read() -> None:
        try:
            while not done.is_set():
                monitor.counts(EXT)
        except BaseException as exc:  # the failure the test looks for
            errors.append(exc)

    switch = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    reader = threading.Thread(target=read)
    reader.start()
    try:
        for i in range(20_000):
            clock.advance(INTERVAL_S)  # every call opens a new interval
            monitor.record(EXT, True, 1.0)
            if i % 500 == 0:
                monitor.drain_deltas()
    finally:
        done.set()
        reader.join()
        sys.setswitchinterval(switch)
    assert [] == errors
    assert 20_000 == monitor.counts(EXT)[0]["success_count"]


def test_a_drain_keeps_the_interval_the_window_starts_in() -> None:
    """Pruning at a drain and summing the window agree on the window's first interval: a call
    in the interval the window's start falls in still counts after the drain."""
    clock = FakeClock(wall=T0)
    monitor = HealthMonitor(clock=clock.time, window_s=60, keep_s=60)
    record_calls(monitor, EXT, 1, 0)
    clock.advance(65)  # the window starts at T0 + 5, inside T0's interval
    before = monitor.recent(EXT).calls
    monitor.drain_deltas()
    assert (1, 1) == (before, monitor.recent(EXT).calls)
