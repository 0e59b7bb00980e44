"""Prometheus metrics of the registry, the health monitor, the breakers and invocations.

Everything lives in a `Metrics` object with its own `CollectorRegistry` (never the global
one, so two registries in one process, or two tests, do not mix their numbers). Three kinds
of sources feed it:

- the registry pushes: `watch_registry` subscribes to `Registry.on_change` (size, enabled
  count) and `Registry.on_sync` (sync duration, sync errors);
- the invoker pushes: `watch_invoker` makes `observe_invocation(extension_id, outcome,
  seconds)` the invoker's `observer` (called after every call), and subscribes
  `circuit_transition` to its breakers' `on_state_change` (failures = times a circuit
  opened, recoveries = times it closed again);
- health and circuit gauges are *pulled* at scrape time from `invoker.health` (whose circuit
  states are its breaker's) by a custom collector, so the hot path does no metric work for
  them. The circuit gauge reads -1 when breakers are off (`circuit_breaker_enabled` false),
  so `extension_circuit_breaker_state > 0` still means "open or half-open" and a dashboard
  can tell "no breaker" from "closed".

No global state: each `Runtime` owns its `Metrics`, the one its /metrics serves.

What a scrape costs grows with the registry (about a quarter of a millisecond per called
extension: docs/performance.md), so /metrics serves `scrape()`: the exposition rendered at
most once per `cache_s` (longer when a render is slow: `Exposition`), in a worker thread,
with every scraper in between given the same bytes. A thread alone is not enough (rendering
holds the GIL, so the event loop still runs slowly while it lasts) and a cache alone still
renders on the loop; together the loop is slowed for one render per interval whatever the
number of scrapers. And the series do not
outlive their extensions: on every registry change the label sets of ids no longer in the
registry are removed from every labelled metric (`registry_changed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .resilience.health import HealthMonitor

if TYPE_CHECKING:
    from .registry import Registry
    from .snapshot import Snapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CIRCUIT_STATE_VALUES = {"disabled": -1, "closed": 0, "open": 1, "half_open": 2}
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                     10.0, 30.0, 60.0)  # fmt: skip - extension timeouts reach 60 s
CACHE_S = 2.0  # a rendered exposition is served this long (Prometheus scrapes every 15 s or so)


class Metrics:
    """Every metric of one extreg process; `scrape()` is the /metrics body (`render()` uncached).

    `cache_s` and `clock` set the exposition cache (tests pass a clock they move by hand).
    """

    def __init__(
        self, *, cache_s: float = CACHE_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.size = Gauge("extension_registry_size", "Extensions in the cache.", registry=r)
        self.enabled = Gauge(
            "extension_registry_enabled_count", "Enabled extensions in the cache.", registry=r
        )
        self.invalid_records = Gauge(
            "extension_registry_invalid_records",
            "Database rows left out of the cache because they break a record rule.", registry=r
        )
        self.sync_duration = Histogram(
            "extension_registry_sync_duration_seconds",
            "Duration of database syncs and full reloads.",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
            registry=r,
        )
        self.sync_errors = Counter(
            "extension_registry_sync_errors_total", "Database syncs that failed.", registry=r
        )
        self.breaker_failures = Counter(
            "extension_circuit_breaker_failures_total",
            "Times a circuit opened because its extension failed (or an operator opened it).",
            ["extension_id"],
            registry=r,
        )
        self.breaker_recoveries = Counter(
            "extension_circuit_breaker_recoveries_total",
            "Times an open or half-open circuit closed again.",
            ["extension_id"],
            registry=r,
        )
        self.invocation_latency = Histogram(
            "extension_invocation_latency_seconds",
            "Duration of extension invocations, by extension and outcome.",
            ["extension_id", "outcome"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._health = _HealthCollector()
        r.register(self._health)
        # The label sets in use, by extension id: the hot path observes through the cached
        # child (cheaper than `labels()`), and a registry change knows what to remove.
        self._latency: dict[str, dict[str, Any]] = {}
        self._breaker_ids: set[str] = set()
        self.exposition = Exposition(self.render, cache_s, clock)

    # -- push: registry -------------------------------------------------------------------

    def watch_registry(self, registry: Registry) -> None:
        """Follow a registry's swaps and syncs, and read its records for the health gauges."""
        self._health.registry = registry
        self.registry_changed(registry.snapshot)
        registry.on_change(self.registry_changed)
        self.invalid_records.set_function(lambda: len(registry.invalid_records))
        registry.on_sync(self.sync_finished)

    def registry_changed(self, snapshot: Snapshot) -> None:
        """New counts, and the series of extensions no longer in the registry removed."""
        self.size.set(len(snapshot.by_id))
        self.enabled.set(len(snapshot.enabled))
        present = snapshot.by_id
        for extension_id in [i for i in self._latency if i not in present]:
            for outcome in self._latency.pop(extension_id):
                self.invocation_latency.remove(extension_id, outcome)
        for extension_id in [i for i in self._breaker_ids if i not in present]:
            self._breaker_ids.discard(extension_id)
            for counter in (self.breaker_failures, self.breaker_recoveries):
                with contextlib.suppress(KeyError):  # one of the two may never have counted
                    counter.remove(extension_id)

    def sync_finished(self, duration_s: float, error: str | None) -> None:
        self.sync_duration.observe(duration_s)
        if error is not None:
            self.sync_errors.inc()

    # -- push: invoker --------------------------------------------------------------------

    def watch_invoker(self, invoker: Any) -> None:
        """Read `invoker.health`/`invoker.breaker` at scrape time; count breaker transitions;
        become the invoker's `observer` of every call when it has none."""
        self._health.invoker = invoker
        if getattr(invoker, "observer", False) is None:
            invoker.observer = self.observe_invocation
        breaker = getattr(invoker, "breaker", None)
        if breaker is not None and hasattr(breaker, "on_state_change"):
            breaker.on_state_change(self.circuit_transition)

    def observe_invocation(self, extension_id: str, outcome: str, seconds: float) -> None:
        """Record one finished invocation (outcome: ok, error, timeout, rejected, ...)."""
        children = self._latency.get(extension_id)
        if children is None:
            children = self._latency[extension_id] = {}
        child = children.get(outcome)
        if child is None:
            child = children[outcome] = self.invocation_latency.labels(extension_id, outcome)
        child.observe(max(seconds, 0.0))

    def circuit_transition(self, extension_id: str, old: str, new: str) -> None:
        """A breaker state change, as `CircuitBreakers.on_state_change` reports it."""
        self._breaker_ids.add(extension_id)
        if new == "open":
            self.breaker_failures.labels(extension_id).inc()
        elif new == "closed" and old in ("open", "half_open"):
            self.breaker_recoveries.labels(extension_id).inc()

    # -- pull -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, rendered now (blocking)."""
        return generate_latest(self.registry)

    async def scrape(self) -> bytes:
        """The exposition for /metrics: rendered at most once per `cache_s`, off the loop."""
        return await self.exposition.get()


