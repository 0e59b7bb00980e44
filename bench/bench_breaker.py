"""Per-call cost of extreg's circuit breaker next to pybreaker, aiobreaker, circuitbreaker and
purgatory, all guarding the same no-op call on a closed circuit, in one loop shape.

Run: `scripts/bench bench_breaker [--iterations N] [--repeat R] [--quick]`
(the libraries come with the `bench` extra).

Every row calls a guarded function N times from the same loop, `for _ in range(n): f()`
(async rows: `await f()`), and the reference row calls the bare `noop` from that same loop. A
guarded function is each library's decorator on `noop` (pybreaker `@breaker`, circuitbreaker
`@circuit`, aiobreaker `@breaker`, purgatory `@factory(name)`, which looks its breaker up by
name on every call); extreg has no decorator, so its function is what the invoker does:
`check_circuit`, then the call in a `try` that records a failure and re-raises, then
`record_success` with the duration (12.5 ms, as the health row records; slow calls are off by
default). So every side has one wrapper frame and one try around the call. No side gets
a lock from the bench; pybreaker takes its own `threading.RLock` inside `call`, so a row
times an uncontended RLock around the same call alone, to show what that lock costs (extreg
needs none: one event loop).

Statistic: R paired runs, each the bare loop then the guarded loop back to back; a row is the
median over the R pairs of (guarded - bare) / N, the nanoseconds the breaker adds to one call.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import threading
import time
import warnings
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aiobreaker  # type: ignore[import-untyped]  # ships no type information
import circuitbreaker  # type: ignore[import-untyped]  # ships no type information
import purgatory
import pybreaker

from extreg.core.breaker import BreakerConfig, CircuitBreakers
from extreg.core.health import HealthMonitor

EXT = "normalize_text"
TARGET_BREAKER_NS = 300
TARGET_WITH_HEALTH_NS = 1500

Guarded = Callable[[], None]
AsyncGuarded = Callable[[], Awaitable[None]]


def noop() -> None:
    return None


async def anoop() -> None:
    return None


# -- the one loop shape ------------------------------------------------------------------------


def run(f: Guarded, n: int) -> int:
    """Nanoseconds for n calls of f."""
    start = time.perf_counter_ns()
    for _ in range(n):
        f()
    return time.perf_counter_ns() - start


async def run_async(f: AsyncGuarded, n: int) -> int:
    start = time.perf_counter_ns()
    for _ in range(n):
        await f()
    return time.perf_counter_ns() - start


# -- guarded functions, sync -------------------------------------------------------------------


def extreg_guarded(breakers: CircuitBreakers, health: HealthMonitor | None = None) -> Guarded:
    """The invoker's shape around a call: check, call in a try, record the outcome."""

    def guarded() -> None:
        breakers.check_circuit(EXT)
        try:
            noop()
        except Exception:
            breakers.record_failure(EXT)
            if health is not None:
                health.record(EXT, False, 12.5)
            raise
        breakers.record_success(EXT, 0.0125)
        if health is not None:
            health.record(EXT, True, 12.5)

    return guarded


def health_guarded(health: HealthMonitor) -> Guarded:
    def guarded() -> None:
        try:
            noop()
        except Exception:
            health.record(EXT, False, 12.5)
            raise
        health.record(EXT, True, 12.5)

    return guarded


def pybreaker_guarded() -> Guarded:
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    guarded: Guarded = breaker(noop)
    return guarded


def rlock_guarded() -> Guarded:
    """The uncontended `threading.RLock` that pybreaker's `call` takes, alone."""
    lock = threading.RLock()

    def guarded() -> None:
        with lock:
            noop()

    return guarded


def circuitbreaker_guarded() -> Guarded:
    guarded: Guarded = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=60)(noop)
    return guarded


def aiobreaker_guarded() -> Guarded:
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))
    guarded: Guarded = breaker(noop)
    return guarded


def purgatory_guarded() -> Guarded:
    factory = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    guarded: Guarded = factory(EXT)(noop)
    return guarded


# -- guarded functions, async ------------------------------------------------------------------


