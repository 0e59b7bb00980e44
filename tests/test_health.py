"""Health measurements: counts, percentiles, the contract's shape, deltas and the summary."""

from __future__ import annotations

import json
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extreg.core.breaker import BreakerConfig, CircuitBreakers
from extreg.core.health import (
    RELATIVE_ACCURACY,
    HealthDelta,
    HealthMonitor,
    sketch_from_dict,
    sketch_to_dict,
)

EXT = "normalize_text"
CONTRACT_KEYS = {
    "success_count",
    "failure_count",
    "success_rate",
    "avg_latency_ms",
    "p50_latency_ms",
    "p95_latency_ms",
    "p99_latency_ms",
    "circuit_breaker_state",
    "last_success",
    "last_failure",
}


@dataclass(frozen=True)
class Ext:
    """Just the fields of an extension record that the summary reads."""

    id: str
    enabled: bool = True


class WallClock:
    """An epoch-seconds clock the test moves by hand."""

    def __init__(self, now: float = 1_737_979_200.0) -> None:  # 2025-01-27T12:00:00Z
        self.now = now

    def __call__(self) -> float:
        return self.now


def nearest_rank(values: list[float], q: float) -> float:
    """The value DDSketch approximates at quantile q: rank q * (n - 1), rounded down."""
    return sorted(values)[math.floor(q * (len(values) - 1))]


def test_counts_rate_and_average_are_exact() -> None:
    """After 7 successes and 3 failures with known latencies, the numbers are exact."""
    monitor = HealthMonitor()
    for latency in (10, 20, 30, 40, 50, 60, 70):
        monitor.record(EXT, True, latency)
    for latency in (100, 200, 300):
        monitor.record(EXT, False, latency)
    health = monitor.get_health(EXT)
    assert (7, 3, 0.7, 88.0, 300.0) == (
        health["success_count"],
        health["failure_count"],
        health["success_rate"],
        health["avg_latency_ms"],
        health["last_latency_ms"],
    )


def test_health_has_exactly_the_contract_keys() -> None:
    """get_health answers the contract's health shape plus last_latency_ms, status and recent
    (with its own keys)."""
    monitor = HealthMonitor()
    monitor.record(EXT, True, 5)
    health = monitor.get_health(EXT)
    assert CONTRACT_KEYS | {"last_latency_ms", "status", "recent"} == set(health)
    assert {"calls", "success_rate", "p50_latency_ms", "p95_latency_ms", "p99_latency_ms"} == set(
        health["recent"]
    )


def test_an_extension_without_calls_reads_as_new() -> None:
    """No calls: counts 0, success rate 1.0, latencies 0, no last times, status unknown."""
    expected = {
        "success_count": 0,
        "failure_count": 0,
        "success_rate": 1.0,
        "avg_latency_ms": 0.0,
        "p50_latency_ms": 0.0,
        "p95_latency_ms": 0.0,
        "p99_latency_ms": 0.0,
        "circuit_breaker_state": "closed",
        "last_success": None,
        "last_failure": None,
        "last_latency_ms": None,
        "status": "unknown",
        "recent": {
            "calls": 0,
            "success_rate": 1.0,
            "p50_latency_ms": 0.0,
            "p95_latency_ms": 0.0,
            "p99_latency_ms": 0.0,
        },
    }
    on = CircuitBreakers(BreakerConfig(enabled=True))
    assert expected == HealthMonitor(on).get_health("never_called")


@pytest.mark.parametrize("kind", ["no-breaker", "breaker-off", "blank-off"])
def test_breaker_off_reads_disabled_and_healthy(kind: str) -> None:
    """With the breaker off (the default), or none attached, the circuit reads `disabled`, not
    `closed`; an extension is judged on its recent success rate alone."""
    factories: dict[str, Callable[[], HealthMonitor]] = {
        "no-breaker": HealthMonitor,
        "breaker-off": lambda: HealthMonitor(CircuitBreakers(BreakerConfig())),
        "blank-off": lambda: HealthMonitor.blank(False),
    }
    monitor = factories[kind]()
    monitor.record(EXT, True, 5)
    assert "disabled" == monitor.get_health(EXT)["circuit_breaker_state"]
    assert "disabled" == monitor.get_health("never_called")["circuit_breaker_state"]
    summary = monitor.get_health_summary([Ext(EXT), Ext("never_called")])
    assert ("healthy", 1, 1) == (monitor.status(EXT), summary["healthy"], summary["unknown"])


