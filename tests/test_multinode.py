"""Several nodes, one database: three real `extreg serve` processes on one throwaway PostgreSQL
and one NATS server (the `testsupport.cluster.Cluster` harness).

Shown here: an admin write on one node reaches the other nodes' caches (how long that took
is printed, not asserted: a loaded machine decides); health written by every node adds up exactly on every node; every node keeps answering
lookups from its cache while the database restarts, and a write after the restart reaches all.

Each test uses its own extensions (propagation: `mask_pii`; health: `echo`; the restart:
`normalize_text` and `test_provider`), so they do not depend on each other's order.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from testsupport.cluster import Cluster, Node

FLUSH_S = 0.5  # health_flush_interval_seconds of every node
PROPAGATION_DEADLINE_S = 60.0  # fails only a write that never arrives (notifications: ms)
DEADLINE_S = 60.0  # for every other condition awaited here
HEALTH_CALLS = (7, 11, 13)  # invocations of `echo` through node 0, 1 and 2
WITNESS = "pii_guard"  # invoked to see each node flush once more; no test reads its health


pytestmark = pytest.mark.asyncio(loop_scope="module")  # the cluster's clients live on its loop


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cluster() -> AsyncIterator[Cluster]:
    async with Cluster(3, settings={"health_flush_interval_seconds": FLUSH_S}) as running:
        print(f"\ncluster of {running.size} nodes ready in {running.startup_s:.2f} s")
        yield running
        for node in running.nodes:
            assert node.alive, f"{node.name} died during the tests:\n{node.log_tail()}"


@pytest.fixture(autouse=True)
def no_node_logs_an_error(cluster: Cluster) -> Iterator[None]:
    """After every test, whatever the order they run in: no node has logged an error-level
    event or a traceback (warnings about the database being away are expected and allowed).
    A check written as a last test would pass untested when run first."""
    yield
    for node in cluster.nodes:
        errors = [e for e in node.log_events() if e.get("level") in ("error", "critical")]
        assert [] == errors, f"{node.name}:\n{node.log_tail()}"
        assert "Traceback" not in node.log_path.read_text(errors="replace")


async def _record(node: Node, extension_id: str) -> dict[str, Any]:
    response = await node.client.get(f"/admin/extensions/{extension_id}")
    assert 200 == response.status_code, (node.name, response.text)
    record: dict[str, Any] = response.json()
    return record


async def _visible_after(
    node: Node, extension_id: str, field: str, value: Any, started: float
) -> float:
    """Poll `node` until the record's `field` reads `value`; seconds since `started`."""
    deadline = started + PROPAGATION_DEADLINE_S
    while True:
        if (await _record(node, extension_id))[field] == value:
            return time.perf_counter() - started
        if time.perf_counter() > deadline:
            raise AssertionError(
                f"{extension_id}.{field} = {value!r} not visible on "
                f"{node.name} after {PROPAGATION_DEADLINE_S} s"
            )
        await asyncio.sleep(0.002)


async def _write_and_measure(
    cluster: Cluster,
    label: str,
    method: str,
    path: str,
    extension_id: str,
    field: str,
    value: Any,
    **request: Any,
) -> list[float]:
    """Make one write on node 0 while nodes 1 and 2 poll for it; print and return the times
    (node 0's answer, then visibility on 1 and 2), in seconds from sending the write."""
    writer, *others = cluster.nodes
    started = time.perf_counter()
    watchers = [
        asyncio.create_task(_visible_after(n, extension_id, field, value, started)) for n in others
    ]
    response = await writer.client.request(method, path, **request)
    answered = time.perf_counter() - started
    assert 200 == response.status_code, response.text
    assert value == response.json()[field]
    seen = await asyncio.gather(*watchers)
    print(
        f"{label}: node0 answered in {answered * 1000:.1f} ms; visible on "
        + ", ".join(f"{n.name} after {s * 1000:.1f} ms" for n, s in zip(others, seen, strict=True))
        + " (from sending the write)"
    )
    return [answered, *seen]


