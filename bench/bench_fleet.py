"""A fleet of registry nodes on one database: how fast a change reaches all of them, and what
it costs, with the NATS change feed (`change_feed=nats`) against every node LISTENing.

    scripts/bench bench_fleet [--quick]

1. commit -> visible on every node, 100 nodes (20 with --quick): `nats` against `listen`, in
   the same run, from the same writer, with the database connections each fleet holds.
2. how the cost grows with `nats`: propagation and the publisher's CPU at 10, 50, 100 and 200
   nodes (10 and 50 with --quick).

Set-up of every row: a throwaway PostgreSQL (max_connections raised for the LISTEN fleet) and
NATS server; 1,000 extensions. The followers (or, for `listen`, all nodes) are registries in
this process, each with its own connections (`testsupport.fleet`); with `nats` the publisher
is a process of its own, so its CPU time is its own. A writer process UPDATEs one record every
20 ms and prints each commit's time (CLOCK_MONOTONIC, shared by processes); a change counts as
visible when the last node has installed it or a newer one. Note that all followers share
this process's one core: at 200 nodes the figure includes applying the change 200 times in a
row, where a fleet of machines applies it 200 times side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
from benchlib import commit_times, pct, print_rows

from extreg import Settings, logs
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from extreg.core.snapshot import Snapshot
from extreg.local.natsserver import NatsServer
from testsupport.fleet import Fleet
from testsupport.pgprocess import PostgresProcess

RECORDS = 1_000
PROBE = "ext_0000"
GAP_S = 0.02
SUBJECT = "bench.feed"
_databases = itertools.count()

PUBLISHER = textwrap.dedent("""
    import asyncio, sys
    from extreg import Registry, Settings, logs

    async def main():
        logs.configure("warning")
        settings = Settings.load(
            environ={}, source="database", database_url=sys.argv[1], nats_url=sys.argv[2],
            change_feed="nats", change_feed_subject=sys.argv[3], data_dir=sys.argv[4],
            sync_interval_seconds=3600,
        )
        async with Registry.open(settings) as reg:
            while reg.feed_role != "publisher":
                await asyncio.sleep(0.05)
            print("publishing", flush=True)
            await asyncio.Event().wait()

    asyncio.run(main())
""")

WRITER = textwrap.dedent("""
    import sys, time, psycopg
    url, n, gap = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            conn.execute("UPDATE extensions SET timeout_ms = %s WHERE id = %s",
                         (20000 + i, sys.argv[4]))
            print(i, time.monotonic(), flush=True)
            time.sleep(gap)
