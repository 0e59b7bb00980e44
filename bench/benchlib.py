"""What the benchmarks share, so that their figures are measured and printed the same way.

Imported as `benchlib`: each benchmark runs as `bench/NAME.py` (scripts/bench), which puts
this folder first on sys.path, and so do the processes a benchmark starts from its own file.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence

from nats.aio.client import Client

from extreg import Registry, Settings, logs
from extreg.adapters.nats import NatsTransport
from extreg.invoke import Invoker

Call = Callable[[], Awaitable[object]]
Measured = tuple[float, list[float]]  # what measure() gives: calls per second, latencies in µs
Medians = dict[str, dict[str, Measured]]  # {mode: {client: its median round}}


@contextlib.asynccontextmanager
async def started_invoker(
    settings: Settings,
) -> AsyncIterator[tuple[Invoker, NatsTransport, Client]]:
    """A started `Invoker` on a `NatsTransport` of its own, that transport, and the transport's
    nats-py connection: the raw side of a comparison sends on the very connection the invoker
    uses, so that the two differ only by what extreg adds."""
    transport = NatsTransport(settings.nats_url)
    async with Registry.open(settings) as registry:
        inv = Invoker(registry, settings, transport=transport)
        await inv.start()
        try:
            nc = transport._nc
            assert nc is not None
            yield inv, transport, nc
        finally:
            await inv.close()


async def measure(call: Call, calls: int, in_flight: int) -> Measured:
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


async def compare(
    clients: dict[str, Call],
    sizes: list[tuple[str, int, int]],
    rounds: int,
    setup: Mapping[str, Callable[[], None]] | None = None,
) -> Medians:
    """For each (mode, in flight, calls) of `sizes`, `rounds` rounds of every client in turn,
    so that drift affects every client alike; each client's median round by throughput.
    `setup[name]()`, when given, runs before each of that client's rounds (untimed)."""
    medians: Medians = {}
    for label, in_flight, calls in sizes:
        results: dict[str, list[Measured]] = {name: [] for name in clients}
        for _ in range(rounds):
            for name, call in clients.items():
                if setup is not None:
                    setup[name]()
                results[name].append(await measure(call, calls, in_flight))
        medians[label] = {
            name: sorted(r, key=lambda x: x[0])[len(r) // 2] for name, r in results.items()
        }
    return medians


def calls_and_rounds(description: str) -> tuple[int, int, bool]:
    """An invocation bench's command line: `--calls N` (per round, in flight), `--rounds R`,
    `--quick` (4,000 calls, 3 rounds); (calls, rounds, quick). Logs are quietened too."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--calls", type=int, default=10_000, help="concurrent calls per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="4,000 calls, 3 rounds")
    args = parser.parse_args()
    logs.configure("warning")
    return (4_000, 3, True) if args.quick else (args.calls, args.rounds, False)


def cells(rate: float, latencies: list[float]) -> tuple[str, str, str]:
    """A table row's throughput, p50 and p99 latency cells, formatted alike in every bench."""
    return f"{rate:,.0f}", f"{pct(latencies, 0.5):,.0f}", f"{pct(latencies, 0.99):,.0f}"


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def print_rows(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> None:
    """The header and rows in left-aligned columns as wide as their widest cell."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths, strict=True)))


async def commit_times(script: str, *args: str) -> dict[int, float]:
    """Run `script` in a Python process of its own, which prints `index time` per commit
    (time.monotonic(), which processes share on Linux); {index: time} once it ends."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", script, *args, stdout=subprocess.PIPE
    )
    committed: dict[int, float] = {}
    assert proc.stdout is not None
    async for line in proc.stdout:
        index, stamp = line.split()
        committed[int(index)] = float(stamp)
    await proc.wait()
    return committed
