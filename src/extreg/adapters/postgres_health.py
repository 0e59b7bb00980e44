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
   sketch and the percentiles, and record this node's circuit state.

Counts from several nodes thus sum exactly, and the percentiles are those of every call of
every node (within the sketch's 1% relative accuracy). A node applies its batches strictly in
order, so "already applied" is simply `last_seq >= seq`. The caller (the invoker's flusher)
learns from `HealthBatch.sealed` whether the commit was reached: an unsealed batch was rolled
back for sure and may absorb newer deltas; a sealed one is retried as it is.

Deltas for an extension that has no row in `extensions` (deleted, or only in fixtures) are
dropped: `extension_health` rows must reference an extension.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import psycopg
import structlog
from ddsketch import DDSketch
from psycopg.types.json import Jsonb

from ..core.breaker import CircuitSnapshot
from ..core.health import RELATIVE_ACCURACY, HealthDelta, sketch_from_dict, sketch_to_dict

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
_READ = """
SELECT extension_id, coalesce(success_count, 0), coalesce(failure_count, 0), latency_total_ms,
       latency_sketch, last_success, last_failure, last_latency_ms,
       coalesce(circuit_breaker_state, 'closed'), updated_at
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
    sealed: bool = False

    def absorb(self, deltas: list[HealthDelta], circuits: dict[str, CircuitSnapshot]) -> None:
        """Add newer deltas and states to this (unsealed) batch."""
        if self.sealed:
            raise ValueError("a sealed batch may already be committed; it cannot grow")
        for delta in deltas:
            mine = self.deltas.get(delta.extension_id)
            self.deltas[delta.extension_id] = delta if mine is None else mine.merge(delta)
        self.circuits.update(circuits)

    @property
    def calls(self) -> int:
        return sum(d.calls for d in self.deltas.values())

    def __bool__(self) -> bool:
        return bool(self.deltas or self.circuits)


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
        additions = [_addition(d, stored[i]) for i, d in batch.deltas.items() if i in stored]
        if additions:
            await conn.execute(_ADD, (Jsonb(additions),))
        circuits = [_circuit(c) for i, c in batch.circuits.items() if i in stored]
        if circuits:
            await conn.execute(_CIRCUITS, (Jsonb(circuits),))
        batch.sealed = True  # the commit follows; its outcome may be lost from here on
    return True


async def read_rows(
    conn: psycopg.AsyncConnection[Any], since: datetime | None, ids: list[str] | None
) -> tuple[datetime, list[HealthRow]]:
    """(database time now, rows updated after `since` — all when None — of `ids` or all)."""
    row = await (await conn.execute("SELECT now()")).fetchone()
    assert row is not None  # SELECT now() always returns a row
    cur = await conn.execute(_READ, {"since": since, "ids": ids})
    return row[0], [_row(r) for r in await cur.fetchall()]


def _merged_sketch(stored: Any, delta: HealthDelta) -> DDSketch:
    sketch = DDSketch(RELATIVE_ACCURACY)
    if stored:
        try:
            sketch = sketch_from_dict(stored)
        except ValueError as exc:
            log.error("stored_sketch_unreadable", extension_id=delta.extension_id, error=str(exc))
    sketch.merge(delta.sketch)
    return sketch


def _addition(delta: HealthDelta, stored_sketch: Any) -> dict[str, Any]:
    sketch = _merged_sketch(stored_sketch, delta)
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


def _row(r: tuple[Any, ...]) -> HealthRow:
    extension_id, successes, failures, total_ms, sketch_data, last_ok, last_bad, last_ms = r[:8]
    sketch = DDSketch(RELATIVE_ACCURACY)
    if sketch_data:
        try:
            sketch = sketch_from_dict(sketch_data)
        except ValueError as exc:
            log.error("stored_sketch_unreadable", extension_id=extension_id, error=str(exc))
    totals = HealthDelta(
        extension_id=extension_id,
        success_count=int(successes),
        failure_count=int(failures),
        latency_sum_ms=float(total_ms or 0.0),
        sketch=sketch,
        last_latency_ms=None if last_ms is None else float(last_ms),
        last_success=last_ok,
        last_failure=last_bad,
    )
    return HealthRow(totals=totals, circuit_breaker_state=r[8], updated_at=r[9])


def _quantile(sketch: DDSketch, q: float) -> float:
    return round(sketch.get_quantile_value(q) or 0.0, 2)


def _iso(moment: datetime | None) -> str | None:
    return None if moment is None else moment.isoformat()
