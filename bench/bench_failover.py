"""PostgreSQL failover through a multi-host URL (issue 15, item 3): how long writes and the cache
take to follow a promoted standby.

    scripts/bench bench_failover             # 3 runs per outage (0, 5, 35 s), about 5 minutes
    scripts/bench bench_failover --runs 5
    scripts/bench bench_failover --quick     # 1 run per outage (0, 5 s)

Each run builds a primary and a streaming standby (`testsupport.pgha`), seeds a few records
through `PostgresSource` on the URL `postgresql://P,S/db?target_session_attrs=read-write`,
opens a `Registry` on the same URL and writes once so that its pool holds connections to the
primary. Then the primary is stopped (a clean shutdown) and a writer retries one upsert through
the registry's own `PostgresSource` every 50 ms until it succeeds, as a client would. The
standby is promoted after `outage` seconds (0: at once, as a fast failover manager would;
longer: as a slower one would). Printed, from the primary's stop (medians over the runs):
when the promotion had finished, when the first write succeeded, and when the change was in
the registry's cache (brought by its listener or its reload; never by `refresh`, and the sync
interval is far longer than a run).
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from extreg import logs
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import Extension, parse_extension
from extreg.errors import SourceUnavailable
from extreg.registry import Registry
from extreg.settings import Settings
from testsupport.pgha import PostgresPair

IDS = ("alpha", "beta", "gamma")
DEADLINE_S = 120.0


@dataclass(frozen=True)
class Run:
    """Seconds from the primary's stop to each event, and the writes refused meanwhile."""

    promoted: float
    written: float
    cached: float
    refused: int


def ext(ext_id: str, timeout_ms: int = 100) -> Extension:
    data = {"id": ext_id, "type": "pre", "subject": f"bench.{ext_id}.v1", "timeout_ms": timeout_ms}
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)


def settings_for(url: str, data_dir: Path) -> Settings:
    return Settings.load(
        environ={},
        database_url=url,
        source="database",
        data_dir=data_dir,
        sync_interval_seconds=3600,
    )


async def one_run(outage: float, data_dir: Path) -> Run:
    with PostgresPair() as pair:
        migrate(pair.primary.create_database("extreg"))
        settings = settings_for(pair.multi_host_url("extreg"), data_dir)
        async with PostgresSource(settings) as seeder:
            await seeder.import_extensions([ext(i) for i in IDS], "bench:seed")
        async with Registry.open(settings) as registry:
            db = registry.database
            await db.upsert_extension(ext("beta", 150), "bench")  # the pool is in use
            await asyncio.to_thread(pair.wait_replayed)
            stopped = time.monotonic()
            await asyncio.to_thread(pair.stop_primary)
            promoting = asyncio.create_task(asyncio.to_thread(promote_after, pair, outage))
            refused = 0
            while True:
                try:
                    await db.upsert_extension(ext("alpha", 222), "bench")
                    break
                except SourceUnavailable:
                    refused += 1
                    if time.monotonic() - stopped > DEADLINE_S:
                        raise
                    await asyncio.sleep(0.05)
            written = time.monotonic() - stopped
            while registry.lookup("alpha").timeout_ms != 222:
                if time.monotonic() - stopped > DEADLINE_S:
                    raise TimeoutError("the write never reached the cache")
                await asyncio.sleep(0.005)
            cached = time.monotonic() - stopped
            promoted = await promoting - stopped
    return Run(promoted, written, cached, refused)


def promote_after(pair: PostgresPair, outage: float) -> float:
    """Promote the standby `outage` seconds from now; when it was done (monotonic)."""
    time.sleep(outage)
    pair.promote()
    return time.monotonic()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument(
        "--outages", default="0,5,35", help="seconds before the promotion, comma-separated"
    )
    parser.add_argument("--quick", action="store_true", help="1 run per outage, outages 0 and 5 s")
    args = parser.parse_args()
    if args.quick:
        args.runs, args.outages = 1, "0,5"
    logs.configure("error")
    print(
        f"# extreg failover bench - Python {platform.python_version()},"
        f" {platform.machine()}, {platform.platform()}"
    )
    print(
        "\nseconds from the primary's stop (clean shutdown) to: the promotion done, the first"
        " write through PostgresSource that succeeded, the change in the Registry's cache;"
        f" median of {args.runs} runs (min-max)"
    )
    header = f"{'outage s':>8} {'promoted':>16} {'first write':>16} {'in cache':>16} {'refused':>8}"
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for outage in (float(o) for o in args.outages.split(",")):
            runs = [await one_run(outage, Path(tmp) / f"{outage}-{i}") for i in range(args.runs)]

            def cell(values: list[float]) -> str:
                return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"

            print(
                f"{outage:>8g} {cell([r.promoted for r in runs]):>16}"
                f" {cell([r.written for r in runs]):>16} {cell([r.cached for r in runs]):>16}"
                f" {statistics.median(r.refused for r in runs):>8g}"
            )


if __name__ == "__main__":
    asyncio.run(main())
