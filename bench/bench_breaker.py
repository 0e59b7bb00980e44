"""Per-call cost of extreg's circuit breaker next to pybreaker, aiobreaker, circuitbreaker and
purgatory, all guarding the same no-op call on a closed circuit.

Run: `scripts/bench bench_breaker [--iterations N] [--repeat R]`
(the libraries come with the `bench` extra).

Each row is the best of R runs of N guarded calls, minus the best of R runs of N bare calls,
divided by N: the nanoseconds the breaker adds to one call. Sync rows guard `noop()`; async rows
guard `await anoop()` inside a coroutine, which is how aiobreaker (`call_async`) and purgatory's
async factory are meant to be used, and how extreg's invoker calls an extension. Each library is
used as its documentation shows: pybreaker `cb.call(f)`, circuitbreaker a decorated function,
aiobreaker `await cb.call_async(f)`, purgatory a decorated function (which looks the breaker up by
name on every call, as its factory does). The ratio column compares each row with extreg's
row of the same style.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import time
import warnings
from collections.abc import Callable, Coroutine
from datetime import timedelta
from typing import Any

import aiobreaker  # type: ignore[import-untyped]  # ships no type information
import circuitbreaker  # type: ignore[import-untyped]  # ships no type information
import purgatory
import pybreaker

from extreg.core.breaker import BreakerConfig, CircuitBreakers
from extreg.core.health import HealthMonitor

EXT = "normalize_text"
TARGET_BREAKER_NS = 300
TARGET_WITH_HEALTH_NS = 1500

Loop = Callable[[int], None]
AsyncLoop = Callable[[int], Coroutine[Any, Any, None]]


def noop() -> None:
    return None


async def anoop() -> None:
    return None


def best_ns(run: Callable[[], None], repeat: int) -> int:
    best = None
    for _ in range(repeat):
        gc.collect()
        start = time.perf_counter_ns()
        run()
        elapsed = time.perf_counter_ns() - start
        best = elapsed if best is None else min(best, elapsed)
    assert best is not None
    return best


# -- sync loops --------------------------------------------------------------------------------


def bare_loop(n: int) -> None:
    for _ in range(n):
        noop()


def extreg_loop(breakers: CircuitBreakers) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            breakers.check_circuit(EXT)
            noop()
            breakers.record_success(EXT)

    return loop


def extreg_health_loop(breakers: CircuitBreakers, health: HealthMonitor) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            breakers.check_circuit(EXT)
            noop()
            breakers.record_success(EXT)
            health.record(EXT, True, 12.5)

    return loop


def health_loop(health: HealthMonitor) -> Loop:
    def loop(n: int) -> None:
        for _ in range(n):
            noop()
            health.record(EXT, True, 12.5)

    return loop


def pybreaker_loop() -> Loop:
    breaker = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)

    def loop(n: int) -> None:
        for _ in range(n):
            breaker.call(noop)

    return loop


def circuitbreaker_loop() -> Loop:
    guarded = circuitbreaker.circuit(failure_threshold=5, recovery_timeout=60)(noop)

    def loop(n: int) -> None:
        for _ in range(n):
            guarded()

    return loop


def aiobreaker_sync_loop() -> Loop:
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))

    def loop(n: int) -> None:
        for _ in range(n):
            breaker.call(noop)

    return loop


def purgatory_sync_loop() -> Loop:
    factory = purgatory.SyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    guarded = factory(EXT)(noop)

    def loop(n: int) -> None:
        for _ in range(n):
            guarded()

    return loop


# -- async loops -------------------------------------------------------------------------------


async def bare_async(n: int) -> None:
    for _ in range(n):
        await anoop()


def extreg_async(breakers: CircuitBreakers) -> AsyncLoop:
    async def loop(n: int) -> None:
        for _ in range(n):
            breakers.check_circuit(EXT)
            await anoop()
            breakers.record_success(EXT)

    return loop


def aiobreaker_async() -> AsyncLoop:
    breaker = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))

    async def loop(n: int) -> None:
        for _ in range(n):
            await breaker.call_async(anoop)

    return loop


def purgatory_async() -> AsyncLoop:
    factory = purgatory.AsyncCircuitBreakerFactory(default_threshold=5, default_ttl=60)
    guarded = factory(EXT)(anoop)

    async def loop(n: int) -> None:
        for _ in range(n):
            await guarded()

    return loop


# -- the run -----------------------------------------------------------------------------------


def added_sync(loop: Loop, iterations: int, repeat: int) -> float:
    loop(1000)  # warm up (and create per-extension state)
    base = best_ns(lambda: bare_loop(iterations), repeat)
    guarded = best_ns(lambda: loop(iterations), repeat)
    return (guarded - base) / iterations


def added_async(loop: AsyncLoop, iterations: int, repeat: int) -> float:
    async def measure() -> float:
        await loop(1000)
        base = best = None
        for _ in range(repeat):
            gc.collect()
            start = time.perf_counter_ns()
            await bare_async(iterations)
            middle = time.perf_counter_ns()
            await loop(iterations)
            end = time.perf_counter_ns()
            base = middle - start if base is None else min(base, middle - start)
            best = end - middle if best is None else min(best, end - middle)
        assert base is not None and best is not None
        return (best - base) / iterations

    return asyncio.run(measure())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=7)
    args = parser.parse_args()
    n, r = args.iterations, args.repeat
    warnings.simplefilter("ignore")  # aiobreaker uses datetime.utcnow

    enabled = BreakerConfig(enabled=True)
    rows: list[tuple[str, str, float, str]] = []  # name, style, ns added, ratio group

    def sync(name: str, loop: Loop, group: str = "sync") -> None:
        rows.append((name, "sync", added_sync(loop, n, r), group))

    def aio(name: str, loop: AsyncLoop) -> None:
        rows.append((name, "async", added_async(loop, n, r), "async"))

    sync("extreg CircuitBreakers", extreg_loop(CircuitBreakers(enabled)))
    sync("extreg, breaker disabled", extreg_loop(CircuitBreakers(BreakerConfig())), "-")
    sync("pybreaker", pybreaker_loop())
    sync("circuitbreaker", circuitbreaker_loop())
    sync("aiobreaker (sync call)", aiobreaker_sync_loop())
    sync("purgatory (sync factory)", purgatory_sync_loop())
    aio("extreg CircuitBreakers", extreg_async(CircuitBreakers(enabled)))
    aio("aiobreaker call_async", aiobreaker_async())
    aio("purgatory (async factory)", purgatory_async())
    health = HealthMonitor()
    sync("extreg HealthMonitor.record alone", health_loop(health), "-")
    breakers = CircuitBreakers(enabled)
    sync("extreg breaker + health", extreg_health_loop(breakers, HealthMonitor(breakers)), "-")

    ours = {style: ns for name, style, ns, _ in rows if name == "extreg CircuitBreakers"}
    print(f"Per-call cost on a closed circuit: {n:,} calls, best of {r}")
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