async def test_admin_write_on_one_node_is_visible_on_the_others(cluster: Cluster) -> None:
    """A PATCH, a disable and an enable made on node 0 each show up in the caches of nodes 1
    and 2 (read through their APIs); the time each took is printed."""
    base = await _record(cluster.nodes[0], "mask_pii")
    new_timeout = base["timeout_ms"] + 77
    await _write_and_measure(
        cluster,
        "PATCH timeout_ms",
        "PATCH",
        "/admin/extensions/mask_pii",
        "mask_pii",
        "timeout_ms",
        new_timeout,
        json={"timeout_ms": new_timeout},
    )
    await _write_and_measure(
        cluster,
        "disable",
        "POST",
        "/admin/extensions/mask_pii/disable",
        "mask_pii",
        "enabled",
        False,
    )
    await _write_and_measure(
        cluster, "enable", "POST", "/admin/extensions/mask_pii/enable", "mask_pii", "enabled", True
    )
    for node in cluster.nodes:  # every cache holds the same final record
        record = await _record(node, "mask_pii")
        assert (new_timeout, True) == (record["timeout_ms"], record["enabled"])


async def _echo_health(node: Node) -> dict[str, Any]:
    response = await node.client.get("/admin/extensions/health")
    assert 200 == response.status_code, response.text
    [echo] = [e for e in response.json()["extensions"] if e["id"] == "echo"]
    health: dict[str, Any] = echo["health"]
    return health


async def test_health_written_by_every_node_sums_exactly_on_every_node(
    cluster: Cluster,
) -> None:
    """Nodes 0, 1 and 2 invoke `echo` 7, 11 and 13 times through their own APIs; after the
    health flush, `GET /admin/extensions/health` on every node reports exactly the sum
    (31 more successes than before, no failures), and it stays exact (nothing counted twice)
    over two further flushes of every node (each seen by a call of another extension landing
    in a new batch of that node). Each node wrote under its own node identity."""
    rows = await cluster.query(
        "SELECT success_count, failure_count FROM extension_health WHERE extension_id = 'echo'"
    )
    before = rows[0] if rows else (0, 0)
    expected = (before[0] + sum(HEALTH_CALLS), before[1])

    async def invoke(node: Node, calls: int) -> None:
        for i in range(calls):
            response = await node.client.post(
                "/admin/extensions/echo/invoke",
                json={"payload": {"n": i, "node": node.index}, "tenant_id": "multinode"},
            )
            assert 200 == response.status_code, response.text

    await asyncio.gather(
        *(invoke(node, calls) for node, calls in zip(cluster.nodes, HEALTH_CALLS, strict=True))
    )

    deadline = time.monotonic() + DEADLINE_S
    while True:
        seen = [await _echo_health(n) for n in cluster.nodes]
        counts = [(h["success_count"], h["failure_count"]) for h in seen]
        if all(c == expected for c in counts):
            break
        assert time.monotonic() < deadline, f"health on nodes {counts}, expected {expected}"
        await asyncio.sleep(0.05)
    print(f"\necho health on every node: {counts} (expected {expected})")

    for _ in range(2):  # more flushes must not count anything again
        await _flushed_once_more(cluster)
    again = [await _echo_health(n) for n in cluster.nodes]
    assert [expected] * 3 == [(h["success_count"], h["failure_count"]) for h in again]
    rows = await cluster.query(
        "SELECT success_count, failure_count FROM extension_health WHERE extension_id = 'echo'"
    )
    assert [expected] == rows
    writers = {
        node_id for (node_id,) in await cluster.query("SELECT node_id FROM extreg_health_nodes")
    }
    pids = {int(node_id.split(":")[-2]) for node_id in writers}
    assert {n.pid for n in cluster.nodes} <= pids, (writers, [n.pid for n in cluster.nodes])


async def _batches(cluster: Cluster) -> dict[int, int]:
    """The last health batch number written by each node, by pid."""
    rows = await cluster.query("SELECT node_id, last_seq FROM extreg_health_nodes")
    return {int(node_id.split(":")[-2]): seq for node_id, seq in rows}


async def _flushed_once_more(cluster: Cluster) -> None:
    """Return once every node has written a new health batch (one holding a call of WITNESS),
    so it has flushed and read the totals back since this was called."""
    before = await _batches(cluster)
    for node in cluster.nodes:
        response = await node.client.post(
            f"/admin/extensions/{WITNESS}/invoke", json={"payload": {"text": "witness"}}
        )
        assert 200 == response.status_code, response.text
    pids = [pid for n in cluster.nodes if (pid := n.pid) is not None]
    assert len(cluster.nodes) == len(pids), "a node is not running"
    deadline = time.monotonic() + DEADLINE_S
    while True:
        now = await _batches(cluster)
        if all(now.get(pid, 0) > before.get(pid, 0) for pid in pids):
            return
        assert time.monotonic() < deadline, f"no new health batch: {before} -> {now}"
        await asyncio.sleep(0.05)