class Exposition:
    """A rendered exposition, kept `cache_s` after it was made, or `HOLD_FACTOR` times as long
    as it took to render if that is longer, so rendering never takes more than about a sixth
    of the process's time whatever the registry's size. Scrapers arriving while it is fresh
    get the same bytes; one arriving later renders it again in a worker thread, and scrapers
    arriving meanwhile wait for that render instead of starting their own."""

    HOLD_FACTOR = 5.0

    def __init__(self, render: Callable[[], bytes], cache_s: float,
                 clock: Callable[[], float]) -> None:
        self._render = render
        self.cache_s = cache_s
        self._clock = clock
        self._body = b""
        self._made_at = -math.inf  # clock time when `_body` was finished
        self._hold_s = cache_s
        self._lock = asyncio.Lock()

    def _fresh(self) -> bool:
        return self._clock() - self._made_at < self._hold_s

    async def get(self) -> bytes:
        if self._fresh():
            return self._body
        async with self._lock:
            if not self._fresh():  # else another scraper rendered it while this one waited
                # Timed from the end: a render slower than cache_s still leaves the loop a
                # full interval without one.
                started = self._clock()
                self._body = await asyncio.to_thread(self._render)
                self._made_at = self._clock()
                self._hold_s = max(self.cache_s, self.HOLD_FACTOR * (self._made_at - started))
            return self._body


class _HealthCollector(Collector):
    """Health and circuit gauges per extension, read when Prometheus scrapes (in a worker
    thread: see `Exposition`).

    Extensions come from the registry: every cached one, and no other, so a deleted
    extension's series go with it (without a registry: every extension the monitor has
    numbers for). Without an invoker, every extension reads as new: success rate 1.0,
    latency 0, circuit `closed`, or `disabled` when the registry's settings have breakers off
    (the same rules as `HealthMonitor.blank`).
    """

    def __init__(self) -> None:
        self.registry: Registry | None = None
        self.invoker: Any | None = None

    def collect(self) -> Iterator[Metric]:
        rate = GaugeMetricFamily("extension_health_success_rate",
                                 "Share of successful calls (1.0 with no calls).",
                                 labels=["extension_id"])
        latency = GaugeMetricFamily("extension_health_avg_latency_ms",
                                    "Mean call latency in milliseconds.", labels=["extension_id"])
        state = GaugeMetricFamily("extension_circuit_breaker_state",
                                  "Circuit state: 0 closed, 1 open, 2 half-open, "
                                  "-1 breakers disabled.",
                                  labels=["extension_id"])
        monitor = getattr(self.invoker, "health", None) or self._blank()
        if self.registry is not None:  # an immutable snapshot: safe to read from a thread
            ids = sorted(self.registry.snapshot.by_id)
        else:
            ids = sorted(monitor.get_all_health())
        for extension_id in ids:
            health = monitor.get_health(extension_id)
            circuit = health["circuit_breaker_state"]
            rate.add_metric([extension_id], float(health["success_rate"]))
            latency.add_metric([extension_id], float(health["avg_latency_ms"]))
            state.add_metric([extension_id], CIRCUIT_STATE_VALUES.get(str(circuit), 0))
        yield from (rate, latency, state)

    def _blank(self) -> HealthMonitor:
        settings = getattr(self.registry, "settings", None)
        return HealthMonitor.blank(bool(getattr(settings, "circuit_breaker_enabled", False)))

    def describe(self) -> Iterator[Metric]:  # names only, so registration reads no state
        yield GaugeMetricFamily("extension_health_success_rate", "", labels=["extension_id"])
        yield GaugeMetricFamily("extension_health_avg_latency_ms", "", labels=["extension_id"])
        yield GaugeMetricFamily("extension_circuit_breaker_state", "", labels=["extension_id"])
