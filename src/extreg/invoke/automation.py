"""Automatic management: disable on circuit open, enable on close, refuse unhealthy extensions.

All three are off by default (settings `auto_disable_on_circuit_open`,
`auto_enable_on_circuit_close`, `health_based_routing_enabled`) and none adds work to a call
beyond a dict lookup.

**Auto-disable / auto-enable.** A breaker transition only queues `(extension_id, new state)`;
a background task applies the latest state of each extension through the database with actor
`extreg:auto`, so the audit trigger records it and every registry on the database picks it up
by notification. A failed write (database down) is retried with backoff unless a newer state
supersedes it. Auto-enable only undoes an auto-disable: it enables an extension only when it is
disabled *and* was last changed by `extreg:auto` (checked in the same UPDATE), so an
extension an operator disabled stays disabled.

A disabled extension cannot be looked up, so its circuit would never see the half-open trial
that closes it. Recovery therefore has two paths:

- the node whose circuit opened keeps a recovery door: once the breaker's `timeout_seconds`
  have passed (the circuit reads `half_open`), calls to an extension auto-disabled by
  `extreg:auto` are admitted as the breaker's trial calls (at most `half_open_max_requests`
  at a time); other calls still get `ExtensionDisabled`. A successful trial closes the
  circuit, which enables the extension again; a failed one reopens it (the extension stays
  disabled, nothing new is audited).
- an operator closes or resets the circuit (`POST /admin/extensions/{id}/circuit`), which
  closes it and so enables the extension; or simply enables it.

The recovery door reads time only through the breaker, so it follows the invoker's clock
(`Invoker.open(..., clock=...)`): a test moves it past `timeout_seconds` instead of sleeping.

Other nodes, whose circuits never opened, refuse the auto-disabled extension like any disabled
one; and after the node that opened the circuit restarts, its breaker starts closed, so only an
operator brings the extension back. Both are deliberate: a restarted node has no evidence that
the extension recovered.

**Health-based routing.** After every health flush (which reads back every node's calls),
`HealthGate.observe` looks at each extension's recent calls, those of the last
`health_window_seconds` summed across nodes (`HealthMonitor.recent`), as status and the
dashboard do. An extension with at least `circuit_breaker_min_calls` recent calls and a success
rate below `health_based_routing_min_success_rate` is refused with `HealthRefused` (a
`CircuitOpen`). Refused calls are not recorded, so once the bad calls age out of the window the
extension gets calls again; if it still fails it is refused again after `min_calls` more.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from ..core.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreakers, State, split_circuit
from ..core.chance import jitter
from ..core.health import HealthMonitor
from ..errors import Conflict, ExtregError, HealthRefused

if TYPE_CHECKING:
    from ..registry import Registry
    from ..settings import Settings

log = structlog.get_logger("extreg.invoke.auto")

AUTO_ACTOR = "extreg:auto"
RETRY_MIN_S, RETRY_MAX_S = 0.2, 10.0


class AutoManager:
    """Applies circuit transitions to the extension's `enabled` flag, in the background."""

    def __init__(
        self,
        registry: Registry,
        breakers: CircuitBreakers,
        *,
        disable_on_open: bool,
        enable_on_close: bool,
    ) -> None:
        self._registry = registry
        self._breakers = breakers
        self.disable_on_open = disable_on_open
        self.enable_on_close = enable_on_close
        self._latest: dict[str, State] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        breakers.on_state_change(self._on_transition)

    @classmethod
    def from_settings(
        cls, registry: Registry, breakers: CircuitBreakers, settings: Settings
    ) -> AutoManager | None:
        """An AutoManager when either setting is on and the breaker is enabled, else None."""
        if not breakers.enabled:
            return None
        if not (settings.auto_disable_on_circuit_open or settings.auto_enable_on_circuit_close):
            return None
        return cls(
            registry,
            breakers,
            disable_on_open=settings.auto_disable_on_circuit_open,
            enable_on_close=settings.auto_enable_on_circuit_close,
        )

    def _on_transition(self, key: str, old: State, new: State) -> None:
        """Breaker callback (synchronous, on the hot path): only note the newest state. A
        version's circuit (`breaker.version_circuit`) is noted when it opens only: its version
        is disabled alone (a rollback), and only an operator enables it again."""
        version = split_circuit(key)[1]
        if (new == OPEN and self.disable_on_open) or (
            new == CLOSED and self.enable_on_close and version is None
        ):
            self._latest[key] = new
            self._idle.clear()
            self._wake.set()

    def may_try_disabled(self, extension_id: str) -> bool:
        """True when a call to this disabled extension may go ahead as a half-open trial:
        auto-enable is on, extreg:auto disabled it, and this node's circuit is not closed
        and no longer refusing outright (its open timeout has passed)."""
        if not self.enable_on_close:
            return False
        ext = self._registry.get(extension_id)
        if ext is None or ext.enabled or ext.updated_by != AUTO_ACTOR:
            return False
        return self._breakers.update_state(extension_id) == HALF_OPEN

    async def wait_idle(self) -> None:
        """Wait until every queued transition has been applied (for tests and shutdown)."""
        await self._idle.wait()

    async def run(self) -> None:
        """Apply queued transitions until cancelled."""
        backoff = RETRY_MIN_S
        while True:
            await self._wake.wait()
            self._wake.clear()
            pending, self._latest = self._latest, {}
            failed: dict[str, State] = {}
            for extension_id, state in pending.items():
                try:
                    await self._apply(extension_id, state)
                except ExtregError as exc:
                    log.warning(
                        "auto_manage_failed", extension_id=extension_id, state=state, error=str(exc)
                    )
                    failed[extension_id] = state
            for extension_id, state in failed.items():
                self._latest.setdefault(extension_id, state)  # unless superseded meanwhile
            if self._latest:
                if failed:
                    await asyncio.sleep(jitter(backoff))
                    backoff = min(backoff * 2, RETRY_MAX_S)
                self._wake.set()
            else:
                backoff = RETRY_MIN_S
                self._idle.set()

    async def _apply(self, key: str, state: State) -> None:
        extension_id, version = split_circuit(key)
        try:
            db = self._registry.database
        except Conflict:
            log.warning(
                "auto_manage_skipped",
                extension_id=extension_id,
                version=version,
                reason="the registry serves read-only fixtures",
            )
            return
        if version is not None:  # only opened versions are queued
            if await db.set_version_enabled(extension_id, version, False, AUTO_ACTOR):
                log.warning(
                    "version_auto_disabled",
                    extension_id=extension_id,
                    version=version,
                    reason="its circuit opened; its calls go back to the extension's own row",
                )
            return
        if state == OPEN:
            if (await db.set_enabled(extension_id, False, AUTO_ACTOR))[0] == "updated":
                log.warning("auto_disabled", extension_id=extension_id, reason="circuit opened")
        elif await db.enable_if_disabled_by(extension_id, AUTO_ACTOR, actor=AUTO_ACTOR):
            log.info("auto_enabled", extension_id=extension_id, reason="circuit closed")