async def _status(node: Node) -> dict[str, Any]:
    response = await node.client.get("/admin/status")
    assert 200 == response.status_code, response.text
    status: dict[str, Any] = response.json()
    return status


async def test_every_node_answers_lookups_while_the_database_restarts(cluster: Cluster) -> None:
    """While PostgreSQL is stopped and started again, every node keeps answering
    `GET /admin/extensions/normalize_text` with 200 and the record (from its cache), and says
    it is stale; once the database is back every node is fresh again and a PATCH made on
    node 0 after the restart reaches nodes 1 and 2."""
    assert cluster.pg is not None
    expected = await _record(cluster.nodes[0], "normalize_text")
    answers: Counter[tuple[str, int, bool]] = Counter()
    phase = "before"
    stale_seen: set[str] = set()
    polling = True

    async def poll(node: Node) -> None:
        while polling:
            response = await node.client.get("/admin/extensions/normalize_text")
            same = response.status_code == 200 and response.json() == expected
            answers[(phase, response.status_code, same)] += 1
            await asyncio.sleep(0.005)

    async def watch_status(node: Node) -> None:
        while polling:
            if phase == "outage" and (await _status(node)).get("stale"):
                stale_seen.add(node.name)
            await asyncio.sleep(0.05)

    def answered(in_phase: str) -> int:
        return sum(n for (p, _, _), n in answers.items() if p == in_phase)

    async def until(condition: Any, what: str) -> None:
        deadline = time.monotonic() + DEADLINE_S
        while not condition():
            assert time.monotonic() < deadline, f"{what} not seen: {answers}, {stale_seen}"
            await asyncio.sleep(0.02)

    tasks = [asyncio.create_task(f(n)) for n in cluster.nodes for f in (poll, watch_status)]
    try:
        await until(lambda: answered("before") >= 30, "lookups before the outage")
        await asyncio.to_thread(cluster.pg.stop)
        phase = "outage"
        outage_started = time.perf_counter()
        await until(
            lambda: len(stale_seen) == len(cluster.nodes) and answered("outage") >= 30,
            "every node stale, 30 lookups",
        )
        await asyncio.to_thread(cluster.pg.start)
        outage_s = time.perf_counter() - outage_started
        phase = "after"
        restarted = time.perf_counter()
        deadline = time.monotonic() + DEADLINE_S
        fresh: dict[str, float] = {}
        while len(fresh) < len(cluster.nodes):
            for node in cluster.nodes:
                if node.name not in fresh and not (await _status(node)).get("stale"):
                    fresh[node.name] = time.perf_counter() - restarted
            assert time.monotonic() < deadline, f"still stale: {fresh}"
            await asyncio.sleep(0.05)
        await until(lambda: answered("after") >= 30, "lookups after the outage")
    finally:
        polling = False
        await asyncio.gather(*tasks, return_exceptions=True)
    if cluster.pg.proc is None:  # a failure above must not leave the database down
        await asyncio.to_thread(cluster.pg.start)

    print(
        f"\ndatabase down for {outage_s:.2f} s; lookups answered: "
        + ", ".join(f"{p} {s} same={ok}: {n}" for (p, s, ok), n in sorted(answers.items()))
        + "; fresh again after "
        + ", ".join(f"{k} {v:.2f} s" for k, v in fresh.items())
    )
    assert {key for key in answers if key[1:] != (200, True)} == set(), answers
    assert answers[("outage", 200, True)] >= 30  # really asked, on every node, during it
    assert {n.name for n in cluster.nodes} == stale_seen

    base = await _record(cluster.nodes[0], "test_provider")
    await _write_and_measure(
        cluster,
        "PATCH after restart",
        "PATCH",
        "/admin/extensions/test_provider",
        "test_provider",
        "timeout_ms",
        base["timeout_ms"] + 11,
        json={"timeout_ms": base["timeout_ms"] + 11},
    )
