"""The one sequence of every write the API makes, extension or policy: refused in fixtures
mode, through the database's one write path (`PostgresSource.write_extension` and
`write_policies`, which run the route's `change` under the write's lock), logged, and then
re-read into this registry's cache, so that a GET right after the write reads what was
written. The change notification brings it to every other registry."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Literal, overload

import structlog

from ..adapters.postgres import PostgresSource
from ..core.model import Extension
from ..core.policy import Policy
from ..errors import SourceUnavailable
from ..registry import Registry
from .etag import Kind, not_found

log = structlog.get_logger("extreg.api")


def writable(registry: Registry) -> PostgresSource:
    """The database to write to; `Conflict` (409) when the registry serves fixtures,
    `SourceUnavailable` (503) while it serves the snapshot file."""
    return registry.database


@overload
async def write_one(
    registry: Registry,
    kind: Literal["extension"],
    record_id: str,
    change: Callable[[Extension | None], Extension | None],
    actor: str,
) -> tuple[str, Extension | None]: ...


@overload
async def write_one(
    registry: Registry,
    kind: Literal["policy"],
    record_id: str,
    change: Callable[[Policy | None], Policy | None],
    actor: str,
) -> tuple[str, Policy | None]: ...


async def write_one(
    registry: Registry, kind: Kind, record_id: str, change: Any, actor: str
) -> tuple[str, Any]:
    """Write one record as `actor`: (the write's outcome, the record after it). An id
    holding NUL is not found: PostgreSQL cannot store one, so no record has it (and the
    driver would refuse the statement). Logs `<kind>_written` with the id, the outcome
    (`action`) and `duration_ms`."""
    db = writable(registry)
    if "\x00" in record_id:
        not_found(kind, record_id)
    started = time.perf_counter()
    written: tuple[str, Any]
    if kind == "policy":
        written = (await db.write_policies({record_id: change}, actor))[record_id]
    else:
        written = await db.write_extension(record_id, change, actor)
    outcome = written[0]
    ids = {f"{kind}_id": record_id}
    log.info(f"{kind}_written", **ids, action=outcome, duration_ms=ms_since(started))
    try:
        if kind == "policy":
            await registry.refresh([], policy_ids=[record_id])
        else:
            await registry.refresh([record_id])
    except SourceUnavailable as exc:  # written; the notification or the sync brings it
        log.warning("cache_not_refreshed", **ids, error=str(exc))
    return written


def ms_since(started: float) -> float:
    """Milliseconds since `started` (a `time.perf_counter()`), as every duration is logged."""
    return round((time.perf_counter() - started) * 1000, 2)
