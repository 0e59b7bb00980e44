"""Prometheus metrics of the registry, the health monitor, the breakers and invocations.

Everything lives in a `Metrics` object with its own `CollectorRegistry` (never the global
one, so two registries in one process, or two tests, do not mix their numbers). These
sources feed it:

- the registry pushes: `watch_registry` subscribes to `Registry.on_change` (size, enabled
  count), `Registry.on_sync` (sync duration, sync errors, time of the last good sync) and
  `Registry.on_snapshot_file_error` (failed snapshot-file writes); `extension_registry_stale`
  is read from `Registry.status` at scrape time;
- the invoker pushes: `watch_invoker` makes `observe_invocation(extension_id,
  extension_type, version, outcome, seconds)` the invoker's `observer` (called after every
  call, with the version the call was routed to: the record's own `version` when no
  routing rule chose one of its `versions`), and subscribes `circuit_transition` to its
  breakers' `on_state_change` (failures = times a circuit opened, recoveries = times it
  closed again);
- the invoker's pipeline runner pushes: `watch_invoker` also makes
  `observe_policy_run(policy_id, outcome, seconds, steps)` the observer of the invoker's `pipeline`, called once at the end
  of every policy run: `extreg_policy_runs_total{policy_id, outcome}` and
  `extreg_policy_run_duration_seconds{policy_id}`, and per listed step the original router's
  `router_extension_execution_total{extension_id, extension_type, status, policy_id}` and
  `router_extension_execution_latency_ms{extension_id, extension_type, policy_id}` (a skipped
  step is counted, not timed: it ran nothing). A run of an unknown policy id is labelled
  `UNKNOWN_POLICY`, never the id asked for;
- health and circuit gauges are *pulled* at scrape time from `invoker.health` (whose circuit
  states are its breaker's) by `_HealthGauges`, so the hot path does no metric work for
  them. The circuit gauge reads -1 when breakers are off (`circuit_breaker_enabled` false),
  so `extension_circuit_breaker_state > 0` still means "open or half-open" and a dashboard
  can tell "no breaker" from "closed".

No global state: each `Runtime` owns its `Metrics`, the one its /metrics serves.

Names and labels (each definition in `Metrics.__init__` says why its own). Where the original
router measured the same thing, its name and labels are kept, so its dashboards and alerts
keep working: the two `router_extension_execution_*` families of policy steps. Where it had
none, a family is named after what it measures (`extension_*` per extension,
`extension_registry_*` for the cache, `extreg_*` for policy runs) with durations in seconds,
as Prometheus names them. Every label is bounded: its values come from a stored record (an
extension's id, type and versions), a stored policy (its id, its steps' ids and stages) or a
fixed set (outcome, status), so a family has at most a few series per record or policy, and
they go with it (see below). Never from a call: a tenant id (the original's step families had
a `tenant_id` label, dropped here) or a trace id would make a series per tenant or per
message, without limit, that nothing ever removes.

The per-extension families (latency histograms, health and circuit gauges) are nearly all of
the exposition, so they are kept and written here (`_Latency`, `_HealthGauges`) rather than
by prometheus_client's generic renderer, several times slower per line; the rest (registry
size, syncs, breaker counters, policy runs and steps) are prometheus_client metrics. Even so a scrape grows with
the registry (docs/performance.md has the figures), so /metrics serves `scrape()`: the
exposition rendered at most once per `cache_s` (longer when a render is slow:
`Exposition`), in a worker thread, with every scraper in between given the same bytes. A
thread alone is not enough (rendering holds the GIL, so the event loop still runs slowly
while it lasts) and a cache alone still renders on the loop; together the loop is slowed
for one render per interval whatever the number of scrapers. And series do not outlive
what they describe: on every registry change the series of ids no longer in the registry are
removed from every labelled family, and the invocation series of a type or a version an
extension no longer has (`registry_changed`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from bisect import bisect_left
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .core.breaker import split_circuit
from .core.health import HealthMonitor

if TYPE_CHECKING:
    from prometheus_client.metrics import MetricWrapperBase

    from .core.model import Extension
    from .core.outliers import Ejection
    from .core.pipeline import Step
    from .core.snapshot import Snapshot
    from .registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
CIRCUIT_STATE_VALUES = {"disabled": -1, "closed": 0, "open": 1, "half_open": 2}
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)  # fmt: skip - extension timeouts reach 60 s
LATENCY_BUCKETS_MS = tuple(b * 1000.0 for b in LATENCY_BUCKETS_S)
UNKNOWN_POLICY = (
    "_unknown"  # the policy_id label of runs of ids no policy has (no id starts with _)
)
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
            "Database rows left out of the cache because they break a record rule.",
            registry=r,
        )
        self.unusable_policies = Gauge(
            "extension_registry_unusable_policies",
            "Cached policies that reference an extension that is deleted, disabled or retyped.",
            registry=r,
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
        # Freshness, for deploy/ (the dashboard and the stale-registry alerts): the sync
        # counters say a sync failed, not how old the cache is, nor that a process booted from
        # the snapshot file (where no sync has run to fail yet). No labels.
        self.last_sync_success = Gauge(
            "extension_registry_last_sync_success_timestamp_seconds",
            "Unix time of the last database sync or full reload that succeeded (0: none yet).",
            registry=r,
        )
        self.stale = Gauge(
            "extension_registry_stale",
            "1 while the cache is not kept fresh from the database (it is down or was at boot:"
            " the last good data or the snapshot file is served), else 0.",
            registry=r,
        )
        # The last-known-good file is what a restart serves while the database is down; a
        # write that fails is logged once per outage, so a counter lets an alert see it.
        self.snapshot_file_errors = Counter(
            "extension_registry_snapshot_file_write_errors_total",
            "Failed writes of the last-known-good snapshot file.",
            registry=r,
        )
        # Circuits are per extension (whatever its version), so their counters are too.
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
        # Outlier ejection (core/outliers.py): instance ids come from stored records.
        self.instance_ejections = Counter(
            "extension_instance_ejections_total",
            "Times outlier detection took an instance out of an extension's calls.",
            ["extension_id", "instance_id"],
            registry=r,
        )
        self.instance_returns = Counter(
            "extension_instance_returns_total",
            "Times an ejected instance was taken back in when its ejection ended.",
            ["extension_id", "instance_id"],
            registry=r,
        )
        # The original router's two step families, its names and labels as they were but for
        # its `tenant_id` (see the module docstring): ids from the stored policy's steps,
        # `extension_type` the step's stage (pre, validator, provider, post) and `status` one
        # of the pipeline's fixed step statuses.
        self.step_executions = Counter(
            "router_extension_execution_total",
            "Steps of policy runs, by extension, stage, step status and policy.",
            ["extension_id", "extension_type", "status", "policy_id"],
            registry=r,
        )
        self.step_latency = Histogram(
            "router_extension_execution_latency_ms",
            "Duration of the steps of policy runs in milliseconds (skipped steps are not timed).",
            ["extension_id", "extension_type", "policy_id"],
            buckets=LATENCY_BUCKETS_MS,
            registry=r,
        )
        # Whole runs, which the original did not count: by stored policy id (or
        # UNKNOWN_POLICY) and one of the fixed outcomes named in the help text.
        self.policy_runs = Counter(
            "extreg_policy_runs_total",
            "Policy runs by outcome: ok, blocked, step_failed, no_provider, not_found, disabled.",
            ["policy_id", "outcome"],
            registry=r,
        )
        self.policy_duration = Histogram(
            "extreg_policy_run_duration_seconds",
            "Duration of policy runs, whatever their outcome.",
            ["policy_id"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # Label children made once per label set (`labels()` checks and hashes its values on
        # every call); their keys are also what `registry_changed` removes.
        self._run_children: dict[tuple[str, str], tuple[Any, Any]] = {}
        self._step_children: dict[tuple[str, str, str, str], tuple[Any, Any | None]] = {}
        # Every call, in a policy run or not, so not the original's step family (whose
        # policy_id a direct call has none of). Labels: the record's id and type, the version
        # the call was routed to (its own `version` or one of its `versions`: what a canary is
        # judged by) and the outcome (ok, error, timeout, circuit_open). The per-extension
        # families are kept and rendered here, not by prometheus_client: they are nearly all
        # of the exposition, and its generic rendering took seconds per scrape at 10,000
        # extensions (`scripts/bench bench_metrics` renders both). See `_Latency`.
        self.invocation_latency = _Latency(
            "extension_invocation_latency_seconds",
            "Duration of extension invocations, by extension, type, routed version and outcome.",
            LATENCY_BUCKETS_S,
        )
        self._health = _HealthGauges()
        self._breaker_ids: set[str] = set()
        self._ejected_ids: set[tuple[str, str]] = set()  # (extension, instance) ever counted
        self.exposition = Exposition(self.render, cache_s, clock)

    # -- push: registry -------------------------------------------------------------------

    def watch_registry(self, registry: Registry) -> None:
        """Follow a registry's swaps and syncs, and read its records for the health gauges."""
        self._health.registry = registry
        self.registry_changed(registry.snapshot)
        registry.on_change(self.registry_changed)
        self.invalid_records.set_function(lambda: len(registry.invalid_records))
        self.unusable_policies.set_function(lambda: len(registry.snapshot.unusable_policies))
        registry.on_sync(self.sync_finished)
        self.stale.set_function(lambda: float(registry.status.stale))
        registry.on_snapshot_file_error(lambda _error: self.snapshot_file_errors.inc())

    def registry_changed(self, snapshot: Snapshot) -> None:
        """New counts, and the series of what is no longer in the registry removed."""
        self.size.set(len(snapshot.by_id))
        self.enabled.set(len(snapshot.enabled))
        present = snapshot.by_id
        self.invocation_latency.keep_only(present)
        for extension_id in [i for i in self._breaker_ids if i not in present]:
            self._breaker_ids.discard(extension_id)
            for counter in (self.breaker_failures, self.breaker_recoveries):
                with contextlib.suppress(KeyError):  # one of the two may never have counted
                    counter.remove(extension_id)
        for key in [k for k in self._ejected_ids if k[0] not in present]:
            self._ejected_ids.discard(key)
            for counter in (self.instance_ejections, self.instance_returns):
                with contextlib.suppress(KeyError):  # it may not have returned yet
                    counter.remove(*key)
        self._forget_policy_series(snapshot)

    def _forget_policy_series(self, snapshot: Snapshot) -> None:
        """Remove the run series of deleted policies and the step series of deleted policies
        or extensions (`name:model` hook providers are no extension: kept with their policy)."""
        policies = snapshot.policies
        for run in [
            k for k in self._run_children if k[0] not in policies and k[0] != UNKNOWN_POLICY
        ]:
            del self._run_children[run]
            _remove(self.policy_runs, *run)
            _remove(self.policy_duration, run[0])
        present = snapshot.by_id
        for key in [
            k
            for k in self._step_children
            if k[3] not in policies or (k[0] not in present and ":" not in k[0])
        ]:
            extension_id, stage, _, policy_id = key
            del self._step_children[key]
            _remove(self.step_executions, *key)
            _remove(self.step_latency, extension_id, stage, policy_id)

    def sync_finished(self, duration_s: float, error: str | None) -> None:
        self.sync_duration.observe(duration_s)
        if error is not None:
            self.sync_errors.inc()
        else:
            self.last_sync_success.set(time.time())

    # -- push: invoker --------------------------------------------------------------------

    def watch_invoker(self, invoker: Any) -> None:
        """Read `invoker.health`/`invoker.breaker` at scrape time; count breaker transitions;
        become the invoker's `observer` of every call when it has none."""
        self._health.invoker = invoker
        if getattr(invoker, "observer", False) is None:
            invoker.observer = self.observe_invocation
        pipeline = getattr(invoker, "pipeline", None)
        if pipeline is not None and self.observe_policy_run not in pipeline.observers:
            pipeline.observers.append(self.observe_policy_run)
        ejections = getattr(invoker, "ejections", None)
        if ejections is not None and self.instance_ejected not in ejections.observers:
            ejections.observers.append(self.instance_ejected)
        breaker = getattr(invoker, "breaker", None)
        if breaker is not None and hasattr(breaker, "on_state_change"):
            breaker.on_state_change(self.circuit_transition)

    def observe_invocation(
        self, extension_id: str, extension_type: str, version: str, outcome: str, seconds: float
    ) -> None:
        """Record one finished invocation: the invoker's `observer` (see the module docstring)."""
        self.invocation_latency.observe(extension_id, extension_type, version, outcome, seconds)

    def observe_policy_run(
        self, policy_id: str, outcome: str, seconds: float, steps: Sequence[Step]
    ) -> None:
        """Record one finished policy run and its steps (see the module docstring)."""
        label = UNKNOWN_POLICY if outcome == "not_found" else policy_id
        run = self._run_children.get((label, outcome))
        if run is None:
            run = self._run_children[(label, outcome)] = (
                self.policy_runs.labels(label, outcome),
                self.policy_duration.labels(label),
            )
        run[0].inc()
        run[1].observe(seconds)
        children = self._step_children
        for step in steps:
            key = (step.id, step.stage, step.status, policy_id)
            child = children.get(key)
            if child is None:
                child = children[key] = (
                    self.step_executions.labels(*key),
                    None
                    if step.status == "skipped"
                    else self.step_latency.labels(step.id, step.stage, policy_id),
                )
            child[0].inc()
            if child[1] is not None:
                child[1].observe(step.latency_ms)

    def instance_ejected(self, change: Ejection) -> None:
        """An ejection or a return, as the invoker's outlier detection reports it."""
        key = (change.extension_id, change.instance_id)
        self._ejected_ids.add(key)
        counter = self.instance_returns if change.returns_at is None else self.instance_ejections
        counter.labels(*key).inc()

    def circuit_transition(self, key: str, old: str, new: str) -> None:
        """A breaker state change, as `CircuitBreakers.on_state_change` reports it; a
        version's circuit counts under its extension (the label set stays bounded)."""
        extension_id = split_circuit(key)[0]
        self._breaker_ids.add(extension_id)
        if new == "open":
            self.breaker_failures.labels(extension_id).inc()
        elif new == "closed" and old in ("open", "half_open"):
            self.breaker_recoveries.labels(extension_id).inc()

    # -- pull -----------------------------------------------------------------------------

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric, rendered now (blocking)."""
        lines: list[str] = []
        self.invocation_latency.render(lines)
        self._health.render(lines)
        return generate_latest(self.registry) + "".join(lines).encode()

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

    def __init__(
        self, render: Callable[[], bytes], cache_s: float, clock: Callable[[], float]
    ) -> None:
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


class _HealthGauges:
    """Health and circuit gauges per extension, read when Prometheus scrapes (in a worker
    thread: see `Exposition`).

    Extensions come from the registry: every cached one, and no other, so a deleted
    extension's series go with it (without a registry: every extension the monitor has
    numbers for). Without an invoker, every extension reads as new: success rate 1.0,
    latency 0, circuit `closed`, or `disabled` when the registry's settings have breakers off
    (the same rules as `HealthMonitor.blank`).
    """

    FAMILIES = (
        ("extension_health_success_rate", "Share of successful calls (1.0 with no calls)."),
        ("extension_health_avg_latency_ms", "Mean call latency in milliseconds."),
        (
            "extension_circuit_breaker_state",
            "Circuit state: 0 closed, 1 open, 2 half-open, -1 breakers disabled.",
        ),
    )

    def __init__(self) -> None:
        self.registry: Registry | None = None
        self.invoker: Any | None = None

    def render(self, out: list[str]) -> None:
        monitor = getattr(self.invoker, "health", None) or self._blank()
        if self.registry is not None:  # an immutable snapshot: safe to read from a thread
            ids = sorted(self.registry.snapshot.by_id)
        else:
            ids = sorted(monitor.extension_ids())
        rates, latencies, states = [], [], []
        for extension_id in ids:
            counts, circuit = monitor.counts(extension_id)
            labels = f'{{extension_id="{_escape(extension_id)}"}} '
            rates.append(labels + _number(float(counts["success_rate"])))
            latencies.append(labels + _number(float(counts["avg_latency_ms"])))
            state = CIRCUIT_STATE_VALUES.get(circuit, 0)
            states.append(f"{labels}{state}.0")
        for (name, help_text), values in zip(
            self.FAMILIES, (rates, latencies, states), strict=True
        ):
            out.append(f"# HELP {name} {help_text}\n# TYPE {name} gauge\n")
            out.extend(f"{name}{value}\n" for value in values)

    def _blank(self) -> HealthMonitor:
        settings = getattr(self.registry, "settings", None)
        return HealthMonitor.blank(bool(getattr(settings, "circuit_breaker_enabled", False)))


class _Latency:
    """A Prometheus histogram per (extension_id, extension_type, version, outcome), kept and
    rendered here.

    prometheus_client's `Histogram` renders each line generically (label names checked and
    escaped, values formatted, one sample object per line); a series here keeps its label text
    made once and per-bucket counts, so a scrape writes lines with one format each, and an
    observation is a bisect and two additions, cheaper than `labels().observe()`. Reads from
    the render thread copy each series' counts (atomic under the GIL), so a scrape sees every
    series whole. Only the text exposition is produced: no `_created` samples.
    """

    def __init__(self, name: str, documentation: str, bounds: tuple[float, ...]) -> None:
        self.name = name
        self.documentation = documentation
        self.bounds = bounds
        self._le = [_number(b) for b in bounds] + ["+Inf"]
        self.series: dict[tuple[str, str, str, str], _Series] = {}  # by label values

    def observe(
        self, extension_id: str, extension_type: str, version: str, outcome: str, seconds: float
    ) -> None:
        # Every call comes here: one flat dict keyed by the four values (one tuple, one
        # lookup), a comparison rather than max() and bisect_left imported by name.
        key = (extension_id, extension_type, version, outcome)
        series = self.series.get(key)
        if series is None:
            series = self.series[key] = _Series(key, len(self.bounds) + 1)
        if seconds < 0.0:
            seconds = 0.0
        series.counts[bisect_left(self.bounds, seconds)] += 1
        series.total += seconds

    def keep_only(self, records: Mapping[str, Extension]) -> None:
        """Forget every series no record describes any more: of an extension not in `records`,
        or of a type or a version (its own `version` or one of `versions`) its record has not.
        A call that was under way across the change may bring one back; the next change takes
        it away again. Inline, not a helper called per series: it runs over every series on
        every registry change."""
        gone = []
        for key in self.series:
            extension_id, extension_type, version, _ = key
            ext = records.get(extension_id)
            if (
                ext is None
                or ext.type != extension_type
                or (ext.version != version and all(v.version != version for v in ext.versions))
            ):
                gone.append(key)
        for key in gone:
            del self.series[key]

    def render(self, out: list[str]) -> None:
        name = self.name
        out.append(f"# HELP {name} {self.documentation}\n# TYPE {name} histogram\n")
        for series in list(self.series.values()):
            counts, total = series.counts[:], series.total
            labels = series.labels
            cumulative = 0
            for le, count in zip(self._le, counts, strict=True):
                cumulative += count
                out.append(f'{name}_bucket{{{labels},le="{le}"}} {cumulative}.0\n')
            out.append(
                f"{name}_count{{{labels}}} {cumulative}.0\n"
                f"{name}_sum{{{labels}}} {_number(total)}\n"
            )

    def samples(
        self, extension_id: str, extension_type: str, version: str, outcome: str
    ) -> tuple[int, float] | None:
        """(count, sum) of one series, or None (tests and embedders)."""
        series = self.series.get((extension_id, extension_type, version, outcome))
        return (sum(series.counts), series.total) if series is not None else None


class _Series:
    """One histogram series: its label text, made once, and its per-bucket counts."""

    __slots__ = ("counts", "labels", "total")
    LABELS = ("extension_id", "extension_type", "version", "outcome")

    def __init__(self, values: tuple[str, str, str, str], buckets: int) -> None:
        self.labels = ",".join(
            f'{name}="{_escape(value)}"' for name, value in zip(self.LABELS, values, strict=True)
        )
        self.counts = [0] * buckets
        self.total = 0.0


def _remove(metric: MetricWrapperBase, *labels: str) -> None:
    """Drop one labelled series (gone already when another key shared it)."""
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def _number(value: float) -> str:
    """A sample value as the text format writes it (Go's float syntax, as prometheus_client)."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _escape(value: str) -> str:
    """A label value as the text format wants it."""
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')