def test_blank_monitor_follows_the_setting() -> None:
    """`HealthMonitor.blank(enabled)` (no invoker in this process) reads `closed` when the
    breaker is on and `disabled` when it is off."""
    assert ("closed", "disabled") == tuple(
        HealthMonitor.blank(on).get_health(EXT)["circuit_breaker_state"] for on in (True, False)
    )


def test_percentiles_are_within_the_sketch_accuracy() -> None:
    """p50/p95/p99 are within DDSketch's 1% relative accuracy of the true values."""
    rng = random.Random(7)
    values = [rng.lognormvariate(3, 1) for _ in range(5000)]
    monitor = HealthMonitor()
    for value in values:
        monitor.record(EXT, True, value)
    health = monitor.get_health(EXT)
    for key, q in (("p50_latency_ms", 0.5), ("p95_latency_ms", 0.95), ("p99_latency_ms", 0.99)):
        expected = nearest_rank(values, q)
        assert expected == pytest.approx(health[key], rel=RELATIVE_ACCURACY, abs=0.005)


def test_last_times_are_utc_iso_strings() -> None:
    """last_success and last_failure are the times of the latest such calls, ISO 8601 UTC."""
    clock = WallClock()
    monitor = HealthMonitor(clock=clock)
    monitor.record(EXT, False, 1)
    clock.now += 300
    monitor.record(EXT, True, 1)
    health = monitor.get_health(EXT)
    assert ("2025-01-27T12:05:00Z", "2025-01-27T12:00:00Z") == (
        health["last_success"],
        health["last_failure"],
    )


def test_negative_latency_counts_as_zero() -> None:
    """A negative latency (a clock step) is recorded as 0 ms."""
    monitor = HealthMonitor()
    monitor.record(EXT, True, -3)
    assert (0.0, 0.0) == (
        monitor.get_health(EXT)["avg_latency_ms"],
        monitor.get_health(EXT)["last_latency_ms"],
    )


def test_circuit_state_comes_from_the_breaker() -> None:
    """The health shows the breaker's state, given the breaker object or a callable."""
    breakers = CircuitBreakers(BreakerConfig(enabled=True, failure_threshold=1))
    breakers.record_failure(EXT)
    assert "open" == HealthMonitor(breakers).get_health(EXT)["circuit_breaker_state"]
    assert (
        "half_open" == HealthMonitor(lambda _: "half_open").get_health(EXT)["circuit_breaker_state"]
    )


def test_get_all_health_covers_every_recorded_extension() -> None:
    """get_all_health maps each extension with calls to its health."""
    monitor = HealthMonitor()
    monitor.record("a", True, 1)
    monitor.record("b", False, 2)
    assert {"a": 1, "b": 0} == {
        extension_id: health["success_count"]
        for extension_id, health in monitor.get_all_health().items()
    }


