"""SQL for `extension_health`: additive, idempotent batch writes and cluster-wide reads.

Every router process (a *node*) writes what it measured since its last write as one batch,
numbered by the node (`node_id`, `seq` = 1, 2, 3, ...). One transaction per batch:

1. claim the batch in `extreg_health_nodes` (one row per node holding its last applied `seq`):
   if the row already holds this `seq` or a later one, the batch was committed before (a
   retry after a commit whose outcome was lost) and nothing else is written;
2. make sure each extension has its health row (`INSERT ... ON CONFLICT DO NOTHING`);
3. lock the rows (`SELECT ... FOR UPDATE`, in id order so two nodes cannot deadlock) and merge
   each stored latency sketch with the batch's in Python, then compute p50/p95/p99 from it;
4. add counts and latency sums (`x = x + delta`), keep the latest times, store the merged
   sketch and the percentiles, and record this node's circuit state;
5. add the same calls to their intervals in `extension_health_intervals` (counts added in
   SQL, sketches merged in Python: the lock of step 3 on the extension's health row keeps two
   nodes from merging into one interval at once), and append the circuit transitions to
   `extreg_circuit_events`.

Counts from several nodes thus sum exactly, and the percentiles are those of every call of
every node (within the sketch's 1% relative accuracy). A node applies its batches strictly in
order, so "already applied" is simply `last_seq >= seq`. The caller (the invoker's flusher)
learns from `HealthBatch.sealed` whether the commit was reached: an unsealed batch was rolled
back for sure and may absorb newer deltas; a sealed one is retried as it is.

Deltas for an extension that has no row in `extensions` (deleted, or only in fixtures) are
dropped: `extension_health` rows must reference an extension.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from ddsketch import DDSketch
from psycopg.types.json import Jsonb

from ..core.breaker import CircuitSnapshot
from ..core.health import (
    RELATIVE_ACCURACY,
    HealthDelta,
    Transition,
    sketch_from_dict,
    sketch_to_dict,
)
from ..core.intervals import Bucket, Buckets

log = structlog.get_logger("extreg.health_sql")

_CLAIM = """
INSERT INTO extreg_health_nodes (node_id, last_seq) VALUES (%s, %s)
ON CONFLICT (node_id) DO UPDATE SET last_seq = excluded.last_seq, flushed_at = now()
    WHERE extreg_health_nodes.last_seq < excluded.last_seq
RETURNING 1
"""
_ENSURE_ROWS = """
INSERT INTO extension_health (extension_id)
SELECT id FROM extensions WHERE id = ANY(%s) ORDER BY id
ON CONFLICT (extension_id) DO NOTHING
"""
_LOCK = """
SELECT extension_id, latency_sketch FROM extension_health
WHERE extension_id = ANY(%s) ORDER BY extension_id FOR UPDATE
"""
_ADD = """
UPDATE extension_health h SET
    success_count = coalesce(h.success_count, 0) + d.successes,
    failure_count = coalesce(h.failure_count, 0) + d.failures,
    latency_samples = coalesce(h.latency_samples, 0) + d.successes + d.failures,
    latency_total_ms = h.latency_total_ms + d.latency_ms,
    latency_sum = round(h.latency_total_ms + d.latency_ms)::bigint,
    avg_latency_ms = round(((h.latency_total_ms + d.latency_ms)
        / nullif(coalesce(h.latency_samples, 0) + d.successes + d.failures, 0))::numeric, 2),
    latency_sketch = d.sketch,
    p50_latency_ms = d.p50, p95_latency_ms = d.p95, p99_latency_ms = d.p99,
    last_success = greatest(h.last_success, d.last_success),
    last_failure = greatest(h.last_failure, d.last_failure),
    last_latency_ms = CASE WHEN h.last_call_at IS NULL OR d.last_call >= h.last_call_at
                           THEN round(d.last_latency_ms)::integer ELSE h.last_latency_ms END,
    last_call_at = greatest(h.last_call_at, d.last_call),
    latency_samples_window_start = coalesce(h.latency_samples_window_start, now()),
    updated_at = now()
FROM jsonb_to_recordset(%s::jsonb) AS d(
    extension_id text, successes bigint, failures bigint, latency_ms float8, sketch jsonb,
    p50 numeric, p95 numeric, p99 numeric, last_success timestamptz, last_failure timestamptz,
    last_call timestamptz, last_latency_ms float8)
