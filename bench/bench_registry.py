"""Registry benchmarks, each measured side by side with its reference in one run.

    scripts/bench bench_registry            # everything, a couple of minutes
    scripts/bench bench_registry --quick    # fewer repetitions

Every comparison runs both sides in this process, alternating, and reports medians.

1. lookup vs a bare dict.get on the same data, at 10, 1,000 and 100,000 extensions;
   then lookups while a full reload runs every 100 ms in the same process (misses, p99.9).
2. full load of 10,000 extensions from PostgreSQL into a new snapshot, vs a bare psycopg fetch
   of the same rows with jsonb decoded by the standard library, like for like: 1 connection
   each (extreg with LOAD_PARTS=1), 2 connections each (extreg as shipped, bare reading the same
   two hash partitions at once), JIT off on both; then JIT on for each, to show what it costs
   (when the server has JIT at all).
3. change propagation: another process's committed UPDATE to this process's cache, p50/p99
   over 500 changes, vs the raw LISTEN/NOTIFY round trip measured the same way.
4. memory per cached extension (full footprint), vs the same record as a pydantic model.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import textwrap
import threading
import time
import timeit
import tracemalloc
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
import psycopg
from benchlib import commit_times, pct

from extreg import logs
from extreg.adapters.migrate import migrate
from extreg.core.model import Extension
from extreg.core.snapshot import Snapshot
from extreg.registry import Registry
from extreg.settings import Settings
from testsupport.pgprocess import PostgresProcess


def typical(i: int) -> dict[str, Any]:
    """A typical record: short id, versioned subject, a small config and metadata."""
    name = f"ext_{i:06d}"
    return {
        "id": name,
        "type": ("pre", "validator", "post", "provider")[i % 4],
        "subject": f"beamline.ext.pre.{name}.v1",
        "timeout_ms": 100 + i % 900,
        "retry": i % 3,
        "enabled": i % 10 != 0,
        "version": "v1",
        "config": {"lowercase": True, "max_length": 4096, "mode": "strict"},
        "metadata": {"owner": "team-nlp", "description": "Normalizes text before routing"},
    }


def records(n: int) -> list[Extension]:
    return msgspec.convert([typical(i) for i in range(n)], type=list[Extension])


def registry_with(recs: list[Extension]) -> Registry:
    reg = Registry(Settings.load(environ={}, source="fixtures"))
    reg._swap(recs, "fixtures")
    return reg


# -- 1. lookup ---------------------------------------------------------------------------------


def bench_lookup(quick: bool) -> None:
    repeat = 7
    print(
        f"\n## 1. lookup vs bare dict.get: the same 1,000 keys in the same loop"
        f" (`for k in keys: f(k)`), f = dict.get of a dict of the same records or"
        f" Registry.lookup; median of {repeat} alternating runs"
    )
    print(f"{'extensions':>11} {'dict.get ns':>12} {'lookup ns':>10} {'ratio':>6}")
    number = 200_000 if quick else 1_000_000
    for n in (10, 1_000, 100_000):
        recs = records(n)
        reg = registry_with([r for r in recs])
        enabled = [r.id for r in recs if r.enabled]
        plain = {r.id: r for r in recs}
        keys = (enabled * (1000 // len(enabled) + 1))[:1000]
        loop = "for k in keys: f(k)"
        t_dict, t_reg = [], []
        for _ in range(repeat):
            t_dict.append(
                timeit.timeit(loop, globals={"keys": keys, "f": plain.get}, number=number // 1000)
                / number
                * 1e9
            )
            t_reg.append(
                timeit.timeit(loop, globals={"keys": keys, "f": reg.lookup}, number=number // 1000)
                / number
                * 1e9
            )
        d, r = statistics.median(t_dict), statistics.median(t_reg)
        print(f"{n:>11,} {d:>12.1f} {r:>10.1f} {r / d:>5.2f}x")

    print("\n## 1b. lookups while a full reload of the same records runs every 100 ms")
    for n in (1_000, 100_000):
        lookups_during_reloads(n, 1.5 if quick else 3.0)


def lookups_during_reloads(n: int, seconds: float) -> None:
    recs = records(n)
    reg = registry_with(recs)
    keys = [r.id for r in recs if r.enabled][:1000]
    stop = threading.Event()
    reloads = 0

    def reloader() -> None:
        nonlocal reloads
        while not stop.is_set():
            reg._swap(recs, "fixtures")
            reloads += 1
            stop.wait(0.1)

    thread = threading.Thread(target=reloader)
    samples: list[int] = []
    misses = 0
    clock = time.perf_counter_ns
    lookup = reg.lookup
    thread.start()
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for k in keys:
            t0 = clock()
            try:
                lookup(k)
            except Exception:  # counted, must be zero
                misses += 1
            samples.append(clock() - t0)
    stop.set()
    thread.join()
    # A timer call's own cost, to read the figures against.
    base = [(lambda t0: clock() - t0)(clock()) for _ in range(100_000)]
    print(
        f"  {n:>7,} extensions: {len(samples):,} lookups, {reloads} reloads, misses {misses};"
        f" p50 {pct(samples, 0.5):.0f} ns, p99 {pct(samples, 0.99):.0f} ns,"
        f" p99.9 {pct(samples, 0.999):.0f} ns (timer alone: p50 {pct(base, 0.5):.0f} ns)"
    )


# -- 2. full load --------------------------------------------------------------------------------


def seed_rows(url: str, n: int) -> None:
    with psycopg.connect(url) as conn, conn.cursor() as cur:
        with cur.copy(
            "COPY extensions (id, type, subject, timeout_ms, retry, enabled, version,"
            " config, metadata) FROM STDIN"
        ) as copy:
            for i in range(n):
                r = typical(i)
                copy.write_row(
                    (
                        r["id"],
                        r["type"],
                        r["subject"],
                        r["timeout_ms"],
                        r["retry"],
                        r["enabled"],
                        r["version"],
                        json.dumps(r["config"]),
                        json.dumps(r["metadata"]),
                    )
                )
        conn.commit()


LoadRun = Callable[[], Awaitable[int]]  # one full read; returns the number of records


async def bench_load(url: str, quick: bool) -> None:
    """Every variant in one process, in alternating rounds, connections opened beforehand."""
    from extreg.adapters import postgres

    runs = 5 if quick else 15
    print(
        f"\n## 2. full load of 10,000 extensions from PostgreSQL, median of {runs} alternating"
        " rounds"
    )
    print(
        "  extreg = PostgresSource.load_all_extensions() (PostgreSQL renders the records as JSON,"
        " msgspec decodes and validates) + Snapshot.build, its pool open;"
    )
    print(
        "  bare   = psycopg `SELECT * FROM extensions` (the same rows, split by the same"
        " hashtext partitions on 2 connections), jsonb decoded by stdlib json, no snapshot;"
    )
    print(
        "  the versions and instances tables are empty. Both sides use the same connection"
        " options; JIT is set by `-c jit=...` per connection on both."
    )
    settings = Settings.load(environ={}, database_url=url)
    jit_on = postgres.SESSION_OPTIONS.replace("jit=off", "jit=on")
    saved = postgres.SESSION_OPTIONS
    postgres.SESSION_OPTIONS = jit_on  # read when a PostgresSource is made: this one runs with JIT
    try:
        db_jit = postgres.PostgresSource(settings)
    finally:
        postgres.SESSION_OPTIONS = saved

    async def connect(options: str) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(url, autocommit=True, options=options)

    def extreg(db: postgres.PostgresSource, parts: int) -> LoadRun:
        async def run() -> int:
            saved_parts = postgres.LOAD_PARTS  # read at each call: parts=1 is one connection
            postgres.LOAD_PARTS = parts
            try:
                return len(Snapshot.build(await db.load_all_extensions()))
            finally:
                postgres.LOAD_PARTS = saved_parts

        return run

    def bare(conns: list[psycopg.AsyncConnection[Any]]) -> LoadRun:
        async def fetch(conn: psycopg.AsyncConnection[Any], part: int) -> int:
            query = "SELECT * FROM extensions"
            if len(conns) > 1:
                query += f" WHERE hashtext(id) & {len(conns) - 1} = {part}"
            cur = await conn.execute(query.encode())
            return len(await cur.fetchall())

        async def run() -> int:
            return sum(await asyncio.gather(*(fetch(c, i) for i, c in enumerate(conns))))

        return run

    async with postgres.PostgresSource(settings) as db, db_jit:
        off = [await connect(postgres.SESSION_OPTIONS) for _ in range(2)]
        on = await connect(jit_on)
        jit_available = (await (await on.execute("SELECT pg_jit_available()")).fetchone() or [0])[0]
        variants: dict[str, tuple[int, str, LoadRun]] = {
            "bare": (1, "off", bare(off[:1])),
            "extreg, LOAD_PARTS=1": (1, "off", extreg(db, 1)),
            "bare, 2 partitions at once": (2, "off", bare(off)),
            "extreg, LOAD_PARTS=2 (as shipped)": (2, "off", extreg(db, 2)),
        }
        if jit_available:  # else `jit=on` changes nothing, and the rows would measure nothing
            variants["bare, JIT on"] = (1, "on", bare([on]))
            variants["extreg, LOAD_PARTS=2, JIT on"] = (2, "on", extreg(db_jit, 2))
        times: dict[str, list[float]] = {name: [] for name in variants}
        for _ in range(runs + 1):  # the first round warms up every variant, and is dropped
            for name, (_, _, run) in variants.items():
                t0 = time.perf_counter()
                assert await run() == 10_000
                times[name].append(time.perf_counter() - t0)
        versions = []
        for _ in range(runs):
            t0 = time.perf_counter()
            assert len(await db.row_versions()) == 10_000
            versions.append(time.perf_counter() - t0)
        for conn in [*off, on]:
            await conn.close()
    ms = {name: statistics.median(t[1:]) * 1000 for name, t in times.items()}
    print(f"  {'variant':<36} {'connections':>11} {'JIT':>4} {'median ms':>10}")
    for name, (conns, jit, _) in variants.items():
        print(f"  {name:<36} {conns:>11} {jit:>4} {ms[name]:>10.1f}")
    if not jit_available:
        print("  this PostgreSQL has no JIT (pg_jit_available() is false): no JIT-on rows")
    for label, a, b in (
        ("extreg / bare, 1 connection each, JIT off", "extreg, LOAD_PARTS=1", "bare"),
        (
            "extreg / bare, 2 connections each, JIT off",
            "extreg, LOAD_PARTS=2 (as shipped)",
            "bare, 2 partitions at once",
        ),
        (
            "extreg LOAD_PARTS=2 / LOAD_PARTS=1, JIT off",
            "extreg, LOAD_PARTS=2 (as shipped)",
            "extreg, LOAD_PARTS=1",
        ),
        (
            "extreg JIT on / off, 2 connections",
            "extreg, LOAD_PARTS=2, JIT on",
            "extreg, LOAD_PARTS=2 (as shipped)",
        ),
        ("bare JIT on / off, 1 connection", "bare, JIT on", "bare"),
    ):
        if a in ms:
            print(f"  ratio {label}: {ms[a] / ms[b]:.2f}x")
    print(
        f"  row versions (what a sync reads, and a full reload before its load), extreg's pool,"
        f" JIT off: median {statistics.median(versions) * 1000:.1f} ms"
    )


# -- 3. propagation ------------------------------------------------------------------------------

WRITER = textwrap.dedent("""
    import sys, time, psycopg
    url, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    with psycopg.connect(url, autocommit=True) as conn:
        for i in range(n):
            if mode == "update":
                conn.execute("UPDATE extensions SET timeout_ms = %s WHERE id = 'ext_000001'",
                             (20000 + i,))
            else:
                conn.execute("SELECT pg_notify('bench_raw', %s)", (str(i),))
            print(i, time.monotonic(), flush=True)
            time.sleep(0.004)
