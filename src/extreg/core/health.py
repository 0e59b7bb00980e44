"""Health measurements per extension: counts, success rate, latency and its percentiles.

`HealthMonitor.record` is on the invocation hot path: a dict lookup, a few integer and float
updates, one clock read and one `DDSketch.add` (a mergeable quantile sketch with 1% relative
accuracy, so percentiles from several nodes or several flushes can be combined exactly).

Rules, stated once:

- An extension with no recorded call has a success rate of **1.0**: nothing has failed, so
  health-based routing and the summary do not treat a new extension as failing. Its latencies
  read 0 and its last times `None`.
- Latencies of failed calls count too (a timeout is a slow call); negative ones count as 0.
- Healthy means: circuit neither `open` nor `half_open` (so `closed`, or `disabled` when
  breakers are off) and success rate >= `min_success_rate` (the setting
  `health_based_routing_min_success_rate`, 0.8 by default).
- Without a breaker attached, every circuit reads `disabled`: no breaker, no protection.

Persistence (the database writer, elsewhere) works with deltas: `take_delta`/`drain_deltas`
hand over what was recorded since the last drain as a `HealthDelta` and start a new one;
when writing fails, `restore(delta)` puts it back so the next drain carries it again. Every
call is thus in exactly one of: written, restored, pending, or in the writer's hands. The
totals shown by `get_health` cover everything recorded by this process (drained or not) plus
whatever was added with `merge` (another node's numbers, or totals read back from the database).

Pure and I/O-free; no locks (one asyncio thread).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from ddsketch import DDSketch
from ddsketch.store import DenseStore

from .breaker import CLOSED, DISABLED, HALF_OPEN, OPEN, CircuitBreakers
from .clock import SYSTEM_CLOCK, Clock
from .times import iso_epoch

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "DEFAULT_MIN_SUCCESS_RATE",
    "REFUSING_STATES",
    "RELATIVE_ACCURACY",
    "ExtensionLike",
    "HealthDelta",
    "HealthMonitor",
    "Tally",
    "call_numbers",
    "is_healthy",
    "sketch_from_dict",
    "sketch_to_dict",
    "summarize",
]

RELATIVE_ACCURACY = 0.01
DEFAULT_MIN_SUCCESS_RATE = 0.8
REFUSING_STATES = frozenset({OPEN, HALF_OPEN})  # the circuit states that count as unhealthy
QUANTILES = (("p50_latency_ms", 0.50), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99))


class ExtensionLike(Protocol):
    """What the summary needs of an extension record (`extreg.core.model.Extension` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def enabled(self) -> bool: ...


@dataclass(frozen=True, slots=True)
class HealthDelta:
    """The calls of one extension recorded between two drains (treat `sketch` as read-only).

    `last_*` are the latest times and latency within the delta, `None` when it has none.
    """

    extension_id: str
    success_count: int
    failure_count: int
    latency_sum_ms: float
    sketch: DDSketch
    last_latency_ms: float | None = None
    last_success: datetime | None = None
    last_failure: datetime | None = None

    @property
    def calls(self) -> int:
        return self.success_count + self.failure_count

    @property
    def last_call(self) -> datetime | None:
        return max((t for t in (self.last_success, self.last_failure) if t), default=None)

    def quantile(self, q: float) -> float:
        """The latency at quantile `q` (0..1) within the sketch's accuracy; 0 when empty."""
        return self.sketch.get_quantile_value(q) or 0.0

    def merge(self, other: HealthDelta) -> HealthDelta:
        """Both deltas in one (same extension; from two drains or two nodes). Inputs unchanged."""
        if other.extension_id != self.extension_id:
            raise ValueError(f"cannot merge {other.extension_id!r} into {self.extension_id!r}")
        sketch = DDSketch(RELATIVE_ACCURACY)
        sketch.merge(self.sketch)
        sketch.merge(other.sketch)
        mine, theirs = self.last_call, other.last_call
        latest = self if theirs is None or (mine is not None and mine > theirs) else other
        return HealthDelta(
            extension_id=self.extension_id,
            success_count=self.success_count + other.success_count,
            failure_count=self.failure_count + other.failure_count,
            latency_sum_ms=self.latency_sum_ms + other.latency_sum_ms,
            sketch=sketch,
            last_latency_ms=latest.last_latency_ms,
            last_success=_latest(self.last_success, other.last_success),
            last_failure=_latest(self.last_failure, other.last_failure),
        )


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


class Tally(NamedTuple):
    """What the summary needs of one extension: whether it is enabled, its circuit state and
    its all-time counts (from a live monitor or from a database row alike)."""

    enabled: bool
    circuit_state: str
    successes: int
    failures: int
    latency_sum_ms: float


def call_numbers(successes: int, failures: int, latency_sum_ms: float) -> dict[str, Any]:
    """The counts part of the health shape: counts, success rate (1.0 with no call) and mean
    latency (0 with no call), rounded as the contract shows them."""
    calls = successes + failures
    return {
        "success_count": successes,
        "failure_count": failures,
        "success_rate": _rate(successes, calls),
        "avg_latency_ms": round(latency_sum_ms / calls, 2) if calls else 0.0,
    }


def is_healthy(circuit_state: str, success_rate: float, min_success_rate: float) -> bool:
    """Healthy: circuit neither open nor half-open, success rate >= `min_success_rate`."""
    return circuit_state not in REFUSING_STATES and success_rate >= min_success_rate


def summarize(tallies: Iterable[Tally], min_success_rate: float) -> dict[str, Any]:
    """The summary bar over `tallies`, the one computation every caller uses.

    `healthy + unhealthy == total`, disabled extensions included. `avg_success_rate` and
    `avg_latency_ms` are plain means of the unrounded per-extension figures over the
    extensions that have calls (1.0 and 0.0 when none has), rounded once at the end.
    """
    items = list(tallies)
    healthy = 0
    rates: list[float] = []
    latencies: list[float] = []
    for tally in items:
        calls = tally.successes + tally.failures
        healthy += is_healthy(tally.circuit_state, _rate(tally.successes, calls), min_success_rate)
        if calls:
            rates.append(tally.successes / calls)
            latencies.append(tally.latency_sum_ms / calls)
    return {
        "total": len(items),
        "enabled": sum(1 for tally in items if tally.enabled),
        "healthy": healthy,
        "unhealthy": len(items) - healthy,
        "avg_success_rate": round(math.fsum(rates) / len(rates), 4) if rates else 1.0,
        "avg_latency_ms": round(math.fsum(latencies) / len(latencies), 2) if latencies else 0.0,
    }


class _Entry:
    """One extension's numbers: pending (since the last drain) and base (drained or merged)."""

    __slots__ = (
        "base_failures",
        "base_latency_sum",
        "base_sketch",
        "base_successes",
        "carried",
        "failures",
        "last_failure",
        "last_latency",
        "last_success",
        "latency_sum",
        "sketch",
        "successes",
    )

    def __init__(self) -> None:
        self.successes = self.failures = 0
        self.latency_sum = 0.0
        self.sketch = DDSketch(RELATIVE_ACCURACY)
        self.base_successes = self.base_failures = 0
        self.base_latency_sum = 0.0
        self.base_sketch = DDSketch(RELATIVE_ACCURACY)
        self.carried: HealthDelta | None = None  # restored deltas: in base, not yet written
        self.last_success: float | None = None  # epoch seconds
        self.last_failure: float | None = None
        self.last_latency: float | None = None

    def totals(self) -> tuple[int, int, float]:
        return (
            self.base_successes + self.successes,
            self.base_failures + self.failures,
            self.base_latency_sum + self.latency_sum,
        )

    def all_latencies(self) -> DDSketch:
        if not self.successes and not self.failures:
            return self.base_sketch
        if not self.base_sketch.count:
            return self.sketch
        sketch = DDSketch(RELATIVE_ACCURACY)
        sketch.merge(self.base_sketch)
        sketch.merge(self.sketch)
        return sketch


class HealthMonitor:
    """Per-extension health, fed by `record` after every invocation.

    `circuit_state` gives each extension's breaker state: a `CircuitBreakers`, or any
    callable from extension id to state; without one every circuit reads `disabled`.
    `clock` returns epoch seconds (for the last success/failure times).
    """

    __slots__ = ("_circuit_state", "_clock", "_entries", "min_success_rate")

    def __init__(
        self,
        circuit_state: CircuitBreakers | Callable[[str], str] | None = None,
        *,
        min_success_rate: float = DEFAULT_MIN_SUCCESS_RATE,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if isinstance(circuit_state, CircuitBreakers):
            circuit_state = circuit_state.state
        self._circuit_state: Callable[[str], str] = circuit_state or _no_breaker
        self.min_success_rate = min_success_rate
        self._entries: dict[str, _Entry] = {}
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        breakers: CircuitBreakers | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
    ) -> HealthMonitor:
        return cls(
            breakers,
            min_success_rate=settings.health_based_routing_min_success_rate,
            clock=clock.time,
        )

    @classmethod
    def blank(
        cls, breaker_enabled: bool, *, min_success_rate: float = DEFAULT_MIN_SUCCESS_RATE
    ) -> HealthMonitor:
        """A monitor for a process that calls nothing (no invoker): every extension reads as
        new, its circuit `closed` when breakers are on in the settings, else `disabled`."""
        return cls(
            _always_closed if breaker_enabled else _no_breaker, min_success_rate=min_success_rate
        )

    def record(self, extension_id: str, ok: bool, latency_ms: float) -> None:
        """Count one finished call: its outcome and its latency in milliseconds."""
        try:
            entry = self._entries[extension_id]
        except KeyError:
            entry = self._entries[extension_id] = _Entry()
        if ok:
            entry.successes += 1
            entry.last_success = self._clock()
        else:
            entry.failures += 1
            entry.last_failure = self._clock()
        if latency_ms < 0:
            latency_ms = 0.0
        entry.latency_sum += latency_ms
        entry.last_latency = latency_ms
        entry.sketch.add(latency_ms)

    # -- reading -----------------------------------------------------------------------------

    def get_health(self, extension_id: str) -> dict[str, Any]:
        """The contract's health shape plus `last_latency_ms`; an unseen extension reads as new."""
        state = self._circuit_state(extension_id)
        entry = self._entries.get(extension_id) or _NO_CALLS
        sketch = entry.all_latencies()
        health = call_numbers(*entry.totals())
        for key, q in QUANTILES:
            health[key] = round(sketch.get_quantile_value(q) or 0.0, 2)
        health["circuit_breaker_state"] = state
        health["last_success"] = iso_epoch(entry.last_success)
        health["last_failure"] = iso_epoch(entry.last_failure)
        last = entry.last_latency
        health["last_latency_ms"] = None if last is None else round(last, 2)
        return health

    def get_all_health(self) -> dict[str, dict[str, Any]]:
        """`get_health` of every extension with recorded (or merged) calls."""
        return {extension_id: self.get_health(extension_id) for extension_id in self._entries}

    def success_rate(self, extension_id: str) -> float:
        """The success rate (1.0 with no calls), without computing percentiles."""
        entry = self._entries.get(extension_id)
        if entry is None:
            return 1.0
        successes, failures, _ = entry.totals()
        return _rate(successes, successes + failures)

    def is_healthy(self, extension_id: str) -> bool:
        """Circuit not open or half-open and success rate >= `min_success_rate`."""
        return is_healthy(
            self._circuit_state(extension_id),
            self.success_rate(extension_id),
            self.min_success_rate,
        )

    def get_health_summary(
        self, extensions: Iterable[ExtensionLike] | None = None
    ) -> dict[str, Any]:
        """`summarize` over `extensions` (default: every extension seen here, counted as
        enabled), with this monitor's circuit states and counts."""
        if extensions is None:
            items = [(extension_id, True) for extension_id in self._entries]
        else:
            items = [(ext.id, ext.enabled) for ext in extensions]
        return summarize(
            (self._tally(extension_id, enabled) for extension_id, enabled in items),
            self.min_success_rate,
        )

    def _tally(self, extension_id: str, enabled: bool) -> Tally:
        entry = self._entries.get(extension_id) or _NO_CALLS
        return Tally(enabled, self._circuit_state(extension_id), *entry.totals())

    # -- persistence and other nodes ---------------------------------------------------------

    def take_delta(self, extension_id: str) -> HealthDelta | None:
        """Hand over what was recorded (or restored) since the last drain; None if nothing."""
        entry = self._entries.get(extension_id)
        if entry is None:
            return None
        pending = None
        if entry.successes or entry.failures:
            pending = HealthDelta(
                extension_id=extension_id,
                success_count=entry.successes,
                failure_count=entry.failures,
                latency_sum_ms=entry.latency_sum,
                sketch=entry.sketch,
                last_latency_ms=entry.last_latency,
                last_success=_datetime(entry.last_success) if entry.successes else None,
                last_failure=_datetime(entry.last_failure) if entry.failures else None,
            )
            entry.base_successes += entry.successes
            entry.base_failures += entry.failures
            entry.base_latency_sum += entry.latency_sum
            entry.base_sketch.merge(entry.sketch)
            entry.successes = entry.failures = 0
            entry.latency_sum = 0.0
            entry.sketch = DDSketch(RELATIVE_ACCURACY)
        carried, entry.carried = entry.carried, None
        if carried is None:
            return pending
        return carried if pending is None else carried.merge(pending)

    def drain_deltas(self) -> list[HealthDelta]:
        """`take_delta` of every extension that has something to hand over."""
        deltas = (self.take_delta(extension_id) for extension_id in list(self._entries))
        return [delta for delta in deltas if delta is not None]

    def restore(self, delta: HealthDelta) -> None:
        """Put back a delta from `take_delta` that could not be written; the next drain has it.

        The totals shown do not change: the delta was counted when it was recorded.
        """
        entry = self._entries.get(delta.extension_id)
        if entry is None:
            entry = self._entries[delta.extension_id] = _Entry()
        entry.carried = delta if entry.carried is None else entry.carried.merge(delta)

    def merge(self, delta: HealthDelta) -> None:
        """Add calls recorded elsewhere (another node, or totals read from the database) to the
        totals shown here. They are not handed over again by `drain_deltas`."""
        entry = self._entries.get(delta.extension_id)
        if entry is None:
            entry = self._entries[delta.extension_id] = _Entry()
        entry.base_successes += delta.success_count
        entry.base_failures += delta.failure_count
        entry.base_latency_sum += delta.latency_sum_ms
        entry.base_sketch.merge(delta.sketch)
        for attr, moment in (
            ("last_success", delta.last_success),
            ("last_failure", delta.last_failure),
        ):
            if moment is not None:
                mine = getattr(entry, attr)
                if mine is None or moment.timestamp() > mine:
                    setattr(entry, attr, moment.timestamp())
        if entry.last_latency is None:
            entry.last_latency = delta.last_latency_ms

    def remove(self, extension_id: str) -> None:
        """Forget an extension (it was deleted), undrained numbers included."""
        self._entries.pop(extension_id, None)


_NO_CALLS = _Entry()  # read-only stand-in for an extension with no calls


def _always_closed(extension_id: str) -> str:
    return CLOSED


def _no_breaker(extension_id: str) -> str:
    return DISABLED


def _rate(successes: int, calls: int) -> float:
    return round(successes / calls, 4) if calls else 1.0


def _datetime(epoch: float | None) -> datetime | None:
    return None if epoch is None else datetime.fromtimestamp(epoch, UTC)


# -- a portable form of a sketch, for a database column or another node ----------------------


def sketch_to_dict(sketch: DDSketch) -> dict[str, Any]:
    """A JSON-ready form of a sketch made here (non-negative values, default mapping).

    Mirrors ddsketch's own protobuf encoding (contiguous bin counts from an offset), which
    needs protobuf; this one needs nothing. It reads the sketch's internals, here only.
    """
    store = cast(DenseStore, sketch._store)
    if sketch._negative_store.count:
        raise ValueError("sketch holds negative values; latencies never do")
    bins = store.bins
    first = next((i for i, count in enumerate(bins) if count), len(bins))
    last = next((i for i in range(len(bins) - 1, -1, -1) if bins[i]), -1)
    empty = sketch.count == 0
    return {
        "relative_accuracy": sketch._relative_accuracy,
        "offset": store.offset + first,
        "bins": bins[first : last + 1],
        "zero_count": sketch._zero_count,
        "count": sketch.count,
        "sum": sketch.sum,
        "min": None if empty else sketch._min,
        "max": None if empty else sketch._max,
    }


def sketch_from_dict(data: dict[str, Any]) -> DDSketch:
    """The sketch `sketch_to_dict` described; ValueError if `data` is not such a description."""
    try:
        sketch = DDSketch(float(data["relative_accuracy"]))
        offset = int(data["offset"])
        for index, count in enumerate(data["bins"]):
            if count:
                sketch._store.add(offset + index, float(count))
        sketch._zero_count = float(data["zero_count"])
        sketch._count = float(data["count"])
        sketch._sum = float(data["sum"])
        if sketch._count:
            sketch._min = float(data["min"])
            sketch._max = float(data["max"])
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"not a sketch description: {exc}") from None
    if abs(sketch._count - sketch._store.count - sketch._zero_count) > 1e-9 * max(
        1.0, sketch._count
    ):
        raise ValueError("not a sketch description: the bins do not add up to the count")
    return sketch
