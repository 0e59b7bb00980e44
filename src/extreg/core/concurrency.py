"""Overload protection of one node: a bulkhead per extension, its limit fixed or adaptive.

Why here, not a library: the limit is checked on every call, on the event loop, so it must be
a counter and a comparison (no lock, no task, no semaphore queue: a bulkhead refuses, it never
queues), and the adaptive limit must be steerable by a test's clock and samples. Pure: no I/O;
time comes from the clock the caller passes.

- `Bulkhead`: calls in flight to one extension. `acquire()` is False at the limit; the
  invoker then refuses the call with `Overloaded` at once. `release(rtt_s)` ends a call and
  feeds its round trip to the adaptive limit, when there is one.
- `AdaptiveLimit`: the limit follows measured latency, on the model of Envoy's adaptive
  concurrency filter (and Netflix's concurrency-limits Gradient). Round trips are averaged per
  window (`window_s`, at least `min_samples`); each window compares the average with the
  baseline, the latency of the extension when hardly loaded, and sets

      gradient = clamp(tolerance * baseline / average, 0.5, 1)
      limit    = limit * gradient + sqrt(limit)         (the square root: room to probe)

  smoothed, kept within [min_limit, max_limit]. While calls queue up inside the extension its
  latency grows, the gradient falls below 1 and the limit shrinks until the latency is back
  within about `tolerance` of the baseline; with room to spare the limit grows by about its
  square root per window. A window in which fewer than half the limit were ever in flight does
  not grow the limit (the caller, not the extension, was the bottleneck).

  The baseline is measured, as Envoy does, in a probe window: the first window, then one every
  `probe_every_s`, runs with the limit held at `probe_limit` and its average becomes the
  baseline (a lower window average lowers it in between). A baseline taken under load would
  accept that load's latency as normal and let the limit climb without end; the probe costs a
  window of refusals beyond `probe_limit` every `probe_every_s`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

INITIAL_LIMIT = 20
MIN_LIMIT = 1
MAX_LIMIT = 1000
TOLERANCE = 1.0  # the latency the limit aims at, as a multiple of the baseline
SMOOTHING = 0.2  # the share of each window's new limit taken
WINDOW_S = 0.1
MIN_SAMPLES = 10
PROBE_LIMIT = 3  # calls let in while the baseline is measured
PROBE_EVERY_S = 30.0


class Bulkhead:
    """Calls in flight to one extension, at most `limit` (the adaptive limit's, when given)."""

    __slots__ = ("adaptive", "in_flight", "limit")

    def __init__(self, limit: int, adaptive: AdaptiveLimit | None = None) -> None:
        self.limit = adaptive.limit if adaptive is not None else limit
        self.in_flight = 0
        self.adaptive = adaptive

    def acquire(self) -> bool:
        """Count a call in, or False when `limit` are in flight already (refuse it)."""
        if self.in_flight >= self.limit:
            return False
        self.in_flight += 1
        return True

    def release(self, rtt_s: float | None) -> None:
        """Count a call out; `rtt_s` is its round trip, None when it did not go out or failed
        fast (only answered and timed-out calls measure the extension's latency: a fast error,
        "no responders" say, would pull the baseline down)."""
        self.in_flight -= 1
        adaptive = self.adaptive
        if adaptive is not None and rtt_s is not None:
            adaptive.sample(rtt_s, self.in_flight + 1)
            self.limit = adaptive.limit


@dataclass(slots=True)
class AdaptiveLimit:
    """A concurrency limit that follows latency (see the module docstring). `limit` is what
    the bulkhead enforces now (`probe_limit` during a probe window)."""

    clock: Callable[[], float]
    initial: int = INITIAL_LIMIT
    min_limit: int = MIN_LIMIT
    max_limit: int = MAX_LIMIT
    tolerance: float = TOLERANCE
    window_s: float = WINDOW_S
    min_samples: int = MIN_SAMPLES
    probe_limit: int = PROBE_LIMIT
    probe_every_s: float = PROBE_EVERY_S
    baseline: float | None = None
    limit: int = 0
    _estimate: float = 0.0  # the limit outside probes, before rounding: small steps add up
    _probing: bool = True
    _next_probe: float = 0.0
    _window_start: float | None = None
    _total: float = 0.0
    _count: int = 0
    _countdown: int = 0  # samples until the clock is read again
    _peak: int = 0  # most calls in flight seen in the window (every min_samples samples)

    def __post_init__(self) -> None:
        self._estimate = float(min(self.initial, self.max_limit))
        self.limit = min(self.probe_limit, self.max_limit)
        self._countdown = self.min_samples

    def cap(self, max_limit: int) -> None:
        """A new maximum (the extension's fixed limit changed), in force at once."""
        self.max_limit = max_limit
        self._estimate = min(self._estimate, float(max_limit))
        self.limit = min(self.limit, max_limit)

    def sample(self, rtt_s: float, in_flight: int) -> None:
        """One finished call's round trip, with the calls in flight when it ended (itself
        included). Runs per call, so only the sum is kept per sample; the clock, the count
        and the peak load are looked at every `min_samples` samples."""
        if self._probing and in_flight > self.probe_limit:
            return  # let in before the probe began: it measured the old load, not the baseline
        self._total += rtt_s
        self._countdown -= 1
        if self._countdown:
            return
        self._countdown = self.min_samples
        self._count += self.min_samples
        if in_flight > self._peak:
            self._peak = in_flight
        now = self.clock()
        if self._window_start is None:
            self._window_start = now
        elif now - self._window_start >= self.window_s:
            self._close_window(self._total / self._count, now)
            self._window_start, self._total, self._count, self._peak = now, 0.0, 0, 0

    def _close_window(self, average: float, now: float) -> None:
        if self._probing:
            self.baseline, self._probing = average, False
            self._next_probe = now + self.probe_every_s
        else:
            self._adapt(average)
            if now >= self._next_probe:
                self._probing = True
                self.limit = min(self.probe_limit, self.max_limit)
                return
        self.limit = int(self._estimate)

    def _adapt(self, average: float) -> None:
        baseline = self.baseline
        assert baseline is not None  # the first window is a probe
        if average < baseline:
            baseline = self.baseline = average
        gradient = min(1.0, max(0.5, self.tolerance * baseline / average)) if average > 0 else 1.0
        estimate = self._estimate
        target = estimate * gradient + math.sqrt(estimate)
        if target > estimate and self._peak * 2 < estimate:
            return  # app-limited: too few calls to tell whether more would do
        estimate += (target - estimate) * SMOOTHING
        self._estimate = min(float(self.max_limit), max(float(self.min_limit), estimate))