def extreg_async(breakers: CircuitBreakers) -> AsyncGuarded:
    async def guarded() -> None:
        breakers.check_circuit(EXT)
        try:
            await anoop()
        except Exception:
            breakers.record_failure(EXT)
            raise
        breakers.record_success(EXT, 0.0125)

    return guarded


def aiobreaker_async() -> AsyncGuarded:
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))
    guarded: AsyncGuarded = breaker(anoop)
    return guarded


def purgatory_async() -> AsyncGuarded:
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    guarded: AsyncGuarded = factory(EXT)(anoop)
    return guarded


# -- the run -----------------------------------------------------------------------------------


def added_sync(f: Guarded, n: int, repeat: int) -> float:
    """Median over `repeat` pairs (bare loop, guarded loop) of the ns added per call."""
    run(f, 1000)  # warm up (and create per-extension state)
    diffs = []
    for _ in range(repeat):
        gc.collect()
        bare = run(noop, n)
        diffs.append((run(f, n) - bare) / n)
    return statistics.median(diffs)


def added_async(f: AsyncGuarded, n: int, repeat: int) -> float:
    async def measure() -> float:
        await run_async(f, 1000)
        diffs = []
        for _ in range(repeat):
            gc.collect()
            bare = await run_async(anoop, n)
            diffs.append((await run_async(f, n) - bare) / n)
        return statistics.median(diffs)

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="30,000 calls, 5 pairs")
    args = parser.parse_args()
    n, r = (30_000, 5) if args.quick else (args.iterations, args.repeat)
    warnings.simplefilter("ignore")  # aiobreaker uses datetime.utcnow

    enabled = BreakerConfig(enabled=True)
    rows: list[tuple[str, str, float, str]] = []  # name, style, ns added, ratio group

    def sync(name: str, f: Guarded, group: str = "sync") -> None:
        rows.append((name, "sync", added_sync(f, n, r), group))

    def aio(name: str, f: AsyncGuarded) -> None:
        rows.append((name, "async", added_async(f, n, r), "async"))

    sync("extreg CircuitBreakers", extreg_guarded(CircuitBreakers(enabled)))
    sync("extreg, breaker disabled", extreg_guarded(CircuitBreakers(BreakerConfig())), "-")
    sync("pybreaker", pybreaker_guarded())
    sync("threading.RLock alone (pybreaker's)", rlock_guarded(), "-")
    sync("circuitbreaker", circuitbreaker_guarded())
    sync("aiobreaker (sync)", aiobreaker_guarded())
    sync("purgatory (sync factory)", purgatory_guarded())
    aio("extreg CircuitBreakers", extreg_async(CircuitBreakers(enabled)))
    aio("aiobreaker (async)", aiobreaker_async())
    aio("purgatory (async factory)", purgatory_async())
    sync("extreg HealthMonitor.record alone", health_guarded(HealthMonitor()), "-")
    breakers = CircuitBreakers(enabled)
    sync("extreg breaker + health", extreg_guarded(breakers, HealthMonitor(breakers)), "-")

    ours = {style: ns for name, style, ns, _ in rows if name == "extreg CircuitBreakers"}
    print("Per-call cost on a closed circuit. Both sides of every row: the same loop calling a")
    print("function around noop() (a library's decorator; extreg: check, call in a try that")
    print("records a failure, record success), minus the same loop calling noop() bare;")
    print(f"{n:,} calls per loop, median of {r} paired runs (bare, guarded back to back).")
    print(f"{'breaker':36} {'style':6} {'ns/call added':>14} {'x extreg':>9}")
    print("-" * 68)
    for name, style, ns, group in rows:
        ratio = f"{ns / ours[group]:8.1f}x" if group in ours else f"{'':>9}"
        print(f"{name:36} {style:6} {ns:14.0f} {ratio}")
    print("-" * 68)
    with_health = next(ns for name, _, ns, _ in rows if name == "extreg breaker + health")
    for label, value, target in (
        ("extreg breaker (sync)", ours["sync"], TARGET_BREAKER_NS),
        ("extreg breaker + health", with_health, TARGET_WITH_HEALTH_NS),
    ):
        verdict = "ok" if value < target else "OVER TARGET"
        print(f"{label}: {value:.0f} ns, target < {target} ns: {verdict}")


if __name__ == "__main__":
    main()
