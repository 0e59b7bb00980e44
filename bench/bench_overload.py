"""Overload: an extension that slows down past 16 calls at once, 256 callers, with and without
the adaptive concurrency limit; and what the bulkhead and the limit cost per call.

Run: `scripts/bench bench_overload [--seconds S] [--quick]`

Everything is started here and thrown away: a private NATS server and, in its own process,
`knee`, an extension that answers after BASE_MS while it holds at most KNEE calls and after
BASE_MS x held / KNEE beyond (calls queue inside it, as in a service with KNEE workers). One
invoker per row, each on its own connection with extreg's options, over the same fixtures:

- unloaded:           one call at a time (the latency `knee` gives when not overloaded);
- 256 callers, no limit:  every call admitted; the extension's queue grows;
- 256 callers, adaptive:  `adaptive_concurrency_enabled`; a refused caller (`Overloaded`)
                          waits REFUSED_PAUSE_MS and tries again. Measured after a warm-up
                          of WARMUP_S (the limit's first probe and climb).

Each row: admitted calls per second, p50/p99 of admitted calls, p99 ÷ the unloaded p99
(target <= 2 with the adaptive limit), refusals and their p99 (target < 1 ms). Then, without
the network, the cost of `Bulkhead.acquire` + `release` per call (fixed, and adaptive with the
system clock) against the same loop without them (target < 200 ns together).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchlib import pct, print_rows

from extreg import Invoker, Overloaded, Registry, Settings, logs
from extreg.core.concurrency import AdaptiveLimit, Bulkhead
from extreg.local.natsserver import NatsServer

SUBJECT = "bench.ext.pre.knee.v1"
KNEE = 16
BASE_MS = 2.0
CALLERS = 256
REFUSED_PAUSE_MS = 10.0
WARMUP_S = 5.0
TARGET_P99_RATIO = 2.0
TARGET_REFUSAL_MS = 1.0
TARGET_HOT_PATH_NS = 200.0
KNEE_CODE = f"""
import asyncio, nats
async def main(url):
    nc = await nats.connect(url)
    held = 0
    async def answer(msg):
        nonlocal held
        held += 1
        try:
            await asyncio.sleep({BASE_MS} / 1000 * max(1.0, held / {KNEE}))
            await msg.respond(msg.data)
        finally:
            held -= 1
    async def handle(msg):
        asyncio.create_task(answer(msg))
    await nc.subscribe({SUBJECT!r}, cb=handle)
    await nc.flush()
    await asyncio.Event().wait()