WHERE h.extension_id = d.extension_id
"""
_CIRCUITS = """
UPDATE extension_health h SET
    circuit_breaker_state = d.state,
    circuit_breaker_opened_at = d.opened_at,
    circuit_breaker_failure_threshold = d.failure_threshold,
    circuit_breaker_error_rate_threshold = d.error_rate_threshold,
    circuit_breaker_window_seconds = d.window_seconds,
    half_open_max_requests = d.half_open_max_requests,
    half_open_requests_count = d.half_open_admitted,
    updated_at = now()
FROM jsonb_to_recordset(%s::jsonb) AS d(
    extension_id text, state text, opened_at timestamptz, failure_threshold integer,
    error_rate_threshold numeric, window_seconds integer, half_open_max_requests integer,
    half_open_admitted integer)
WHERE h.extension_id = d.extension_id
"""
_STORED_INTERVALS = """
SELECT i.extension_id, extract(epoch FROM i.interval_start)::bigint, i.latency_sketch
FROM extension_health_intervals i
JOIN jsonb_to_recordset(%s::jsonb) AS d(extension_id text, start bigint)
  ON i.extension_id = d.extension_id AND i.interval_start = to_timestamp(d.start)
ORDER BY 1, 2
FOR UPDATE OF i
"""
_ADD_INTERVALS = """
INSERT INTO extension_health_intervals AS i
    (extension_id, interval_start, success_count, failure_count, latency_total_ms, latency_sketch)
SELECT d.extension_id, to_timestamp(d.start), d.successes, d.failures, d.latency_ms, d.sketch
FROM jsonb_to_recordset(%s::jsonb) AS d(
    extension_id text, start bigint, successes bigint, failures bigint, latency_ms float8,
    sketch jsonb)
ON CONFLICT (extension_id, interval_start) DO UPDATE SET
    success_count = i.success_count + excluded.success_count,
    failure_count = i.failure_count + excluded.failure_count,
    latency_total_ms = i.latency_total_ms + excluded.latency_total_ms,
    latency_sketch = excluded.latency_sketch
"""
_ADD_TRANSITIONS = """
INSERT INTO extreg_circuit_events (extension_id, at, state, node_id)
SELECT d.extension_id, to_timestamp(d.at), d.state, %s
FROM jsonb_to_recordset(%s::jsonb) AS d(extension_id text, at float8, state text)
"""
_READ_INTERVALS = """
SELECT extension_id, extract(epoch FROM interval_start)::bigint, success_count, failure_count,
       latency_total_ms, latency_sketch
FROM extension_health_intervals
WHERE interval_start >= to_timestamp(%(since)s)
  AND (%(ids)s::text[] IS NULL OR extension_id = ANY(%(ids)s))
"""
_READ_EVENTS = """
SELECT extract(epoch FROM at)::float8, extension_id, 'circuit', state, NULL
FROM extreg_circuit_events
WHERE at >= to_timestamp(%(since)s) AND (%(id)s::text IS NULL OR extension_id = %(id)s)
UNION ALL
SELECT extract(epoch FROM changed_at)::float8, extension_id, action, NULL, changed_by
FROM extension_audit_log
WHERE action IN ('enable', 'disable') AND changed_at >= to_timestamp(%(since)s)
  AND (%(id)s::text IS NULL OR extension_id = %(id)s)
ORDER BY 1
"""
_PRUNE = (
    "DELETE FROM extension_health_intervals WHERE interval_start < to_timestamp(%s)",
    "DELETE FROM extreg_circuit_events WHERE at < to_timestamp(%s)",
)
_READ = """
SELECT extension_id, coalesce(success_count, 0), coalesce(failure_count, 0), latency_total_ms,
       latency_sketch, last_success, last_failure, last_latency_ms,
       coalesce(circuit_breaker_state, 'closed'), updated_at,
       avg_latency_ms, p50_latency_ms, p95_latency_ms, p99_latency_ms
FROM extension_health
WHERE (%(since)s::timestamptz IS NULL OR updated_at > %(since)s)
  AND (%(ids)s::text[] IS NULL OR extension_id = ANY(%(ids)s))
