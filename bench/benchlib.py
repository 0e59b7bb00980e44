"""What the benchmarks share, so that their figures are measured and printed the same way.

Imported as `benchlib`: each benchmark runs as `bench/NAME.py` (scripts/bench), which puts
this folder first on sys.path, and so do the processes a benchmark starts from its own file.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence

Call = Callable[[], Awaitable[object]]


async def measure(call: Call, calls: int, in_flight: int) -> tuple[float, list[float]]:
    """(calls per second, each call's latency in µs) for `calls` calls, `in_flight` at a time."""
    latencies: list[float] = []
    per_worker = calls // in_flight

    async def worker() -> None:
        clock = time.perf_counter
        for _ in range(per_worker):
            started = clock()
            await call()
            latencies.append((clock() - started) * 1e6)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(in_flight)))
    return per_worker * in_flight / (time.perf_counter() - started), latencies


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The header and rows in left-aligned columns as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))
