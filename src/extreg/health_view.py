"""The contract's health answer (`GET /admin/extensions/health`, `extreg health`), built from
a live health monitor or from the `extension_health` rows another process wrote.

Both paths give the same shape, so the API, the CLI over the API and the CLI on the database
print the same thing. Without a live monitor (no invoker in this process) a blank
`HealthMonitor` supplies the rules for an extension with no calls: success rate 1.0, zero
latency, circuit `closed`.

With breakers off (`circuit_breaker_enabled` false, the default) every circuit reads
`disabled` on both paths. A database row cannot say so (the seed's column allows only
`closed`, `open`, `half_open` and defaults to `closed`, and a node with breakers off writes no
circuit state), so the caller's `breaker_enabled` decides.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .core.breaker import DISABLED
from .core.health import HealthMonitor, Tally, call_numbers, summarize
from .core.model import Extension
from .core.times import iso_seconds


def extension_health(
    ext: Extension, monitor: Any | None, *, breaker_enabled: bool
) -> dict[str, Any]:
    """`{"id", "type", "health": {...}}` for one extension; `breaker_enabled` (the setting)
    decides the circuit state when there is no live monitor."""
    health = (monitor or HealthMonitor.blank(breaker_enabled)).get_health(ext.id)
    return {"id": ext.id, "type": ext.type, "health": health}


def health_report(
    extensions: Iterable[Extension], monitor: Any | None, *, breaker_enabled: bool
) -> dict[str, Any]:
    """The whole answer: every extension's health and the summary bar."""
    records = list(extensions)
    live = monitor or HealthMonitor.blank(breaker_enabled)
    return {
        "extensions": [
            extension_health(ext, live, breaker_enabled=breaker_enabled) for ext in records
        ],
        "summary": live.get_health_summary(records),
    }


def health_from_row(row: Mapping[str, Any], *, breaker_enabled: bool) -> dict[str, Any]:
    """One `extension_health` row (joined with `extensions` for type) in the health shape."""
    tally = _tally(row, breaker_enabled=breaker_enabled)
    return {
        "id": row["id"],
        "type": row["type"],
        "health": {
            **call_numbers(tally.successes, tally.failures, tally.latency_sum_ms),
            "p50_latency_ms": _number(row.get("p50_latency_ms")),
            "p95_latency_ms": _number(row.get("p95_latency_ms")),
            "p99_latency_ms": _number(row.get("p99_latency_ms")),
            "circuit_breaker_state": tally.circuit_state,
            "last_success": iso_seconds(row.get("last_success")),
            "last_failure": iso_seconds(row.get("last_failure")),
        },
    }


def report_from_rows(
    rows: Iterable[Mapping[str, Any]], min_success_rate: float, *, breaker_enabled: bool
) -> dict[str, Any]:
    """The whole answer from database rows; the summary is the core's `summarize`, as for a
    live monitor, so the same counts give the same numbers on both paths."""
    rows = list(rows)
    return {
        "extensions": [health_from_row(row, breaker_enabled=breaker_enabled) for row in rows],
        "summary": summarize(
            (_tally(row, breaker_enabled=breaker_enabled) for row in rows), min_success_rate
        ),
    }


def _tally(row: Mapping[str, Any], *, breaker_enabled: bool) -> Tally:
    """The counts of a row. A row written by the seed's writers may carry only
    `avg_latency_ms`, no `latency_total_ms`: its sum is then the mean times the calls."""
    state = (row.get("circuit_breaker_state") or "closed") if breaker_enabled else DISABLED
    successes = int(row.get("success_count") or 0)
    failures = int(row.get("failure_count") or 0)
    latency_sum = float(row.get("latency_total_ms") or 0.0) or (
        float(row.get("avg_latency_ms") or 0.0) * (successes + failures)
    )
    return Tally(bool(row.get("enabled", True)), state, successes, failures, latency_sum)


def _number(value: Any) -> float:
    return round(float(value), 2) if value is not None else 0.0