ORDER BY extension_id
"""


@dataclass(slots=True)
class HealthBatch:
    """One node's numbered write: deltas to add and circuit states to record.

    `sealed` turns true once the writer reaches the commit; from then on the batch may have
    been committed, so it must be retried unchanged rather than grown.
    """

    node_id: str
    seq: int
    deltas: dict[str, HealthDelta] = field(default_factory=dict)
    circuits: dict[str, CircuitSnapshot] = field(default_factory=dict)
    transitions: list[Transition] = field(default_factory=list)
    sealed: bool = False

    def absorb(
        self,
        deltas: list[HealthDelta],
        circuits: dict[str, CircuitSnapshot],
        transitions: Iterable[Transition] = (),
    ) -> None:
        """Add newer deltas, states and transitions to this (unsealed) batch."""
        if self.sealed:
            raise ValueError("a sealed batch may already be committed; it cannot grow")
        for delta in deltas:
            mine = self.deltas.get(delta.extension_id)
            self.deltas[delta.extension_id] = delta if mine is None else mine.merge(delta)
        self.circuits.update(circuits)
        self.transitions.extend(transitions)

    @property
    def calls(self) -> int:
        return sum(d.calls for d in self.deltas.values())

    def __bool__(self) -> bool:
        return bool(self.deltas or self.circuits or self.transitions)


@dataclass(frozen=True, slots=True)
class HealthRow:
    """One extension's cluster-wide totals as stored (`totals` covers every node's calls)."""

    totals: HealthDelta
    circuit_breaker_state: str
    updated_at: datetime | None


async def write_batch(conn: psycopg.AsyncConnection[Any], batch: HealthBatch) -> bool:
    """Apply `batch` in one transaction; False when it had been applied already."""
    async with conn.transaction():
        cur = await conn.execute(_CLAIM, (batch.node_id, batch.seq))
        if await cur.fetchone() is None:
            batch.sealed = True
            return False
        ids = sorted(batch.deltas.keys() | batch.circuits.keys())
        await conn.execute(_ENSURE_ROWS, (ids,))
        cur = await conn.execute(_LOCK, (ids,))
        stored = {row[0]: row[1] for row in await cur.fetchall()}
        deltas = [d for i, d in batch.deltas.items() if i in stored]
        if deltas:
            await conn.execute(
                _ADD, (Jsonb([_addition(d, stored[d.extension_id]) for d in deltas]),)
            )
            await _add_intervals(conn, deltas)
        circuits = [_circuit(c) for i, c in batch.circuits.items() if i in stored]
        if circuits:
            await conn.execute(_CIRCUITS, (Jsonb(circuits),))
        if batch.transitions:
            transitions = [t._asdict() for t in batch.transitions]
            await conn.execute(_ADD_TRANSITIONS, (batch.node_id, Jsonb(transitions)))
        batch.sealed = True  # the commit follows; its outcome may be lost from here on
    return True


async def _add_intervals(conn: psycopg.AsyncConnection[Any], deltas: list[HealthDelta]) -> None:
    """Step 5 of the module docstring: add each delta's calls to their intervals."""
    keys = [{"extension_id": d.extension_id, "start": t} for d in deltas for t in d.intervals]
    if not keys:
        return
    cur = await conn.execute(_STORED_INTERVALS, (Jsonb(keys),))
    stored = {(r[0], int(r[1])): r[2] for r in await cur.fetchall()}
    rows = []
    for delta in deltas:
        for start, bucket in delta.intervals.items():
            sketch = _merged_sketch(
                stored.get((delta.extension_id, start)), bucket.sketch, delta.extension_id
            )
            rows.append(
                {
                    "extension_id": delta.extension_id,
                    "start": start,
                    "successes": bucket.successes,
                    "failures": bucket.failures,
                    "latency_ms": bucket.latency_sum_ms,
                    "sketch": sketch_to_dict(sketch),
                }
            )
    await conn.execute(_ADD_INTERVALS, (Jsonb(rows),))


async def read_rows(
    conn: psycopg.AsyncConnection[Any],
    since: datetime | None,
    ids: list[str] | None,
    recent_since: float,
) -> tuple[datetime, list[HealthRow]]:
    """(database time now, rows updated after `since` — all when None — of `ids` or all),
    each carrying its intervals that start at or after `recent_since` (epoch seconds); all of
    it from one snapshot, so totals and intervals agree."""
    async with conn.transaction():
        await conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        row = await (await conn.execute("SELECT now()")).fetchone()
        assert row is not None  # SELECT now() always returns a row
        cur = await conn.execute(_READ, {"since": since, "ids": ids})
        rows = await cur.fetchall()
        found = await read_intervals(conn, recent_since, [r[0] for r in rows]) if rows else {}
    return row[0], [_row(r, found.get(r[0], {})) for r in rows]


async def read_intervals(
    conn: psycopg.AsyncConnection[Any], since: float, ids: list[str] | None
) -> dict[str, Buckets]:
    """The stored intervals of `ids` (all when None) that start at or after `since`."""
    cur = await conn.execute(_READ_INTERVALS, {"since": since, "ids": ids})
    found: dict[str, Buckets] = {}
    for extension_id, start, successes, failures, total_ms, sketch_data in await cur.fetchall():
        sketch = _stored_sketch(sketch_data, extension_id)
        bucket = Bucket(int(successes), int(failures), float(total_ms), sketch)
        found.setdefault(extension_id, {})[int(start)] = bucket
    return found


