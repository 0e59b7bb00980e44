"""Health persistence behind the hot path: batched, additive, exactly once across outages.

Invocations only call `HealthMonitor.record` (memory). Every `health_flush_interval_seconds`,
and once more at shutdown, `HealthFlusher.flush`:

1. drains the monitor (`drain_deltas`: the calls recorded since the previous drain, each by
   interval; `drain_transitions`: the circuits that moved);
2. files them, with the circuit states that changed, into a numbered batch
   (`node_id`, `seq`). `node_id` is unique per process start; `seq` counts 1, 2, 3, ...;
3. writes the waiting batches, oldest first, through `registry.health_store` (the database,
   or on a follower of the NATS change feed, the publisher, which writes them). Each batch
   is one transaction that adds its counts to `extension_health` *and* moves this node's
   `last_seq` in `extreg_health_nodes` forward; a batch whose `seq` is already recorded is
   skipped (see `extreg.adapters.postgres_health`);
4. reads back the rows changed since its last read, with their recent intervals, and makes
   them the monitor's numbers, so `get_health` shows cluster-wide numbers: every node's
   written calls plus this node's unwritten ones;
5. tells its observers (health-based routing), which judge by those numbers; and every
   `PRUNE_EVERY_S` deletes the intervals and transitions older than `SERIES_KEEP_S`.

Why this is exactly once. A batch is removed from the queue only after its transaction
committed or was found already applied, so no call is lost while the database is away: the
deltas stay in the queue. A batch the writer never brought to its commit (`sealed` false) was
rolled back for sure, so newer deltas are merged into it and the queue stays at most two
batches long however long the outage lasts (a sealed one, whose commit outcome was lost, and an
open one). A sealed batch is retried unchanged under its own `seq`; if its commit had in fact
succeeded, the recorded `last_seq` makes the retry a no-op, so nothing is counted twice.
Batches are written strictly in order, so "already applied" is `last_seq >= seq`.

Cluster-wide totals. After a successful write, `adopt_totals` replaces an extension's totals in
the monitor by the database row (which now includes everything this node drained) and keeps
this node's calls recorded meanwhile as still to be written; it uses only the monitor's public
operations, in one synchronous step, so no call recorded concurrently is lost or shown twice.

What is not persisted: without a database (fixtures) health stays in memory. At shutdown the
final flush retries for `close_timeout` seconds; calls still unwritten after that are logged
as lost with their count.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import socket
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Protocol

import structlog

from ..adapters.postgres_health import HealthBatch
from ..core.breaker import VERSION_SEPARATOR, CircuitBreakers, CircuitSnapshot
from ..core.health import HealthDelta, HealthMonitor, Transition
from ..core.intervals import SERIES_KEEP_S, window_start
from ..errors import ExtregError

if TYPE_CHECKING:
    from ..adapters.postgres_health import HealthRow
    from ..registry import Registry

log = structlog.get_logger("extreg.invoke.health")

Observer = Callable[[], None]
CLOSE_TIMEOUT_S = 5.0
READ_OVERLAP = timedelta(seconds=30)  # rows are stamped with their transaction's start time,
# so a write that started before the previous read but committed after it is re-read.
RETRY_PAUSE_S = 0.2
PRUNE_EVERY_S = 300.0


class HealthStore(Protocol):
    """Where batches are written and totals read: `PostgresSource`, or on a node of the NATS
    change feed, `FeedHealth` (through the publisher)."""

    async def update_health(self, batch: HealthBatch) -> bool: ...

    async def read_health(
        self, since: datetime | None = None, ids: list[str] | None = None, *, recent_since: float
    ) -> tuple[datetime, list[HealthRow]]: ...

    async def prune_health(self, before: float) -> None: ...


def new_node_id() -> str:
    """A name for this process's writes, unique per start: host, pid and a random suffix."""
    return f"{socket.gethostname()[:200]}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def adopt_totals(monitor: HealthMonitor, totals: HealthDelta) -> None:
    """Make `totals` (a database row: every node's written calls) the monitor's totals for one
    extension, keeping this node's not-yet-written calls on top and still to be written.

    Must run without an await in between its steps (it does: it is synchronous).
    """
    unwritten = monitor.take_delta(totals.extension_id)
    monitor.forget_totals(totals.extension_id)
    if unwritten is not None:
        monitor.merge(unwritten)  # shown ...
        monitor.restore(unwritten)  # ... and handed over again by the next drain
    monitor.merge(totals)