def test_summary_numbers() -> None:
    """Summary: totals, enabled, statuses among enabled extensions (by circuit and recent
    success rate), and plain averages of the enabled extensions' recent figures."""
    breakers = CircuitBreakers(BreakerConfig(enabled=True, failure_threshold=1))
    monitor = HealthMonitor(breakers)
    for _ in range(19):
        monitor.record("good", True, 10)
    monitor.record("good", False, 30)  # 0.95, 11 ms: healthy
    for _ in range(9):
        monitor.record("meh", True, 20)
    monitor.record("meh", False, 20)  # 0.9, 20 ms: degraded
    for ok in (True, False):
        monitor.record("flaky", ok, 30)  # 0.5, 30 ms: unhealthy
    monitor.record("broken", True, 50)  # 1.0, 50 ms, but its circuit is open: unhealthy
    breakers.force_open("broken")
    monitor.record("parked", False, 1000)  # disabled: counted in total only
    extensions = [
        Ext("good"),
        Ext("meh"),
        Ext("flaky"),
        Ext("broken"),
        Ext("idle"),
        Ext("parked", enabled=False),
    ]
    expected = {
        "total": 6,
        "enabled": 5,
        "healthy": 1,
        "degraded": 1,
        "unhealthy": 2,
        "unknown": 1,  # idle: no recent call
        "avg_success_rate": 0.8375,  # (0.95 + 0.9 + 0.5 + 1.0) / 4; idle has no calls
        "avg_latency_ms": 27.75,  # (11 + 20 + 30 + 50) / 4
    }
    assert expected == monitor.get_health_summary(extensions)
    assert ["healthy", "degraded", "unhealthy", "unhealthy", "unknown", "unhealthy"] == [
        monitor.status(ext.id) for ext in extensions
    ]


def test_summary_without_extensions_or_calls() -> None:
    """An empty summary reports zeros, a success rate of 1.0 and no latency."""
    expected = {
        "total": 0,
        "enabled": 0,
        "healthy": 0,
        "degraded": 0,
        "unhealthy": 0,
        "unknown": 0,
        "avg_success_rate": 1.0,
        "avg_latency_ms": 0.0,
    }
    assert expected == HealthMonitor().get_health_summary()


def test_take_delta_hands_over_new_calls_once() -> None:
    """A delta holds the calls since the last drain; the shown totals do not change."""
    clock = WallClock()
    monitor = HealthMonitor(clock=clock)
    monitor.record(EXT, True, 10)
    monitor.record(EXT, False, 30)
    before = monitor.get_health(EXT)
    delta = monitor.take_delta(EXT)
    assert delta is not None
    moment = datetime(2025, 1, 27, 12, tzinfo=UTC)
    assert (EXT, 1, 1, 40.0, 30.0, moment, moment, 2) == (
        delta.extension_id,
        delta.success_count,
        delta.failure_count,
        delta.latency_sum_ms,
        delta.last_latency_ms,
        delta.last_success,
        delta.last_failure,
        delta.sketch.count,
    )
    assert before == monitor.get_health(EXT)
    assert None is monitor.take_delta(EXT)
    monitor.record(EXT, True, 5)
    later = monitor.take_delta(EXT)
    assert later is not None
    assert (1, 0, None) == (later.success_count, later.failure_count, later.last_failure)


def test_restored_delta_comes_back_with_the_next_drain() -> None:
    """restore() puts an unwritten delta back; the next drain carries it plus newer calls."""
    monitor = HealthMonitor()
    monitor.record(EXT, True, 10)
    (delta,) = monitor.drain_deltas()
    monitor.restore(delta)
    monitor.record(EXT, False, 20)
    (again,) = monitor.drain_deltas()
    assert (1, 1, 30.0, 2, 20.0) == (
        again.success_count,
        again.failure_count,
        again.latency_sum_ms,
        again.sketch.count,
        again.last_latency_ms,
    )
    assert (1, 1) == (
        monitor.get_health(EXT)["success_count"],
        monitor.get_health(EXT)["failure_count"],
    )
    assert [] == monitor.drain_deltas()


operations = st.lists(
    st.one_of(
        st.tuples(st.just("record"), st.sampled_from(["a", "b"]), st.booleans()),
        st.tuples(st.just("drain"), st.booleans(), st.booleans()),
    ),
    max_size=80,
)