class HealthGate:
    """Refuses extensions whose success rate over the recent window is too low."""

    __slots__ = ("_monitor", "min_calls", "min_success_rate", "refused")

    def __init__(self, monitor: HealthMonitor, *, min_success_rate: float, min_calls: int) -> None:
        self._monitor = monitor
        self.min_success_rate = min_success_rate
        self.min_calls = min_calls
        self.refused: dict[str, str] = {}

    @classmethod
    def from_settings(cls, monitor: HealthMonitor, settings: Settings) -> HealthGate | None:
        if not settings.health_based_routing_enabled:
            return None
        return cls(
            monitor,
            min_success_rate=settings.health_based_routing_min_success_rate,
            min_calls=settings.circuit_breaker_min_calls,
        )

    def check(self, extension_id: str) -> None:
        """Raise `HealthRefused` when the extension is refused (the hot path's only cost)."""
        reason = self.refused.get(extension_id)
        if reason is not None:
            raise HealthRefused(extension_id, reason, 0)

    def observe(self) -> None:
        """Recompute which extensions are refused from their recent calls."""
        refused = {}
        window = self._monitor.window_s
        for extension_id in self._monitor.extension_ids():
            recent = self._monitor.recent(extension_id, latencies=False)
            calls = recent.calls
            if calls >= self.min_calls and recent.successes / calls < self.min_success_rate:
                refused[extension_id] = (
                    f"success rate {recent.successes / calls:.2f} over the last {calls} calls"
                    f" ({window:g} s) is below health_based_routing_min_success_rate"
                    f" {self.min_success_rate}"
                )
        for extension_id in refused.keys() - self.refused.keys():
            log.warning("health_refused", extension_id=extension_id, reason=refused[extension_id])
        self.refused = refused
