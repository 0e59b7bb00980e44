"""Calls per fixed interval: what recent health, the charts and health-based routing judge by.

All-time totals hide an outage: an extension that failed every call for the last five minutes
still reads 85 % after a good week. So every call is also counted in the `INTERVAL_S`-wide
interval it finished in, as a `Bucket` (counts, latency sum and a DDSketch). Buckets of one
extension from several nodes, flushes or restarts merge exactly (counts add, sketches merge), so
"the last `health_window_seconds`" and a chart's points are the same numbers on every node.

`Buckets` maps an interval's start (epoch seconds, a multiple of `INTERVAL_S`) to its bucket.
Pure and I/O-free.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from ddsketch import DDSketch

__all__ = [
    "INTERVAL_S",
    "MAX_POINTS",
    "SERIES_KEEP_S",
    "Bucket",
    "Buckets",
    "interval_start",
    "merge_into",
    "prune",
    "series",
    "step_for",
    "window_start",
    "window_total",
]

INTERVAL_S = 10  # fine enough to show a 70 s circuit cycle, coarse enough to store 6 hours
SERIES_KEEP_S = 6 * 3600  # the dashboard's longest range; older buckets are pruned
MAX_POINTS = 360  # a chart's points at most: longer ranges use wider steps
RELATIVE_ACCURACY = 0.01  # the sketches' (same as core.health's, which imports it from here)
QUANTILES = (("p50_latency_ms", 0.50), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99))


class Bucket:
    """One extension's calls in one interval (or summed over several)."""

    __slots__ = ("failures", "latency_sum_ms", "sketch", "successes")

    def __init__(
        self,
        successes: int = 0,
        failures: int = 0,
        latency_sum_ms: float = 0.0,
        sketch: DDSketch | None = None,
    ) -> None:
        self.successes = successes
        self.failures = failures
        self.latency_sum_ms = latency_sum_ms
        self.sketch = sketch if sketch is not None else DDSketch(RELATIVE_ACCURACY)

    @property
    def calls(self) -> int:
        return self.successes + self.failures

    def add(self, ok: bool, latency_ms: float) -> None:
        """Count one call (`latency_ms` already clamped at 0 by the caller)."""
        if ok:
            self.successes += 1
        else:
            self.failures += 1
        self.latency_sum_ms += latency_ms
        self.sketch.add(latency_ms)

    def absorb(self, other: Bucket) -> None:
        """Add `other`'s calls to this bucket (`other` unchanged)."""
        self.successes += other.successes
        self.failures += other.failures
        self.latency_sum_ms += other.latency_sum_ms
        self.sketch.merge(other.sketch)

    def copy(self) -> Bucket:
        bucket = Bucket()
        bucket.absorb(self)
        return bucket

    def quantile(self, q: float) -> float:
        """The latency at quantile `q` within the sketch's accuracy; 0 with no call."""
        return self.sketch.get_quantile_value(q) or 0.0

    def latencies(self) -> dict[str, float | None]:
        """p50/p95/p99 rounded as the contract shows them; None with no call (no latency)."""
        if not self.calls:
            return {key: None for key, _ in QUANTILES}
        return {key: round(self.quantile(q), 2) for key, q in QUANTILES}

    def __repr__(self) -> str:
        return f"Bucket(successes={self.successes}, failures={self.failures})"


Buckets = dict[int, Bucket]


def interval_start(epoch: float) -> int:
    """The start of the interval `epoch` falls in."""
    return int(epoch // INTERVAL_S) * INTERVAL_S


def window_start(now: float, window_s: float) -> int:
    """The first interval of the last `window_s` seconds: the one the window's start falls
    in, so the window always holds whole intervals (however short it is)."""
    return interval_start(now - window_s)


def merge_into(target: Buckets, source: Mapping[int, Bucket]) -> None:
    """Add `source`'s buckets to `target`'s, copying, so the two never share a bucket."""
    for start, bucket in source.items():
        mine = target.get(start)
        if mine is None:
            target[start] = bucket.copy()
        else:
            mine.absorb(bucket)


def window_total(
    buckets: Iterable[Mapping[int, Bucket]], now: float, window_s: float, *, latencies: bool = True
) -> Bucket:
    """Every call of the last `window_s` seconds before `now` (from `window_start`), from
    each of `buckets` summed. Without `latencies` the sketches are left out (the counts cost
    far less)."""
    since = window_start(now, window_s)
    total = Bucket()
    for each in buckets:
        for start, bucket in each.items():
            if start >= since:
                if latencies:
                    total.absorb(bucket)
                else:
                    total.successes += bucket.successes
                    total.failures += bucket.failures
                    total.latency_sum_ms += bucket.latency_sum_ms
    return total


def prune(buckets: Buckets, before: float) -> None:
    """Drop the buckets of intervals that start before `before`."""
    for start in [start for start in buckets if start < before]:
        del buckets[start]


def step_for(minutes: int) -> int:
    """A chart's step for a range: `INTERVAL_S`, or a multiple of it keeping at most
    `MAX_POINTS` points (merging whole intervals keeps the numbers exact)."""
    intervals = math.ceil(minutes * 60 / INTERVAL_S)
    return INTERVAL_S * max(1, math.ceil(intervals / MAX_POINTS))


def series(buckets: Mapping[int, Bucket], now: float, minutes: int) -> list[dict[str, Any]]:
    """The points of the last `minutes` up to `now`, oldest first, one per step (`step_for`),
    every step present: `{"t": start (epoch seconds), "calls", "failures", p50/p95/p99}` with
    latencies None where a step has no call."""
    step = step_for(minutes)
    last = int(now // step) * step
    first = last - (math.ceil(minutes * 60 / step) - 1) * step
    points = {t: Bucket() for t in range(first, last + 1, step)}
    for start, bucket in buckets.items():
        t = int(start // step) * step
        if t in points:
            points[t].absorb(bucket)
    return [
        {"t": t, "calls": b.calls, "failures": b.failures, **b.latencies()}
        for t, b in points.items()
    ]