@given(operations)
def test_drain_and_restore_never_lose_or_double_count(ops: list[tuple[object, ...]]) -> None:
    """Whatever mix of calls, written drains and failed (restored) drains: each call is
    written exactly once and the shown totals always match what was recorded."""
    monitor = HealthMonitor()
    recorded = {"a": [0, 0], "b": [0, 0]}
    written = {"a": [0, 0, 0.0], "b": [0, 0, 0.0]}
    latency = 0.0
    for op in ops:
        if op[0] == "record":
            _, extension_id, ok = op
            assert isinstance(extension_id, str)
            latency += 1
            monitor.record(extension_id, bool(ok), latency)
            recorded[extension_id][0 if ok else 1] += 1
        else:
            _, database_up, per_extension = op
            deltas = (
                [d for d in (monitor.take_delta("a"), monitor.take_delta("b")) if d]
                if per_extension
                else monitor.drain_deltas()
            )
            for delta in deltas:
                if database_up:
                    row = written[delta.extension_id]
                    row[0] += delta.success_count
                    row[1] += delta.failure_count
                    row[2] += delta.sketch.count
                else:
                    monitor.restore(delta)
        for extension_id, (successes, failures) in recorded.items():
            health = monitor.get_health(extension_id)
            assert (successes, failures) == (health["success_count"], health["failure_count"])
    for delta in monitor.drain_deltas():
        row = written[delta.extension_id]
        row[0] += delta.success_count
        row[1] += delta.failure_count
        row[2] += delta.sketch.count
    expected = {key: [s, f, float(s + f)] for key, (s, f) in recorded.items()}
    assert expected == written


def test_merge_combines_nodes_exactly() -> None:
    """Deltas from several nodes merge into the same percentiles as one node seeing it all."""
    rng = random.Random(3)
    values = [rng.uniform(1, 500) for _ in range(3000)]
    nodes = [HealthMonitor() for _ in range(3)]
    single = HealthMonitor()
    for index, value in enumerate(values):
        nodes[index % 3].record(EXT, index % 10 != 0, value)
        single.record(EXT, index % 10 != 0, value)
    deltas = [node.take_delta(EXT) for node in nodes]
    assert all(deltas)
    combined = HealthMonitor()
    for delta in deltas:
        assert delta is not None
        combined.merge(delta)
    merged = combined.get_health(EXT)
    expected = single.get_health(EXT)
    for key in ("success_count", "failure_count", "p50_latency_ms", "p95_latency_ms"):
        assert expected[key] == merged[key]
    assert expected["avg_latency_ms"] == pytest.approx(merged["avg_latency_ms"], abs=0.01)
    assert [] == combined.drain_deltas()  # merged numbers are never handed over again


def test_delta_merge_keeps_the_latest_times_and_refuses_other_extensions() -> None:
    """HealthDelta.merge adds counts, keeps the latest times, and needs the same extension."""
    clock = WallClock()
    monitor = HealthMonitor(clock=clock)
    monitor.record(EXT, True, 10)
    first = monitor.take_delta(EXT)
    clock.now += 60
    monitor.record(EXT, False, 99)
    second = monitor.take_delta(EXT)
    assert first is not None and second is not None
    both = second.merge(first)
    assert (1, 1, 99.0, 2) == (
        both.success_count,
        both.failure_count,
        both.last_latency_ms,
        both.sketch.count,
    )
    assert (first.last_success, second.last_failure) == (both.last_success, both.last_failure)
    other = HealthDelta("pii_guard", 0, 0, 0.0, first.sketch)
    with pytest.raises(ValueError, match="pii_guard"):
        first.merge(other)


def test_sketch_survives_a_json_round_trip() -> None:
    """sketch_to_dict/sketch_from_dict keep counts, sum, extremes and quantiles."""
    monitor = HealthMonitor()
    for value in (0.0, 0.5, 3.0, 3.0, 250.0, 10_000.0):
        monitor.record(EXT, True, value)
    delta = monitor.take_delta(EXT)
    assert delta is not None
    copy = sketch_from_dict(json.loads(json.dumps(sketch_to_dict(delta.sketch))))
    assert (delta.sketch.count, delta.sketch.sum) == (copy.count, copy.sum)
    for q in (0.0, 0.2, 0.5, 0.9, 1.0):
        assert delta.sketch.get_quantile_value(q) == copy.get_quantile_value(q)
    with pytest.raises(ValueError):
        sketch_from_dict({"relative_accuracy": 0.01, "offset": 0, "bins": [1.0]})