class HealthFlusher:
    """Moves health from the monitor to the database (see the module docstring)."""

    def __init__(
        self,
        monitor: HealthMonitor,
        breakers: CircuitBreakers,
        registry: Registry,
        *,
        interval_s: float,
        node_id: str | None = None,
        observers: Iterable[Observer] = (),
    ) -> None:
        self.monitor = monitor
        self.breakers = breakers
        self.registry = registry
        self.interval_s = interval_s
        self.node_id = node_id or new_node_id()
        self.observers = list(observers)
        self.persistent = registry.settings.persists_health
        self._batches: deque[HealthBatch] = deque()
        self._seq = 0
        self._since: datetime | None = None
        self._dirty_circuits: set[str] = set()
        self._lock = asyncio.Lock()
        self._failing = False
        self._pruned_at = -math.inf
        breakers.on_state_change(self._circuit_changed)

    @property
    def unwritten_calls(self) -> int:
        """Calls drained but not yet written (waiting batches)."""
        return sum(batch.calls for batch in self._batches)

    @property
    def waiting_batches(self) -> int:
        return len(self._batches)

    def queued(self) -> list[tuple[int, bool, int]]:
        """`(seq, sealed, calls)` of each waiting batch, oldest first (for status and tests)."""
        return [(batch.seq, batch.sealed, batch.calls) for batch in self._batches]

    def _circuit_changed(self, key: str, old: str, new: str) -> None:
        if VERSION_SEPARATOR not in key:  # a version's circuit has no health row of its own
            self._dirty_circuits.add(key)

    async def run(self) -> None:
        """Flush every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.flush()
            except Exception:  # never let the loop die: the next round tries again
                log.exception("health_flush_crashed", node_id=self.node_id)

    async def flush(self, *, refresh: bool = True) -> bool:
        """One round: drain, batch, write, read back, tell the observers. True when nothing
        is left unwritten."""
        async with self._lock:
            try:
                return await self._flush(refresh)
            finally:
                for observe in self.observers:
                    observe()

    async def _flush(self, refresh: bool) -> bool:
        self._file(self.monitor.drain_deltas(), self.monitor.drain_transitions())
        if not self.persistent:
            return True
        try:
            db = self.registry.health_store
            while self._batches:
                batch = self._batches[0]
                if not await db.update_health(batch):
                    log.info("health_batch_already_applied", node_id=self.node_id, seq=batch.seq)
                self._batches.popleft()
            if refresh:
                await self._refresh(db)
        except Exception as exc:  # the loop must outlive any failure
            if not self._failing:
                if isinstance(exc, ExtregError):
                    log.warning(
                        "health_flush_failed",
                        error=str(exc),
                        unwritten_calls=self.unwritten_calls,
                    )
                else:
                    log.exception("health_flush_failed", unwritten_calls=self.unwritten_calls)
            self._failing = True
            return False
        if self._failing:
            log.info("health_flush_recovered", node_id=self.node_id)
            self._failing = False
        if refresh:  # not in the final flush, whose few seconds are for the writes
            await self._prune(db)
        return True

    async def refresh(self) -> None:
        """Read the cluster-wide totals now (best effort: a failure is logged)."""
        if not self.persistent:
            return
        async with self._lock:
            try:
                await self._refresh(self.registry.health_store)
            except ExtregError as exc:
                log.warning("health_refresh_failed", error=str(exc))

    async def close(self, timeout_s: float = CLOSE_TIMEOUT_S) -> None:
        """The final flush: retry until everything is written or `timeout_s` has passed."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            remaining = deadline - loop.time()
            done = False
            with contextlib.suppress(TimeoutError):
                done = await asyncio.wait_for(self.flush(refresh=False), max(remaining, 0.01))
            if done:
                return
            if loop.time() >= deadline:
                log.error(
                    "health_lost_at_shutdown",
                    node_id=self.node_id,
                    unwritten_calls=self.unwritten_calls,
                )
                return
            await asyncio.sleep(min(RETRY_PAUSE_S, max(deadline - loop.time(), 0)))

    # -- internals -----------------------------------------------------------------------------

    def _file(self, deltas: list[HealthDelta], transitions: list[Transition]) -> None:
        """Queue the deltas with the changed circuit states and the transitions."""
        if not self.persistent:
            return
        ids = self._dirty_circuits.union(d.extension_id for d in deltas)
        self._dirty_circuits.clear()
        circuits = self._circuits(ids)
        if not deltas and not circuits and not transitions:
            return
        batch = self._batches[-1] if self._batches else None
        if batch is None or batch.sealed:
            self._seq += 1
            batch = HealthBatch(self.node_id, self._seq)
            self._batches.append(batch)
        batch.absorb(deltas, circuits, transitions)

    def _circuits(self, ids: set[str]) -> dict[str, CircuitSnapshot]:
        if not self.breakers.enabled:
            return {}
        return {extension_id: self.breakers.snapshot(extension_id) for extension_id in ids}

    async def _refresh(self, db: HealthStore) -> None:
        since = None if self._since is None else self._since - READ_OVERLAP
        recent_since = window_start(self.monitor.now(), self.monitor.keep_s)
        now, rows = await db.read_health(since, recent_since=recent_since)
        for row in rows:
            adopt_totals(self.monitor, row.totals)
        self._since = now

    async def _prune(self, db: HealthStore) -> None:
        """Forget old intervals now and then; a failure is logged and changes nothing else
        (every batch was written: the flush itself succeeded)."""
        now = self.monitor.now()
        if now - self._pruned_at < PRUNE_EVERY_S:
            return
        self._pruned_at = now
        try:
            await db.prune_health(now - SERIES_KEEP_S)
        except ExtregError as exc:
            log.warning("health_prune_failed", error=str(exc))
