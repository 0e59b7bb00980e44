"""The bulkhead and the adaptive concurrency limit (`extreg.core.concurrency`), pure: samples
and a clock given by the test, properties checked by hypothesis."""

from __future__ import annotations

import random
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from extreg.core.concurrency import PROBE_EVERY_S, AdaptiveLimit, Bulkhead

WINDOW = 0.1


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def drive(
    limit: AdaptiveLimit,
    clock: Clock,
    latency: Callable[[int], float],
    windows: int,
    demand: int = 10_000,
    seed: int = 1,
) -> list[int]:
    """`windows` windows of calls, as many in flight as the limit lets in (up to `demand`),
    each taking `latency(in flight)` give or take 10 %; the limit after each window."""
    chance = random.Random(seed)
    seen = []
    for _ in range(windows):
        for _ in range(limit.min_samples):
            in_flight = min(demand, limit.limit)
            limit.sample(latency(in_flight) * chance.uniform(0.9, 1.1), in_flight)
        clock.now += WINDOW
        seen.append(limit.limit)
    return seen


def knee(base: float, at: int) -> Callable[[int], float]:
    """A responder that answers in `base` up to `at` calls at once and slows down in
    proportion beyond (the calls queue inside it)."""
    return lambda n: base if n <= at else base * n / at


@given(
    base=st.floats(1e-4, 0.05),
    at=st.integers(16, 128),
)
def test_the_limit_settles_where_latency_stays_within_twice_the_unloaded(
    base: float, at: int
) -> None:
    """Whatever the responder's speed and knee: after a minute of overload the limit has
    let in at least the knee (no starving) and no more than keeps latency under 2x the
    unloaded latency, probes included."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    seen = drive(limit, clock, knee(base, at), windows=600)
    settled = [n for n in seen[300:] if n != limit.probe_limit]
    assert settled
    assert min(settled) >= at
    assert max(settled) <= 2 * at


def test_a_probe_measures_the_baseline_again() -> None:
    """Every PROBE_EVERY_S the limit drops to the probe limit for a window, and the
    baseline follows an extension that became faster or slower for good."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    drive(limit, clock, knee(0.001, 16), windows=10)
    assert 0.0009 <= (limit.baseline or 0) <= 0.0011
    windows = int(PROBE_EVERY_S / WINDOW) + 20
    seen = drive(limit, clock, knee(0.004, 16), windows=windows)
    assert limit.probe_limit in seen
    assert 0.0036 <= (limit.baseline or 0) <= 0.0044


def test_calls_let_in_before_a_probe_do_not_count_in_it() -> None:
    """Calls still finishing from before the probe (more in flight than the probe lets in)
    measured the old load: the baseline is the probe's own calls'."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    assert limit.probe_limit == limit.limit  # the first window is a probe
    for _ in range(50):
        limit.sample(0.5, 40)  # slow leftovers
    clock.now += WINDOW
    for _ in range(limit.min_samples):
        limit.sample(0.002, 2)
    clock.now += WINDOW
    for _ in range(limit.min_samples):  # the clock is read every min_samples samples
        limit.sample(0.002, 2)
    assert 0.002 == pytest.approx(limit.baseline)


@given(st.lists(st.tuples(st.floats(0, 10), st.integers(1, 2000)), max_size=400))
def test_the_limit_stays_within_its_bounds(samples: list[tuple[float, int]]) -> None:
    """Any sequence of round trips and loads keeps the limit within [min, max] (or at the
    probe limit while probing)."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock, min_limit=2, max_limit=50)
    for rtt, in_flight in samples:
        limit.sample(rtt, in_flight)
        clock.now += 0.013
        assert limit.limit == limit.probe_limit or 2 <= limit.limit <= 50


def test_with_room_to_spare_the_limit_grows_to_the_maximum() -> None:
    """A responder as fast at any load: the limit climbs to max_limit."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock, max_limit=200)
    seen = drive(limit, clock, lambda n: 0.001, windows=250)
    assert 200 == seen[-1]


def test_a_caller_that_sends_little_does_not_grow_the_limit() -> None:
    """Fewer than half the limit in flight: the caller is the bottleneck, nothing is learnt,
    the limit stays."""
    clock = Clock()
    limit = AdaptiveLimit(clock=clock)
    seen = drive(limit, clock, lambda n: 0.001, windows=100, demand=5)
    assert {limit.initial} == set(seen[1:])


@given(st.lists(st.booleans(), max_size=300), st.integers(1, 20))
def test_a_bulkhead_never_lets_in_more_than_its_limit(steps: list[bool], size: int) -> None:
    """Any interleaving of arrivals (True) and completions (False): in flight never exceeds
    the limit, and a refused arrival changes nothing."""
    bulkhead = Bulkhead(size)
    in_flight = 0
    for arrive in steps:
        if arrive:
            admitted = bulkhead.acquire()
            assert admitted == (in_flight < size)
            in_flight += admitted
        elif in_flight:
            bulkhead.release(0.001)
            in_flight -= 1
        assert bulkhead.in_flight == in_flight <= size


def test_an_adaptive_bulkhead_enforces_the_limit_of_the_moment() -> None:
    """With an adaptive limit the bulkhead follows it after every answered call."""
    clock = Clock()
    adaptive = AdaptiveLimit(clock=clock)
    bulkhead = Bulkhead(0, adaptive)
    assert adaptive.probe_limit == bulkhead.limit
    for _ in range(adaptive.min_samples):
        assert bulkhead.acquire()
        bulkhead.release(0.001)
    clock.now += WINDOW
    for _ in range(adaptive.min_samples):  # the clock is read every min_samples samples
        assert bulkhead.acquire()
        bulkhead.release(0.001)
    assert adaptive.initial == bulkhead.limit
