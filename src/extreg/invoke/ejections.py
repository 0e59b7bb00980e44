"""Outlier ejection applied (the decisions are `core.outliers`'s): on this node's routes at once,
in the database for the others.

An ejected instance, or one whose time is up, changes this node's routes through `on_change`
(the invoker forgets the extension's cached route, which is rebuilt without the ejected
instances). Its `health_status` (`unhealthy`, then `healthy`) is written through the database's
write path as `extreg:outlier`, so every node's registry receives the record by notification
and its routes skip the instance too. One writer per instance writes the latest state wanted,
retrying with backoff while the database is away: a lost `healthy` would keep an instance out
on every node for good. Ejections end on time even when no call comes (`run` looks every
`CHECK_S`), and each change is logged and told to `observers` (metrics).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import structlog

from ..core.chance import jitter
from ..core.clock import Clock
from ..core.outliers import Ejection, Key, OutlierConfig, OutlierDetector
from ..errors import Conflict, ExtregError

if TYPE_CHECKING:
    from ..core.model import HealthStatus
    from ..core.routing import Route
    from ..registry import Registry
    from ..settings import Settings

log = structlog.get_logger("extreg.invoke.ejections")

ACTOR = "extreg:outlier"  # who writes an ejected instance's health_status
CHECK_S = 1.0  # how often ended ejections are looked for when no call comes
RETRY_MIN_S, RETRY_MAX_S = 0.2, 10.0
CLOSE_WAIT_S = 2.0


class Ejections:
    """This node's outlier ejection of instances (see the module docstring)."""

    def __init__(
        self,
        detector: OutlierDetector,
        registry: Registry,
        on_change: Callable[[str], Any],
    ) -> None:
        self.detector = detector
        self.observers: list[Callable[[Ejection], None]] = []
        self._registry = registry
        self._on_change = on_change
        self._wanted: dict[Key, HealthStatus] = {}  # the health_status still to write
        self._writers: dict[Key, asyncio.Task[None]] = {}

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        registry: Registry,
        clock: Clock,
        on_change: Callable[[str], Any],
    ) -> Ejections | None:
        """None when `outlier_detection_enabled` is false."""
        config = OutlierConfig.from_settings(settings)
        if config is None:
            return None
        return cls(OutlierDetector(config, clock.monotonic), registry, on_change)

    def ejected(self, extension_id: str) -> frozenset[str]:
        return self.detector.ejected(extension_id)

    def record(self, route: Route, instance_id: str, ok: bool) -> None:
        """One call's outcome on an instance of `route`'s extension."""
        changes = self.detector.returns()
        ejection = self.detector.record(
            route.ext.id, instance_id, ok, route.eligible, route.unhealthy
        )
        if ejection is not None:
            changes.append(ejection)
        self._apply(changes)

    def forget(self, extension_id: str) -> None:
        self.detector.forget(extension_id)

    async def run(self) -> None:
        """End ejections on time, calls or not, until cancelled."""
        while True:
            await asyncio.sleep(CHECK_S)
            self._apply(self.detector.returns())

    async def close(self) -> None:
        """Let the writes under way land (briefly), then stop them."""
        writers = set(self._writers.values())
        if writers:
            await asyncio.wait(writers, timeout=CLOSE_WAIT_S)
        for writer in writers:
            writer.cancel()
        await asyncio.gather(*writers, return_exceptions=True)

    def _apply(self, changes: list[Ejection]) -> None:
        for change in changes:
            key = (change.extension_id, change.instance_id)
            self._on_change(change.extension_id)
            if change.returns_at is None:
                log.info("instance_returned", extension_id=key[0], instance_id=key[1])
            else:
                log.warning(
                    "instance_ejected",
                    extension_id=key[0],
                    instance_id=key[1],
                    times_ejected=change.times,
                    returns_in_s=round(change.returns_at - self.detector.clock(), 1),
                )
            for observe in self.observers:
                observe(change)
            self._wanted[key] = "healthy" if change.returns_at is None else "unhealthy"
            if key not in self._writers:  # one writer per instance, the latest state wins
                self._writers[key] = asyncio.create_task(
                    self._write(key), name="extreg-instance-health"
                )

    async def _write(self, key: Key) -> None:
        """Write the latest state wanted for one instance until it is written."""
        backoff = RETRY_MIN_S
        while key in self._wanted:
            status = self._wanted[key]
            try:
                db = self._registry.database
                await db.set_instance_health(*key, status, ACTOR)
            except Conflict:
                self._wanted.pop(key, None)  # read-only fixtures: this node's routes only
                break
            except ExtregError as exc:
                log.warning(
                    "instance_health_not_written",
                    extension_id=key[0],
                    instance_id=key[1],
                    health_status=status,
                    error=str(exc),
                    retry_in_s=round(backoff, 1),
                )
                await asyncio.sleep(jitter(backoff))
                backoff = min(backoff * 2, RETRY_MAX_S)
                continue
            if self._wanted.get(key) == status:
                del self._wanted[key]
        self._writers.pop(key, None)