""")


async def bench_propagation(url: str, quick: bool) -> None:
    n = 200 if quick else 500
    print(
        f"\n## 3. change propagation: another process's committed UPDATE -> this cache ({n} changes)"
    )
    print(
        "  extreg = a Registry following the database (LISTEN, then an indexed read of the record"
        " and a copy-on-write patch) sees an UPDATE; raw = a LISTEN connection sees a pg_notify;"
    )
    print(
        "  both: the same writer process, one change per 4 ms, from its commit (monotonic clock)"
        " to arrival; percentiles over all changes"
    )
    seen: dict[int, float] = {}

    def on_swap(snap: Snapshot) -> None:
        ext = snap.by_id.get("ext_000001")
        if ext is not None and ext.timeout_ms >= 20000:
            seen.setdefault(ext.timeout_ms - 20000, time.monotonic())

    settings = Settings.load(
        environ={},
        source="database",
        database_url=url,
        sync_interval_seconds=3600,
        data_dir="/tmp/extreg-bench",
    )
    async with Registry.open(settings) as reg:
        reg.on_change(on_swap)
        ours = await _run_writer(url, "update", n, seen)

    raw_seen: dict[int, float] = {}
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await conn.execute("LISTEN bench_raw")

        async def listen() -> None:
            async for note in conn.notifies():
                raw_seen[int(note.payload)] = time.monotonic()
                if len(raw_seen) == n:
                    return

        listener = asyncio.create_task(listen())
        raw = await _run_writer(url, "raw", n, raw_seen)
        await asyncio.wait_for(listener, 10)
    for label, lat in (("extreg UPDATE -> cache", ours), ("raw NOTIFY round trip", raw)):
        print(
            f"  {label:<24} p50 {pct(lat, 0.5) * 1000:.2f} ms, p99 {pct(lat, 0.99) * 1000:.2f} ms,"
            f" max {max(lat) * 1000:.2f} ms ({len(lat)} of {n} seen)"
        )
    print(f"  ratio p99 extreg / raw: {pct(ours, 0.99) / pct(raw, 0.99):.2f}x")


async def _run_writer(url: str, mode: str, n: int, seen: dict[int, float]) -> list[float]:
    committed = await commit_times(WRITER, url, mode, str(n))
    await asyncio.sleep(0.2)
    # Notifications that arrive together are applied together: a change counts as seen when
    # the cache first holds it or a later one.
    latencies = []
    for i, at in committed.items():
        later = [seen[j] for j in seen if j >= i]
        if later:
            latencies.append(min(later) - at)
    return latencies


# -- 4. memory -----------------------------------------------------------------------------------


def bench_memory() -> None:
    print("\n## 4. memory per cached extension (records + snapshot indexes, all strings and JSON)")
    print(
        "  both sides decode the same JSON of 10,000 records; extreg = msgspec structs in a"
        " Snapshot, pydantic = pydantic models in a dict by id; tracemalloc, one measurement each"
    )
    from pydantic import BaseModel

    class PydanticExtension(BaseModel):
        id: str
        type: str
        subject: str
        timeout_ms: int
        retry: int
        enabled: bool
        version: str
        config: dict[str, Any]
        metadata: dict[str, Any]

    n = 10_000
    payload = json.dumps([typical(i) for i in range(n)]).encode()

    def measure(build: Any) -> float:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        kept = build()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del kept
        return (after - before) / n

    ours = measure(lambda: Snapshot.build(msgspec.json.decode(payload, type=list[Extension])))
    theirs = measure(lambda: {d["id"]: PydanticExtension(**d) for d in json.loads(payload)})
    print(f"  extreg snapshot: {ours:,.0f} bytes per extension")
    print(f"  pydantic models in a dict: {theirs:,.0f} bytes per extension")
    print(f"  ratio extreg / pydantic: {ours / theirs:.2f}x")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    logs.configure("warning")
    print(
        f"# extreg registry benchmarks - Python {platform.python_version()},"
        f" {platform.machine()}, {platform.platform()}"
    )
    bench_lookup(args.quick)
    bench_memory()
    with PostgresProcess() as pg:
        url = pg.create_database("bench")
        migrate(url)
        seed_rows(url, 10_000)
        await bench_load(url, args.quick)
        await bench_propagation(url, args.quick)


if __name__ == "__main__":
    asyncio.run(main())
