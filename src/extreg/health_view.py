"""The contract's health answers: `GET /admin/extensions/health` and `extreg health`, and the
charts' series (`GET /admin/extensions/{id}/health/series`).

Every answer is computed by a `HealthMonitor`, whatever its numbers come from: the live one of
this process's invoker, or one filled from the database's rows (`database_monitor`, for a CLI
that calls nothing), so the API, the CLI over the API and the CLI on the database print the
same thing. Without either, a blank monitor supplies the rules for an extension with no calls.

With breakers off (`circuit_breaker_enabled` false, the default) every circuit reads
`disabled` on every path. A database row cannot say so (the seed's column allows only
`closed`, `open`, `half_open` and defaults to `closed`, and a node with breakers off writes no
circuit state), so the caller's `breaker_enabled` decides.

Series come from the database when health is persisted there (every node's calls, so charts
agree across nodes and survive restarts, lagging by up to `health_flush_interval_seconds`),
else from the monitor's memory. While the database is away the memory answers, marked
`"stale": true`: this node's recent window only.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .core.breaker import CLOSED
from .core.health import HealthMonitor
from .core.intervals import Buckets, interval_start, merge_into, series, step_for, window_start
from .core.model import Extension
from .core.times import iso_epoch
from .errors import Conflict, ExtensionNotFound, SourceUnavailable

if TYPE_CHECKING:
    from .adapters.postgres import PostgresSource
    from .registry import Registry
    from .settings import Settings


def extension_health(
    ext: Extension, monitor: HealthMonitor | None, *, breaker_enabled: bool
) -> dict[str, Any]:
    """`{"id", "type", "health": {...}}` for one extension; `breaker_enabled` (the setting)
    decides the circuit state when there is no live monitor."""
    health = (monitor or HealthMonitor.blank(breaker_enabled)).get_health(ext.id)
    return {"id": ext.id, "type": ext.type, "health": health}


def health_report(
    extensions: Iterable[Extension], monitor: HealthMonitor | None, *, breaker_enabled: bool
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


async def database_report(
    db: PostgresSource, settings: Settings, extension_id: str | None = None
) -> dict[str, Any]:
    """`health_report` from the database's numbers, for a process that calls nothing.
    `ExtensionNotFound` when `extension_id` is given and not in the database."""
    if extension_id is None:
        extensions = sorted(await db.load_all_extensions(), key=lambda ext: ext.id)
    else:
        found = await db.load_extension(extension_id)
        if found is None:
            raise ExtensionNotFound(extension_id)
        extensions = [found]
    ids = None if extension_id is None else [extension_id]
    monitor = await database_monitor(db, settings, ids)
    return health_report(extensions, monitor, breaker_enabled=settings.circuit_breaker_enabled)


async def database_monitor(
    db: PostgresSource, settings: Settings, ids: list[str] | None = None
) -> HealthMonitor:
    """A monitor holding the database's cluster-wide numbers of `ids` (all when None), its
    circuit states those of the rows (or `disabled` with breakers off in `settings`)."""
    since = window_start(time.time(), settings.health_window_seconds)
    _, rows = await db.read_health(None, ids, recent_since=since)
    states = {row.totals.extension_id: row.circuit_breaker_state for row in rows}
    monitor = HealthMonitor(
        (lambda extension_id: states.get(extension_id, CLOSED))
        if settings.circuit_breaker_enabled
        else None,
        window_s=settings.health_window_seconds,
    )
    for row in rows:
        monitor.merge(row.totals)
    return monitor


async def health_series(
    extension_id: str | None, minutes: int, monitor: HealthMonitor | None, registry: Registry
) -> dict[str, Any]:
    """The chart of one extension (or of all, summed) over the last `minutes`: points and the
    circuit transitions, enables and disables among them (see the module docstring)."""
    now = monitor.now() if monitor is not None else time.time()
    since = interval_start(now - minutes * 60)
    found = None
    with contextlib.suppress(Conflict, SourceUnavailable):  # no database (now), or none at all
        found = await _from_database(registry.database, extension_id, since)
    buckets, events = found or _from_memory(monitor, extension_id, since)
    return {
        "extension_id": extension_id,
        "minutes": minutes,
        "interval_seconds": step_for(minutes),
        "points": [{**p, "t": iso_epoch(p["t"])} for p in series(buckets, now, minutes)],
        "events": events,
        # Memory holds only the recent window where health belongs in a database.
        "stale": found is None and registry.settings.persists_health,
    }


Events = list[dict[str, Any]]


async def _from_database(
    db: PostgresSource, extension_id: str | None, since: float
) -> tuple[Buckets, Events]:
    buckets: Buckets = {}
    ids = None if extension_id is None else [extension_id]
    for each in (await db.health_intervals(since, ids)).values():
        merge_into(buckets, each)
    events = [
        _event(at, ext, kind, state=state, by=by)
        for at, ext, kind, state, by in await db.health_events(since, extension_id)
    ]
    return buckets, events


def _from_memory(
    monitor: HealthMonitor | None, extension_id: str | None, since: float
) -> tuple[Buckets, Events]:
    buckets: Buckets = {}
    if monitor is None:
        return buckets, []
    for each in [extension_id] if extension_id else monitor.extension_ids():
        merge_into(buckets, monitor.intervals(each))
    events = [
        _event(t.at, t.extension_id, "circuit", state=t.state)
        for t in monitor.transitions
        if t.at >= since and extension_id in (None, t.extension_id)
    ]
    return buckets, events


def _event(
    at: float, extension_id: str, kind: str, *, state: str | None = None, by: str | None = None
) -> dict[str, Any]:
    event: dict[str, Any] = {"t": iso_epoch(at), "extension_id": extension_id, "kind": kind}
    if kind == "circuit":
        event["state"] = state
    else:
        event["by"] = by
    return event