async def read_events(
    conn: psycopg.AsyncConnection[Any], since: float, extension_id: str | None
) -> list[tuple[float, str, str, str | None, str | None]]:
    """`(at, extension_id, kind, state, by)` since `since` (epoch seconds), oldest first:
    circuit transitions (kind `circuit`, with the state) and enables and disables from the
    audit log (with the actor)."""
    cur = await conn.execute(_READ_EVENTS, {"since": since, "id": extension_id})
    return [(float(r[0]), r[1], r[2], r[3], r[4]) for r in await cur.fetchall()]


async def prune(conn: psycopg.AsyncConnection[Any], before: float) -> None:
    """Delete intervals and circuit transitions older than `before` (epoch seconds)."""
    async with conn.transaction():
        for statement in _PRUNE:
            await conn.execute(statement, (before,))


def _stored_sketch(data: Any, extension_id: str) -> DDSketch:
    """A stored sketch, or an empty one (logged) when it cannot be read."""
    if data:
        try:
            return sketch_from_dict(data)
        except ValueError as exc:
            log.error("stored_sketch_unreadable", extension_id=extension_id, error=str(exc))
    return DDSketch(RELATIVE_ACCURACY)


def _merged_sketch(stored: Any, sketch: DDSketch, extension_id: str) -> DDSketch:
    merged = _stored_sketch(stored, extension_id)
    merged.merge(sketch)
    return merged


def _addition(delta: HealthDelta, stored_sketch: Any) -> dict[str, Any]:
    sketch = _merged_sketch(stored_sketch, delta.sketch, delta.extension_id)
    last_call = delta.last_call
    return {
        "extension_id": delta.extension_id,
        "successes": delta.success_count,
        "failures": delta.failure_count,
        "latency_ms": delta.latency_sum_ms,
        "sketch": sketch_to_dict(sketch),
        "p50": _quantile(sketch, 0.50),
        "p95": _quantile(sketch, 0.95),
        "p99": _quantile(sketch, 0.99),
        "last_success": _iso(delta.last_success),
        "last_failure": _iso(delta.last_failure),
        "last_call": _iso(last_call),
        "last_latency_ms": delta.last_latency_ms,
    }


def _circuit(snapshot: CircuitSnapshot) -> dict[str, Any]:
    config = snapshot.config
    return {
        "extension_id": snapshot.extension_id,
        "state": snapshot.state,
        "opened_at": _iso(snapshot.opened_at),
        "failure_threshold": config.failure_threshold,
        "error_rate_threshold": config.error_rate_threshold,
        "window_seconds": round(config.window_seconds),
        "half_open_max_requests": config.half_open_max_requests,
        "half_open_admitted": snapshot.half_open_admitted,
    }


def _row(r: tuple[Any, ...], intervals: Buckets) -> HealthRow:
    extension_id, successes, failures, total_ms, sketch_data, last_ok, last_bad, last_ms = r[:8]
    calls = int(successes) + int(failures)
    avg, *quantiles = r[10:]
    totals = HealthDelta(
        extension_id=extension_id,
        success_count=int(successes),
        failure_count=int(failures),
        # The seed's own writers keep only the mean: the sum is then the mean times the calls.
        latency_sum_ms=float(total_ms or 0.0) or float(avg or 0.0) * calls,
        sketch=_stored_sketch(sketch_data, extension_id)
        if sketch_data
        else _stand_in_sketch(quantiles),
        last_latency_ms=None if last_ms is None else float(last_ms),
        last_success=last_ok,
        last_failure=last_bad,
        intervals=intervals,
    )
    return HealthRow(totals=totals, circuit_breaker_state=r[8], updated_at=r[9])


def _stand_in_sketch(quantiles: list[Any]) -> DDSketch:
    """For a row the seed's own writers wrote (p50/p95/p99 columns, no sketch): a sketch whose
    p50, p95 and p99 are those columns (weights 50, 45 and 5 put each at its rank), so the
    one health arithmetic shows them (a missing one as 0); empty when the row has none. Only
    its quantiles mean anything: its count is 100 whatever the row's calls (which come from
    the count columns)."""
    sketch = DDSketch(RELATIVE_ACCURACY)
    if any(q is not None for q in quantiles):
        for value, weight in zip(quantiles, (50.0, 45.0, 5.0), strict=True):
            sketch.add(max(float(value or 0.0), 0.0), weight)
    return sketch


def _quantile(sketch: DDSketch, q: float) -> float:
    return round(sketch.get_quantile_value(q) or 0.0, 2)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
