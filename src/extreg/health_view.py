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
from datetime import datetime
from typing import Any

from .core.breaker import DISABLED
from .core.health import REFUSING_STATES, HealthMonitor
from .core.model import Extension


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
        "extensions": [extension_health(ext, live, breaker_enabled=breaker_enabled)
                       for ext in records],
        "summary": live.get_health_summary(records),
    }


def health_from_row(row: Mapping[str, Any], *, breaker_enabled: bool) -> dict[str, Any]:
    """One `extension_health` row (joined with `extensions` for type) in the health shape."""
    state = (row.get("circuit_breaker_state") or "closed") if breaker_enabled else DISABLED
    successes = int(row.get("success_count") or 0)
    failures = int(row.get("failure_count") or 0)
    calls = successes + failures
    return {
        "id": row["id"],
        "type": row["type"],
        "health": {
            "success_count": successes,
            "failure_count": failures,
            "success_rate": round(successes / calls, 4) if calls else 1.0,
            "avg_latency_ms": _number(row.get("avg_latency_ms")),
            "p50_latency_ms": _number(row.get("p50_latency_ms")),
            "p95_latency_ms": _number(row.get("p95_latency_ms")),
            "p99_latency_ms": _number(row.get("p99_latency_ms")),
            "circuit_breaker_state": state,
            "last_success": _iso(row.get("last_success")),
            "last_failure": _iso(row.get("last_failure")),
        },
    }


def report_from_rows(
    rows: Iterable[Mapping[str, Any]], min_success_rate: float, *, breaker_enabled: bool
) -> dict[str, Any]:
    """The whole answer from database rows; the summary follows `HealthMonitor`'s rules."""
    items = [
        (health_from_row(row, breaker_enabled=breaker_enabled), bool(row.get("enabled", True)))
        for row in rows
    ]
    healthy = sum(
        1 for item, _ in items
        if item["health"]["circuit_breaker_state"] not in REFUSING_STATES
        and item["health"]["success_rate"] >= min_success_rate
    )  # fmt: skip
    called = [item["health"] for item, _ in items if item["health"]["success_count"]
              + item["health"]["failure_count"]]  # fmt: skip
    return {
        "extensions": [item for item, _ in items],
        "summary": {
            "total": len(items),
            "enabled": sum(1 for _, enabled in items if enabled),
            "healthy": healthy,
            "unhealthy": len(items) - healthy,
            "avg_success_rate": round(sum(h["success_rate"] for h in called) / len(called), 4)
            if called else 1.0,
            "avg_latency_ms": round(sum(h["avg_latency_ms"] for h in called) / len(called), 2)
            if called else 0.0,
        },
    }


def _number(value: Any) -> float:
    return round(float(value), 2) if value is not None else 0.0


def _iso(value: Any) -> str | None:
    return value.isoformat() if isinstance(value, datetime) else value
