"""Health measurements per extension: counts, success rate, latency and its percentiles,
all-time and over the recent window.

`HealthMonitor.record` is on the invocation hot path: a dict lookup, one clock read, a few
integer and float updates and one `DDSketch.add` (a mergeable quantile sketch with 1% relative
accuracy, so percentiles from several nodes or several flushes can be combined exactly). The
call is counted in the bucket of the interval it finished in (`core.intervals`); the all-time
totals are those buckets summed as they are drained.

Rules, stated once:

- All-time numbers (`success_count`, `success_rate`, ...) cover every call; `recent` covers
  the calls of the last `window_s` seconds (the setting `health_window_seconds`), and
  `status` judges by `recent`: all-time totals hide an outage behind a good week.
- `status` is `unhealthy` while the circuit is `open` or `half_open`; else `unknown` with no
  recent call, `healthy` at a recent success rate >= 0.95, `degraded` >= 0.80, `unhealthy`
  below (the original's thresholds).
- With no call a success rate is **1.0** (nothing failed) and latencies read 0; last times
  `None`.
- Latencies of failed calls count too (a timeout is a slow call); negative ones count as 0.
- Without a breaker attached every circuit reads `disabled`: no breaker, no protection.

Persistence (the database writer, elsewhere) works with deltas: `take_delta`/`drain_deltas`
hand over what was recorded since the last drain as a `HealthDelta` (with its calls per
interval) and start a new one; when writing fails, `restore(delta)` puts it back so the next
drain carries it again. Every call is thus in exactly one of: written, restored, pending, or
in the writer's hands. The numbers shown cover everything recorded by this process (drained
or not) plus whatever was added with `merge` (another node's numbers, or totals read back
from the database).

Pure and I/O-free; no locks (one asyncio thread).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol, cast

from ddsketch import DDSketch
from ddsketch.store import DenseStore

from .breaker import CLOSED, DISABLED, HALF_OPEN, OPEN, VERSION_SEPARATOR, CircuitBreakers
from .clock import SYSTEM_CLOCK, Clock
from .intervals import (
    INTERVAL_S,
    QUANTILES,
    RELATIVE_ACCURACY,
    SERIES_KEEP_S,
    Bucket,
    Buckets,
    interval_start,
    merge_into,
    prune,
    window_start,
    window_total,
)
from .times import iso_epoch

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "DEFAULT_WINDOW_S",
    "HEALTHY_RATE",
    "REFUSING_STATES",
    "RELATIVE_ACCURACY",
    "STATUSES",
    "ExtensionLike",
    "HealthDelta",
    "HealthMonitor",
    "Tally",
    "Transition",
    "call_numbers",
    "sketch_from_dict",
    "sketch_to_dict",
    "status_of",
    "summarize",
]

DEFAULT_WINDOW_S = 300.0
HEALTHY_RATE, DEGRADED_RATE = 0.95, 0.80  # the original's thresholds for `status`
STATUSES = ("healthy", "degraded", "unhealthy", "unknown")
REFUSING_STATES = frozenset({OPEN, HALF_OPEN})  # the circuit states that read as unhealthy
TRANSITIONS_KEPT = 10_000  # circuit transitions remembered for charts (the newest)


class ExtensionLike(Protocol):
    """What the summary needs of an extension record (`extreg.core.model.Extension` fits)."""

    @property
    def id(self) -> str: ...

    @property
    def enabled(self) -> bool: ...


class Transition(NamedTuple):
    """A circuit that changed state: when (epoch seconds), which, and its new state."""

    at: float
    extension_id: str
    state: str


@dataclass(frozen=True, slots=True)
class HealthDelta:
    """Calls of one extension: between two drains, from another node, or a database row.

    `intervals` holds the same calls by interval (`core.intervals`), or for a database row its
    recent intervals only. `last_*` are the latest times and latency, `None` when it has none.
    Treat `sketch` and the buckets as read-only.
    """

    extension_id: str
    success_count: int
    failure_count: int
    latency_sum_ms: float
    sketch: DDSketch
    last_latency_ms: float | None = None
    last_success: datetime | None = None
    last_failure: datetime | None = None
    intervals: Mapping[int, Bucket] = field(default_factory=dict)

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
        intervals: Buckets = {}
        merge_into(intervals, self.intervals)
        merge_into(intervals, other.intervals)
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
            intervals=intervals,
        )


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


class Tally(NamedTuple):
    """What the summary needs of one extension: whether it is enabled, its status and its
    recent calls."""

    enabled: bool
    status: str
    recent: Bucket


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


def status_of(circuit_state: str, recent: Bucket) -> str:
    """healthy / degraded / unhealthy / unknown (see the module docstring)."""
    if circuit_state in REFUSING_STATES:
        return "unhealthy"
    if not recent.calls:
        return "unknown"
    rate = recent.successes / recent.calls
    return (
        "healthy" if rate >= HEALTHY_RATE else "degraded" if rate >= DEGRADED_RATE else "unhealthy"
    )


def summarize(tallies: Iterable[Tally]) -> dict[str, Any]:
    """The summary bar over `tallies`, the one computation every caller uses.

    `total` counts every extension; the statuses count enabled ones only (a disabled extension
    is neither healthy nor failing: it gets no calls), so they add up to `enabled`.
    `avg_success_rate` and `avg_latency_ms` are plain means of the unrounded recent figures
    of the enabled extensions with recent calls (1.0 and 0.0 when none has one).
    """
    items = list(tallies)
    counts = dict.fromkeys(STATUSES, 0)
    rates: list[float] = []
    latencies: list[float] = []
    for tally in items:
        if not tally.enabled:
            continue
        counts[tally.status] += 1
        if tally.recent.calls:
            rates.append(tally.recent.successes / tally.recent.calls)
            latencies.append(tally.recent.latency_sum_ms / tally.recent.calls)
    return {
        "total": len(items),
        "enabled": sum(1 for tally in items if tally.enabled),
        **counts,
        "avg_success_rate": round(math.fsum(rates) / len(rates), 4) if rates else 1.0,
        "avg_latency_ms": round(math.fsum(latencies) / len(latencies), 2) if latencies else 0.0,
    }


class _Entry:
    """One extension's numbers: pending (since the last drain, by interval) and base (drained
    or merged: all-time totals, and recent intervals)."""

    __slots__ = (
        "base_failures",
        "base_latency_sum",
        "base_sketch",
        "base_successes",
        "carried",
        "last_failure",
        "last_latency",
        "last_success",
        "open_bucket",
        "open_from",
        "open_until",
        "pending",
        "recent",
    )

    def __init__(self) -> None:
        self.pending: Buckets = {}
        # The pending bucket calls go to now, and its interval: one comparison per call.
        self.open_bucket = Bucket()
        self.open_from, self.open_until = math.inf, -math.inf
        self.base_successes = self.base_failures = 0
        self.base_latency_sum = 0.0
        self.base_sketch = DDSketch(RELATIVE_ACCURACY)
        self.recent: Buckets = {}
        self.carried: HealthDelta | None = None  # restored deltas: in base, not yet written
        self.last_success: float | None = None  # epoch seconds
        self.last_failure: float | None = None
        self.last_latency: float | None = None

    def open(self, now: float) -> Bucket:
        """The pending bucket of `now`'s interval, made the open one. A new interval gets a
        new `pending` dict (copy on write, once per interval): `/metrics` sums `pending` from
        its worker thread, and a dict nobody changes is safe to iterate there."""
        start = interval_start(now)
        bucket = self.pending.get(start)
        if bucket is None:
            bucket = Bucket()
            self.pending = {**self.pending, start: bucket}
        self.open_bucket, self.open_from, self.open_until = bucket, start, start + INTERVAL_S
        return bucket

    def close(self) -> Buckets:
        """Hand over the pending buckets and start afresh."""
        buckets, self.pending = self.pending, {}
        self.open_from, self.open_until = math.inf, -math.inf
        return buckets

    def totals(self) -> tuple[int, int, float]:
        successes, failures, latency = (
            self.base_successes,
            self.base_failures,
            self.base_latency_sum,
        )
        for bucket in self.pending.values():
            successes += bucket.successes
            failures += bucket.failures
            latency += bucket.latency_sum_ms
        return successes, failures, latency

    def all_latencies(self) -> DDSketch:
        if not self.pending:
            return self.base_sketch
        sketch = DDSketch(RELATIVE_ACCURACY)
        sketch.merge(self.base_sketch)
        for bucket in self.pending.values():
            sketch.merge(bucket.sketch)
        return sketch


class HealthMonitor:
    """Per-extension health, fed by `record` after every invocation.

    `circuit_state` gives each extension's breaker state: a `CircuitBreakers` (whose
    transitions are then remembered, for charts), or any callable from extension id to
    state; without one every circuit reads `disabled`. `clock` returns epoch seconds.
    `window_s` is the recent window; intervals are kept `keep_s` (at least `window_s`).
    """

    __slots__ = (
        "_circuit_state",
        "_clock",
        "_entries",
        "_unfiled",
        "_versions",
        "keep_s",
        "transitions",
        "window_s",
    )

    def __init__(
        self,
        circuit_state: CircuitBreakers | Callable[[str], str] | None = None,
        *,
        clock: Callable[[], float] = time.time,
        window_s: float = DEFAULT_WINDOW_S,
        keep_s: float = SERIES_KEEP_S,
    ) -> None:
        self.transitions: deque[Transition] = deque(maxlen=TRANSITIONS_KEPT)
        self._unfiled: list[Transition] = []
        if isinstance(circuit_state, CircuitBreakers):
            circuit_state.on_state_change(self._circuit_changed)
            circuit_state = circuit_state.state
        self._circuit_state: Callable[[str], str] = circuit_state or _no_breaker
        self.window_s = window_s
        self.keep_s = max(keep_s, window_s)
        self._entries: dict[str, _Entry] = {}
        # Per version, this node's calls: extension id -> version -> [circuit key,
        # successes, failures, latency sum in ms] (the breakdown of `get_health`).
        self._versions: dict[str, dict[str, list[Any]]] = {}
        self._clock = clock

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        breakers: CircuitBreakers | None = None,
        *,
        clock: Clock = SYSTEM_CLOCK,
        keep_s: float = SERIES_KEEP_S,
    ) -> HealthMonitor:
        return cls(
            breakers, clock=clock.time, window_s=settings.health_window_seconds, keep_s=keep_s
        )

    @classmethod
    def blank(cls, breaker_enabled: bool, *, window_s: float = DEFAULT_WINDOW_S) -> HealthMonitor:
        """A monitor for a process that calls nothing (no invoker): every extension reads as
        new, its circuit `closed` when breakers are on in the settings, else `disabled`."""
        return cls(_always_closed if breaker_enabled else _no_breaker, window_s=window_s)

    def record(
        self,
        extension_id: str,
        ok: bool,
        latency_ms: float,
        version: str | None = None,
        circuit: str | None = None,
    ) -> None:
        """Count one finished call: its outcome and its latency in milliseconds; with
        `version` (and the `circuit` key it was called on), in that version's numbers too."""
        try:
            entry = self._entries[extension_id]
        except KeyError:
            entry = self._entries[extension_id] = _Entry()
        if version is not None:
            self._count_version(extension_id, version, circuit or extension_id, ok, latency_ms)
        now = self._clock()
        inside = entry.open_from <= now < entry.open_until
        bucket = entry.open_bucket if inside else entry.open(now)
        if ok:
            bucket.successes += 1
            entry.last_success = now
        else:
            bucket.failures += 1
            entry.last_failure = now
        if latency_ms < 0:
            latency_ms = 0.0
        bucket.latency_sum_ms += latency_ms
        bucket.sketch.add(latency_ms)
        entry.last_latency = latency_ms

    def now(self) -> float:
        """This monitor's clock: epoch seconds."""
        return self._clock()

    def _count_version(
        self, extension_id: str, version: str, circuit: str, ok: bool, latency_ms: float
    ) -> None:
        by_version = self._versions.get(extension_id)
        if by_version is None:
            by_version = self._versions[extension_id] = {}
        counts = by_version.get(version)
        if counts is None:
            counts = by_version[version] = [circuit, 0, 0, 0.0]
        counts[1 if ok else 2] += 1
        counts[3] += latency_ms

    def _circuit_changed(self, extension_id: str, old: str, new: str) -> None:
        if VERSION_SEPARATOR in extension_id:
            return  # a version's circuit: in its `versions` numbers, not in the charts' marks
        transition = Transition(self._clock(), extension_id, new)
        self.transitions.append(transition)
        self._unfiled.append(transition)

    # -- reading -----------------------------------------------------------------------------

    def get_health(self, extension_id: str) -> dict[str, Any]:
        """The contract's health shape plus `last_latency_ms`, `status` and `recent`; an
        unseen extension reads as new."""
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
        recent = self._recent(entry)
        health["status"] = status_of(state, recent)
        health["recent"] = {
            "calls": recent.calls,
            "success_rate": _rate(recent.successes, recent.calls),
            **{key: round(recent.quantile(q), 2) for key, q in QUANTILES},
        }
        by_version = self._versions.get(extension_id)
        if by_version:
            health["versions"] = {
                version: {
                    **call_numbers(successes, failures, latency_sum),
                    "circuit_breaker_state": self._circuit_state(circuit),
                }
                for version, (circuit, successes, failures, latency_sum) in by_version.items()
            }
        return health

    def get_all_health(self) -> dict[str, dict[str, Any]]:
        """`get_health` of every extension with recorded (or merged) calls."""
        return {extension_id: self.get_health(extension_id) for extension_id in self._entries}

    def counts(self, extension_id: str) -> tuple[dict[str, Any], str]:
        """The all-time counts part of the health shape and the circuit state, without
        percentiles or the window: what the Prometheus gauges show, read from their worker
        thread (safe there: see `_Entry.open`)."""
        entry = self._entries.get(extension_id) or _NO_CALLS
        return call_numbers(*entry.totals()), self._circuit_state(extension_id)

    def extension_ids(self) -> list[str]:
        """Every extension with recorded (or merged) calls."""
        return list(self._entries)

    def recent(self, extension_id: str, *, latencies: bool = True) -> Bucket:
        """The calls of the last `window_s` seconds, summed (a new bucket, the caller's);
        without `latencies`, counts only."""
        return self._recent(self._entries.get(extension_id) or _NO_CALLS, latencies=latencies)

    def _recent(self, entry: _Entry, *, latencies: bool = True) -> Bucket:
        buckets = (entry.recent, entry.pending)
        return window_total(buckets, self._clock(), self.window_s, latencies=latencies)

    def intervals(self, extension_id: str) -> Buckets:
        """Every interval kept for one extension, drained or not (a copy, the caller's)."""
        entry = self._entries.get(extension_id) or _NO_CALLS
        buckets: Buckets = {}
        merge_into(buckets, entry.recent)
        merge_into(buckets, entry.pending)
        return buckets

    def status(self, extension_id: str) -> str:
        """healthy / degraded / unhealthy / unknown, judged by the recent window."""
        return status_of(
            self._circuit_state(extension_id), self.recent(extension_id, latencies=False)
        )

    def get_health_summary(
        self, extensions: Iterable[ExtensionLike] | None = None
    ) -> dict[str, Any]:
        """`summarize` over `extensions` (default: every extension seen here, counted as
        enabled), with this monitor's circuit states and recent calls."""
        if extensions is None:
            items = [(extension_id, True) for extension_id in self._entries]
        else:
            items = [(ext.id, ext.enabled) for ext in extensions]
        return summarize(self._tally(extension_id, enabled) for extension_id, enabled in items)

    def _tally(self, extension_id: str, enabled: bool) -> Tally:
        recent = self.recent(extension_id, latencies=False)
        return Tally(enabled, status_of(self._circuit_state(extension_id), recent), recent)

    # -- persistence and other nodes ---------------------------------------------------------

    def take_delta(self, extension_id: str) -> HealthDelta | None:
        """Hand over what was recorded (or restored) since the last drain; None if nothing."""
        entry = self._entries.get(extension_id)
        if entry is None:
            return None
        pending = None
        if entry.pending:
            buckets = entry.close()
            total = Bucket()
            for bucket in buckets.values():
                total.absorb(bucket)
            pending = HealthDelta(
                extension_id=extension_id,
                success_count=total.successes,
                failure_count=total.failures,
                latency_sum_ms=total.latency_sum_ms,
                sketch=total.sketch,
                last_latency_ms=entry.last_latency,
                last_success=_datetime(entry.last_success) if total.successes else None,
                last_failure=_datetime(entry.last_failure) if total.failures else None,
                intervals=buckets,
            )
            self._add_to_base(entry, pending)
        prune(entry.recent, window_start(self._clock(), self.keep_s))
        carried, entry.carried = entry.carried, None
        if carried is None:
            return pending
        return carried if pending is None else carried.merge(pending)

    def drain_deltas(self) -> list[HealthDelta]:
        """`take_delta` of every extension that has something to hand over."""
        deltas = (self.take_delta(extension_id) for extension_id in list(self._entries))
        return [delta for delta in deltas if delta is not None]

    def drain_transitions(self) -> list[Transition]:
        """The circuit transitions since the last call, oldest first, for the writer."""
        transitions, self._unfiled = self._unfiled, []
        return transitions

    def restore(self, delta: HealthDelta) -> None:
        """Put back a delta from `take_delta` that could not be written; the next drain has it.

        The numbers shown do not change: the delta was counted when it was recorded.
        """
        entry = self._entry(delta.extension_id)
        entry.carried = delta if entry.carried is None else entry.carried.merge(delta)

    def merge(self, delta: HealthDelta) -> None:
        """Add calls recorded elsewhere (another node, or totals read from the database) to the
        numbers shown here. They are not handed over again by `drain_deltas`."""
        entry = self._entry(delta.extension_id)
        self._add_to_base(entry, delta)
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
        self.forget_totals(extension_id)
        self._versions.pop(extension_id, None)

    def forget_version(self, extension_id: str, version: str) -> None:
        """Drop one version's numbers (it was removed from its record)."""
        by_version = self._versions.get(extension_id)
        if by_version is not None:
            by_version.pop(version, None)

    def forget_totals(self, extension_id: str) -> None:
        """Drop an extension's totals, to be replaced (`health_store.adopt_totals`); its
        versions breakdown, this node's own, stays."""
        self._entries.pop(extension_id, None)

    def _entry(self, extension_id: str) -> _Entry:
        entry = self._entries.get(extension_id)
        if entry is None:
            entry = self._entries[extension_id] = _Entry()
        return entry

    @staticmethod
    def _add_to_base(entry: _Entry, delta: HealthDelta) -> None:
        entry.base_successes += delta.success_count
        entry.base_failures += delta.failure_count
        entry.base_latency_sum += delta.latency_sum_ms
        entry.base_sketch.merge(delta.sketch)
        merge_into(entry.recent, delta.intervals)


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
        bins = [float(count) for count in data["bins"]]
        if any(bins):  # the store as DenseStore.copy leaves it: exactly the bins given
            store = cast(DenseStore, sketch._store)
            store.bins, store.offset, store.count = bins, offset, math.fsum(bins)
            store.min_key, store.max_key = offset, offset + len(bins) - 1
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
