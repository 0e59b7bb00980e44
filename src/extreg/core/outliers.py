"""Outlier ejection of instances, on the model of Envoy's outlier detection. Pure: time comes
from the clock the caller passes, changes are returned for the caller to apply.

An instance (one of an extension's `instances`) that fails `consecutive_failures` calls in a
row is ejected: calls skip it for `base_ejection_s x times ejected` (a repeat offender stays
out longer), and then it returns on its own. Never more than `max_ejection_percent` of an
extension's usable instances are out at once (rounded down, so an extension with a single
instance never loses it): when enough are out, a failing one keeps getting its share rather
than all traffic moving to the few left; instances the record already marks `unhealthy` (another
node's ejections, an operator's) count as out. A success resets an instance's run of failures.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..settings import Settings

Key = tuple[str, str]  # (extension id, instance id)


@dataclass(frozen=True, slots=True)
class OutlierConfig:
    consecutive_failures: int = 5
    base_ejection_s: float = 30.0
    max_ejection_percent: float = 50.0

    @classmethod
    def from_settings(cls, settings: Settings) -> OutlierConfig | None:
        """The settings' config, or None when `outlier_detection_enabled` is false."""
        if not settings.outlier_detection_enabled:
            return None
        return cls(
            consecutive_failures=settings.outlier_consecutive_failures,
            base_ejection_s=settings.outlier_base_ejection_seconds,
            max_ejection_percent=settings.outlier_max_ejection_percent,
        )


@dataclass(frozen=True, slots=True)
class Ejection:
    """An instance taken out (`returns_at` on the clock) or, with `returns_at` None, back."""

    extension_id: str
    instance_id: str
    times: int
    returns_at: float | None


@dataclass(slots=True)
class OutlierDetector:
    """Runs of failures, ejections and their ends, per instance (see the module docstring)."""

    config: OutlierConfig
    clock: Callable[[], float]
    _failures: dict[Key, int] = field(default_factory=dict)
    _times: dict[Key, int] = field(default_factory=dict)  # ejections so far, per instance
    _out: dict[Key, float] = field(default_factory=dict)  # ejected: when each returns
    next_return: float = math.inf  # the earliest return due; `returns()` is cheap before it

    def ejected(self, extension_id: str) -> frozenset[str]:
        """The instances of `extension_id` that calls skip now."""
        return frozenset(i for (e, i) in self._out if e == extension_id)

    def record(
        self,
        extension_id: str,
        instance_id: str,
        ok: bool,
        instances: int,
        unhealthy: frozenset[str] = frozenset(),
    ) -> Ejection | None:
        """One call's outcome on an instance of an extension with `instances` enabled ones,
        of which `unhealthy` are marked so in its record (by another node's ejection, or an
        operator): they count as out too; the ejection it causes, if any."""
        key = (extension_id, instance_id)
        if ok:
            if key in self._failures:
                del self._failures[key]
            return None
        failures = self._failures.get(key, 0) + 1
        if failures < self.config.consecutive_failures or key in self._out:
            self._failures[key] = failures
            return None
        allowed = math.floor(instances * self.config.max_ejection_percent / 100)
        if len(unhealthy.union(self.ejected(extension_id))) >= allowed:
            self._failures[key] = failures  # at the cap: it stays in, still counted
            return None
        self._failures.pop(key, None)
        times = self._times[key] = self._times.get(key, 0) + 1
        returns_at = self.clock() + self.config.base_ejection_s * times
        self._out[key] = returns_at
        self.next_return = min(self.next_return, returns_at)
        return Ejection(extension_id, instance_id, times, returns_at)

    def returns(self) -> list[Ejection]:
        """The ejections that have ended by now, taken back in."""
        now = self.clock()
        if now < self.next_return:
            return []
        back = [key for key, at in self._out.items() if at <= now]
        for key in back:
            del self._out[key]
        self.next_return = min(self._out.values(), default=math.inf)
        return [Ejection(e, i, self._times[(e, i)], None) for e, i in back]

    def forget(self, extension_id: str) -> None:
        """Drop everything about an extension that is gone."""
        for table in (self._failures, self._times, self._out):
            for key in [k for k in table if k[0] == extension_id]:
                del table[key]
        self.next_return = min(self._out.values(), default=math.inf)