import sys
asyncio.run(main(sys.argv[1]))
"""


async def measured(inv: Invoker, seconds: float, callers: int) -> tuple[list[float], list[float]]:
    """(admitted calls' latencies, refusals' latencies), in ms, of `callers` looping for
    `seconds`."""
    admitted: list[float] = []
    refused: list[float] = []
    deadline = time.perf_counter() + seconds

    async def caller() -> None:
        clock = time.perf_counter
        while clock() < deadline:
            started = clock()
            try:
                await inv.invoke("knee", {"payload": 1})
            except Overloaded:
                refused.append((clock() - started) * 1000)
                await asyncio.sleep(REFUSED_PAUSE_MS / 1000)
                continue
            admitted.append((clock() - started) * 1000)

    await asyncio.gather(*(caller() for _ in range(callers)))
    return admitted, refused


async def run(seconds: float) -> None:
    rows: list[tuple[str, ...]] = []
    with NatsServer() as nats_server, tempfile.TemporaryDirectory() as tmp:
        knee = subprocess.Popen([sys.executable, "-c", KNEE_CODE, nats_server.url])
        try:
            folder = Path(tmp) / "fixtures"
            folder.mkdir()
            record = {"id": "knee", "type": "pre", "subject": SUBJECT, "timeout_ms": 10_000}
            (folder / "records.json").write_text(json.dumps([record]))
            base: dict[str, Any] = {
                "source": "fixtures", "fixtures_dir": folder, "nats_url": nats_server.url,
                "data_dir": Path(tmp) / "data", "health_flush_interval_seconds": 3600,
            }  # fmt: skip
            unloaded_p99 = 0.0
            for label, callers, adaptive in (
                ("unloaded", 1, False),
                (f"{CALLERS} callers, no limit", CALLERS, False),
                (f"{CALLERS} callers, adaptive", CALLERS, True),
            ):
                settings = Settings.load(environ={}, adaptive_concurrency_enabled=adaptive, **base)
                async with (
                    Registry.open(settings) as registry,
                    Invoker.open(registry, settings) as inv,
                ):
                    await wait_for_knee(inv)
                    if adaptive:
                        await measured(inv, WARMUP_S, callers)
                    admitted, refused = await measured(inv, seconds, callers)
                    limit = inv._bulkheads["knee"].limit if adaptive else None
                p99 = pct(admitted, 0.99)
                if callers == 1:
                    unloaded_p99 = p99
                ratio = p99 / unloaded_p99
                verdict = ""
                if adaptive:
                    verdict = " ok" if ratio <= TARGET_P99_RATIO else " ABOVE TARGET"
                refusal_p99 = pct(refused, 0.99) if refused else None
                rows.append(
                    (
                        label,
                        f"{len(admitted) / seconds:,.0f}",
                        f"{pct(admitted, 0.5):.2f}",
                        f"{p99:.2f}",
                        f"{ratio:.2f}{verdict}",
                        f"{len(refused):,}",
                        ""
                        if refusal_p99 is None
                        else f"{refusal_p99 * 1000:,.0f} µs"
                        + (" ok" if refusal_p99 < TARGET_REFUSAL_MS else " ABOVE TARGET"),
                        "" if limit is None else str(limit),
                    )
                )
        finally:
            knee.terminate()
            knee.wait()
    print(f"\n`knee`: {BASE_MS} ms up to {KNEE} calls at once, x held/{KNEE} beyond; {seconds:g} s")
    print(f"per row; a refused caller waits {REFUSED_PAUSE_MS} ms; adaptive measured after a "
          f"{WARMUP_S:g} s warm-up.\n")  # fmt: skip
    header = ("row", "admitted/s", "p50 ms", "p99 ms", "p99 ÷ unloaded (<= 2)",
              "refused", "refusal p99 (< 1 ms)", "limit at end")  # fmt: skip
    print_rows(header, rows)
    hot_path()


async def wait_for_knee(inv: Invoker) -> None:
    for _ in range(200):
        try:
            await inv.invoke("knee", {"payload": 1})
            return
        except Exception:
            await asyncio.sleep(0.05)
    raise RuntimeError("the knee extension did not answer")


def hot_path(calls: int = 1_000_000, rounds: int = 5) -> None:
    """ns per acquire + release, against the same loop without them; best of rounds."""
    fixed = Bulkhead(1_000_000)
    adaptive = Bulkhead(0, AdaptiveLimit(time.monotonic, initial=1_000_000, probe_limit=10**6))

    def loop(bulkhead: Bulkhead | None) -> float:
        started = time.perf_counter()
        if bulkhead is None:
            for _ in range(calls):
                pass
        else:
            acquire, release = bulkhead.acquire, bulkhead.release
            for _ in range(calls):
                acquire()
                release(0.001)
        return (time.perf_counter() - started) / calls * 1e9

    best = {"none": [], "fixed": [], "adaptive": []}  # type: dict[str, list[float]]
    for _ in range(rounds):
        best["none"].append(loop(None))
        best["fixed"].append(loop(fixed))
        best["adaptive"].append(loop(adaptive))
    empty = min(best["none"])
    print(f"\nBulkhead acquire + release per call, {calls:,} calls, best of {rounds} rounds, "
          "minus the empty loop:")  # fmt: skip
    for name in ("fixed", "adaptive"):
        cost = min(best[name]) - empty
        verdict = "ok" if cost < TARGET_HOT_PATH_NS else "ABOVE TARGET"
        print(f"  {name:<9} {cost:6.0f} ns (target < {TARGET_HOT_PATH_NS:.0f}: {verdict})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured per row")
    parser.add_argument("--quick", action="store_true", help="3 s per row")
    args = parser.parse_args()
    logs.configure("warning")
    asyncio.run(run(3.0 if args.quick else args.seconds))


if __name__ == "__main__":
    main()