""")


def settings_for(feed: str, nats_url: str, root: Path) -> Callable[[str, str], Settings]:
    def make(name: str, database_url: str) -> Settings:
        return Settings.load(
            environ={},
            source="database",
            database_url=database_url,
            nats_url=nats_url,
            change_feed=feed,
            change_feed_subject=SUBJECT,
            data_dir=root / name,
            sync_interval_seconds=3600,
        )

    return make


async def seed(url: str) -> None:
    records = [
        parse_extension(
            {
                "id": f"ext_{i:04d}",
                "type": "pre",
                "subject": f"beamline.ext.pre.ext_{i:04d}.v1",
                "timeout_ms": 1000,
                "config": {"mode": "strict", "max_length": 4096},
            },
            max_timeout_ms=60_000,
            max_retries=10,
        )
        for i in range(RECORDS)
    ]

    async with PostgresSource(Settings.load(environ={}, database_url=url)) as db:
        await db.import_extensions(records, "bench")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # clock ticks (USER_HZ = 100 on Linux)


async def propagation(fleet: Fleet, url: str, changes: int) -> list[float]:
    """Seconds from each commit to the moment the last node of `fleet` had it, or a newer
    change (a node that falls behind applies queued changes together, skipping between)."""
    seen: dict[int, list[float]] = {}

    def watcher() -> Callable[[Snapshot], None]:
        last = -1

        def watch(snap: Snapshot) -> None:
            nonlocal last
            ext = snap.by_id.get(PROBE)
            if ext is not None and ext.timeout_ms - 20000 > last:
                now = time.monotonic()
                for index in range(last + 1, ext.timeout_ms - 20000 + 1):
                    seen.setdefault(index, []).append(now)
                last = ext.timeout_ms - 20000

        return watch

    for registry in fleet.registries:
        registry.on_change(watcher())
    committed = await commit_times(WRITER, url, str(changes), str(GAP_S), PROBE)
    size = len(fleet.nodes)
    deadline = time.monotonic() + 30
    while any(len(seen.get(i, ())) < size for i in committed) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return [max(seen[i]) - t for i, t in committed.items() if len(seen.get(i, ())) == size]


async def run_fleet(
    feed: str, size: int, changes: int, pg: PostgresProcess, nats_url: str, root: Path
) -> tuple[list[float], int, float | None, float]:
    """(latencies, database connections held at rest, publisher CPU ms per change, this
    process's CPU µs per change and node) of one fleet of `size` nodes."""
    url = pg.create_database(f"{feed}{size}_{next(_databases)}")
    migrate(url)
    await seed(url)
    publisher = None
    if feed == "nats":
        publisher = subprocess.Popen(
            [sys.executable, "-c", PUBLISHER, url, nats_url, SUBJECT, str(root / "publisher")],
            stdout=subprocess.PIPE,
        )
        assert publisher.stdout is not None
        await asyncio.to_thread(publisher.stdout.readline)
    try:
        followers = size - 1 if publisher else size
        async with Fleet(settings_for(feed, nats_url, root / feed), url, size=followers) as fleet:
            await fleet.wait(lambda r: len(r.all()) == RECORDS)
            before = cpu_seconds(publisher.pid) if publisher else 0.0
            ours = time.process_time()
            latencies = await propagation(fleet, url, changes)
            node_cpu = (time.process_time() - ours) * 1e6 / (changes * followers)
            cpu = (cpu_seconds(publisher.pid) - before) * 1000 / changes if publisher else None
            await asyncio.sleep(1)
            with psycopg.connect(url, autocommit=True) as conn:
                row = conn.execute(
                    "SELECT count(*) FROM pg_stat_activity"
                    " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                ).fetchone()
            held = int(row[0]) if row else 0
    finally:
        if publisher is not None:
            publisher.terminate()
            publisher.wait(10)
    return latencies, held, cpu, node_cpu


def row(
    feed: str, size: int, measured: tuple[list[float], int, float | None, float], changes: int
) -> tuple[str, ...]:
    latencies, held, cpu, node_cpu = measured
    return (
        feed,
        str(size),
        f"{pct(latencies, 0.5) * 1000:.2f} ms",
        f"{pct(latencies, 0.99) * 1000:.2f} ms",
        f"{len(latencies)} of {changes}",
        str(held),
        "-" if cpu is None else f"{cpu:.2f} ms",
        f"{node_cpu:.0f} µs",
    )


def svg_chart(title: str, unit: str, points: list[tuple[int, float]], x: int, width: int) -> str:
    """One line chart (nodes -> value) as SVG elements, placed at `x`."""
    top, height, left = 30, 160, 50
    xmax = max(n for n, _ in points)
    ymax = max(v for _, v in points) * 1.15 or 1.0

    def at(n: int, v: float) -> tuple[float, float]:
        return x + left + (width - left - 20) * n / xmax, top + height * (1 - v / ymax)

    line = " ".join(f"{px:.1f},{py:.1f}" for px, py in (at(n, v) for n, v in points))
    parts = [
        f'<text x="{x + width / 2}" y="18" text-anchor="middle">{title}</text>',
        f'<line x1="{x + left}" y1="{top + height}" x2="{x + width - 10}" y2="{top + height}"'
        ' stroke="#888"/>',
        f'<line x1="{x + left}" y1="{top}" x2="{x + left}" y2="{top + height}" stroke="#888"/>',
        f'<polyline points="{line}" fill="none" stroke="#2563eb" stroke-width="2"/>',
        f'<text x="{x + left - 4}" y="{top + 4}" text-anchor="end">{ymax:.1f}</text>',
        f'<text x="{x + left - 4}" y="{top + height}" text-anchor="end">0</text>',
        f'<text x="{x + width / 2}" y="{top + height + 32}" text-anchor="middle">nodes</text>',
        f'<text x="{x + 12}" y="{top + height / 2}" transform="rotate(-90 {x + 12}'
        f' {top + height / 2})" text-anchor="middle">{unit}</text>',
    ]
    for n, v in points:
        px, py = at(n, v)
        parts.append(f'<circle cx="{px:.1f}" cy="{py:.1f}" r="3" fill="#2563eb"/>')
        parts.append(f'<text x="{px:.1f}" y="{top + height + 16}" text-anchor="middle">{n}</text>')
    return "\n".join(parts)


def write_plot(path: Path, rows: list[tuple[int, float, float]]) -> None:
    """Propagation p99 and publisher CPU per change against the fleet's size."""
    charts = [
        svg_chart("commit -> all nodes, p99", "ms", [(n, p99) for n, p99, _ in rows], 0, 360),
        svg_chart("publisher CPU per change", "ms", [(n, cpu) for n, _, cpu in rows], 380, 360),
    ]
    path.write_text(
        '<svg xmlns="http://www.w3.org/2000/svg" width="740" height="240"'
        ' font-family="sans-serif" font-size="12">\n'
        '<rect width="740" height="240" fill="white"/>\n' + "\n".join(charts) + "\n</svg>\n"
    )


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--plot", type=Path, help="write section 2 as an SVG chart here")
    args = parser.parse_args()
    logs.configure("error")
    changes = 50 if args.quick else 200
    compared = 20 if args.quick else 100
    sizes = (10, 50) if args.quick else (10, 50, 100, 200)
    header = (
        "feed",
        "nodes",
        "p50",
        "p99",
        "seen",
        "db connections",
        "publisher CPU per change",
        "CPU here per change and node",
    )
    with PostgresProcess() as pg, NatsServer() as nats_server, tempfile.TemporaryDirectory() as tmp:
        with psycopg.connect(pg.url(), autocommit=True) as conn:
            conn.execute("ALTER SYSTEM SET max_connections = 400")
        pg.restart()
        root = Path(tmp)
        print(
            f"# fleet benchmark: {RECORDS} extensions, {changes} changes, one every {GAP_S * 1000:.0f} ms"
        )
        print(f"\n## 1. commit -> visible on all {compared} nodes, nats against listen")
        rows = []
        for feed in ("nats", "listen"):
            measured = await run_fleet(feed, compared, changes, pg, nats_server.url, root)
            rows.append(row(feed, compared, measured, changes))
        print_rows(header, rows)
        print("\n## 2. how it grows with nats")
        rows, plotted = [], []
        for size in sizes:
            measured = await run_fleet("nats", size, changes, pg, nats_server.url, root)
            rows.append(row("nats", size, measured, changes))
            plotted.append((size, pct(measured[0], 0.99) * 1000, measured[2] or 0.0))
        print_rows(header, rows)
        if args.plot:
            write_plot(args.plot, plotted)
            print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    asyncio.run(main())
