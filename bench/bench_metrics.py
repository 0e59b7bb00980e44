"""/metrics benchmarks: what a scrape costs, and what scrapers do to the API, side by side.

    scripts/bench bench_metrics            # about two minutes
    scripts/bench bench_metrics --quick    # shorter runs

1. scrape cost at 10 and 10,000 extensions: one render of the exposition (every extension
   called once, so each has its latency histogram, health and circuit series), its size,
   beside prometheus_client's `generate_latest` of the same series (a labelled `Histogram`
   and a collector of the three gauges, as extreg rendered them before), and what a scrape
   costs the event loop through the cache (`Metrics.scrape`) within the interval.
2. API latency: `GET /admin/extensions/{id}` p50/p99 from one sequential client against an
   `extreg` API process holding 5,000 extensions, quiet, then with 4 and 8 scrapers looping
   on /metrics (in a third process), then with 8 scrapers against the same server rendering
   on the event loop at every scrape, as before the cache and the thread ("before"; with
   today's renderer, so the original, with prometheus_client's, fared worse still).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
from benchlib import pct
from prometheus_client import CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from extreg.auth import generate_token, hash_token
from extreg.core.breaker import BreakerConfig, CircuitBreakers
from extreg.core.health import HealthMonitor
from extreg.core.snapshot import Snapshot
from extreg.metrics import LATENCY_BUCKETS_S, Metrics
from testsupport.pgprocess import free_port

API_EXTENSIONS = 5_000


def typical(i: int) -> dict[str, Any]:
    name = f"ext_{i:06d}"
    return {
        "id": name,
        "type": ("pre", "validator", "post", "provider")[i % 4],
        "subject": f"beamline.ext.pre.{name}.v1",
        "timeout_ms": 100 + i % 900,
        "enabled": i % 10 != 0,
        "config": {"mode": "strict"},
        "metadata": {"owner": "team-nlp"},
    }


class _Invoker:
    """What `Metrics.watch_invoker` reads: a health monitor over real breakers."""

    def __init__(self) -> None:
        self.breaker = CircuitBreakers(BreakerConfig(enabled=True))
        self.health = HealthMonitor(self.breaker)
        self.observer: Any = None


class _Registry:
    """What `Metrics.watch_registry` reads, over a snapshot of `n` typical records."""

    def __init__(self, n: int) -> None:
        import msgspec

        from extreg.core.model import Extension

        recs = msgspec.convert([typical(i) for i in range(n)], type=list[Extension])
        self.snapshot = Snapshot.build(recs, 1)
        self.invalid_records: dict[str, str] = {}
        self.settings = None

    def all(self) -> list[Any]:
        return sorted(self.snapshot.by_id.values(), key=lambda e: e.id)

    def on_change(self, callback: Any) -> None:
        pass

    def on_sync(self, callback: Any) -> None:
        pass

    def on_snapshot_file_error(self, callback: Any) -> None:
        pass

    @property
    def status(self) -> Any:
        return SimpleNamespace(stale=False)  # all `extension_registry_stale` reads


def populated(metrics: Metrics, ids: list[str], invoker: _Invoker) -> None:
    """Every extension called once (one in ten failed), as a busy router's metrics hold."""
    for i, ext_id in enumerate(ids):
        ok = i % 10 != 0
        invoker.health.record(ext_id, ok, 2.0 + i % 7)
        metrics.observe_invocation(ext_id, "pre", "v1", "ok" if ok else "error", 0.002)


# -- 1. scrape cost ------------------------------------------------------------------------


def bench_scrape_cost(quick: bool) -> None:
    rounds = 3 if quick else 5
    print("\n## 1. scrape cost (every extension called once)")
    print(
        "  render = Metrics.render() of the per-extension series; prometheus_client ="
        " generate_latest() of the same series as a labelled Histogram and a gauge collector;"
    )
    print(
        f"  same process, {rounds} alternating rounds, medians; cached scrape = mean of 1,000"
        " Metrics.scrape() calls answered from the cache"
    )
    print(
        f"{'extensions':>11} {'render ms':>10} {'size KB':>8} {'prometheus_client ms':>21}"
        f" {'÷ extreg':>9} {'cached scrape µs':>17}"
    )
    for n in (10, 10_000):
        registry, invoker = _Registry(n), _Invoker()
        metrics = Metrics(cache_s=3600)
        metrics.watch_registry(registry)  # type: ignore[arg-type]
        metrics.watch_invoker(invoker)
        populated(metrics, list(registry.snapshot.by_id), invoker)
        reference = prometheus_client_render(metrics, invoker, list(registry.snapshot.by_id))
        times, ref_times = [], []
        for _ in range(rounds):  # alternate, so drift affects both alike
            t0 = time.perf_counter()
            body = metrics.render()
            times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            generate_latest(reference)
            ref_times.append(time.perf_counter() - t0)
        per_scrape = asyncio.run(cached_scrape(metrics))
        ours, theirs = statistics.median(times), statistics.median(ref_times)
        print(
            f"{n:>11,} {ours * 1000:>10.1f} {len(body) / 1024:>8.0f} {theirs * 1000:>21.1f}"
            f" {theirs / ours:>8.1f}x {per_scrape * 1e6:>17.2f}"
        )


def prometheus_client_render(
    metrics: Metrics, invoker: _Invoker, ids: list[str]
) -> CollectorRegistry:
    """The same per-extension series in prometheus_client's own types (the reference)."""
    reference = CollectorRegistry()
    latency = Histogram(
        "extension_invocation_latency_seconds",
        "Duration.",
        ["extension_id", "extension_type", "version", "outcome"],
        buckets=LATENCY_BUCKETS_S,
        registry=reference,
    )
    for labels, series in metrics.invocation_latency.series.items():
        latency.labels(*labels).observe(series.total / max(sum(series.counts), 1))

    class Gauges(Collector):
        def collect(self) -> Iterator[Metric]:
            families = [
                GaugeMetricFamily(name, "Health.", labels=["extension_id"])
                for name in (
                    "extension_health_success_rate",
                    "extension_health_avg_latency_ms",
                    "extension_circuit_breaker_state",
                )
            ]
            for ext_id in ids:
                health = invoker.health.get_health(ext_id)
                families[0].add_metric([ext_id], health["success_rate"])
                families[1].add_metric([ext_id], health["avg_latency_ms"])
                families[2].add_metric([ext_id], 0)
            yield from families

    reference.register(Gauges())
    return reference


async def cached_scrape(metrics: Metrics) -> float:
    """Seconds of loop time per scrape served from the cache (after the interval's render)."""
    await metrics.scrape()
    t0 = time.perf_counter()
    for _ in range(1000):
        await metrics.scrape()
    return (time.perf_counter() - t0) / 1000


# -- 2. API latency under scrapers -----------------------------------------------------------


def serve(port: int, folder: Path, before: bool) -> None:
    """The API process: 5,000 extensions from a fixtures file, each called once, on uvicorn.
    With `before`, /metrics renders on the event loop at every scrape (no cache, no thread)."""
    import uvicorn

    from extreg import logs
    from extreg.api import create_app
    from extreg.registry import Registry
    from extreg.runtime import Runtime
    from extreg.settings import Settings

    logs.configure("warning")
    settings = Settings.load(
        environ={},
        source="fixtures",
        fixtures_dir=folder / "fixtures",
        data_dir=folder / "data",
        api_tokens_file=folder / "tokens.json",
    )

    async def run() -> None:
        invoker = _Invoker()
        async with (
            Registry.open(settings) as registry,
            Runtime.open(settings, registry, invoker) as runtime,
        ):
            populated(runtime.metrics, [e.id for e in registry.all()], invoker)
            if before:

                async def on_the_loop() -> bytes:
                    return runtime.metrics.render()

                runtime.metrics.scrape = on_the_loop  # type: ignore[method-assign]
            config = uvicorn.Config(
                create_app(runtime),
                host="127.0.0.1",
                port=port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
            await uvicorn.Server(config).serve()

    asyncio.run(run())


def scrape_forever(url: str, scrapers: int) -> None:
    """The scrapers' process: `scrapers` clients, each GET /metrics in a loop, until SIGTERM.
    It prints "ready" once every scraper has finished a scrape (the measurement starts then),
    and at the end its scrapes per second since."""
    count = 0
    started = 0.0
    first: set[int] = set()

    async def one(n: int) -> None:
        nonlocal count, started
        async with httpx.AsyncClient(base_url=url, timeout=120) as client:
            while True:
                (await client.get("/metrics")).raise_for_status()
                count += 1
                if n not in first:
                    first.add(n)
                    if len(first) == scrapers:
                        count, started = 0, time.monotonic()
                        print("ready", flush=True)

    async def run() -> None:
        stop = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
        tasks = [asyncio.create_task(one(n)) for n in range(scrapers)]
        await stop.wait()
        print(f"{count / (time.monotonic() - started):.1f}" if started else "0", flush=True)
        for task in tasks:
            task.cancel()

    asyncio.run(run())


def start_server(folder: Path, before: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", str(port), str(folder)]
        + (["--before"] if before else [])
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the API process did not start")
        time.sleep(0.2)


def measure(url: str, token: str, seconds: float) -> list[float]:
    """Sequential GET /admin/extensions/{id} for `seconds`; each request's time in ms."""
    samples: list[float] = []
    with httpx.Client(
        base_url=url, timeout=60, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        deadline = time.monotonic() + seconds
        i = 0
        while time.monotonic() < deadline:
            t0 = time.perf_counter()
            client.get(f"/admin/extensions/ext_{i % API_EXTENSIONS:06d}").raise_for_status()
            samples.append((time.perf_counter() - t0) * 1000)
            i += 7
    return samples


def bench_api_under_scrapers(quick: bool) -> None:
    seconds = 4.0 if quick else 10.0
    print(
        f"\n## 2. API GET /admin/extensions/{{id}}, {API_EXTENSIONS:,} extensions,"
        f" {seconds:g} s per row"
    )
    print(
        "  one sequential httpx client against a fresh API process per row (5,000 extensions"
        " from fixtures, each called once); scrapers loop on /metrics from a third process;"
    )
    print(
        "  extreg = /metrics as shipped (cached, rendered in a thread); before = the same server"
        " rendering on the event loop at every scrape; p50/p99 over every request of the row"
    )
    print(
        f"{'server':>8} {'scrapers':>9} {'requests':>9} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'p50 ÷ quiet':>12} {'scrapes/s':>10}"
    )
    with tempfile.TemporaryDirectory(prefix="extreg-bench-metrics-") as tmp:
        folder = Path(tmp)
        (folder / "fixtures").mkdir()
        (folder / "fixtures" / "extensions.json").write_text(
            json.dumps([typical(i) | {"enabled": True} for i in range(API_EXTENSIONS)])
        )
        token = generate_token()
        (folder / "tokens.json").write_text(
            json.dumps({"tokens": {"bench": {"role": "viewer", "sha256": hash_token(token)}}})
        )
        quiet_p50 = None
        for before, scrapers in ((False, 0), (False, 4), (False, 8), (True, 8)):
            server, url = start_server(folder, before)
            scraper = None
            rate = "-"
            try:
                if scrapers:
                    scraper = subprocess.Popen(
                        [sys.executable, __file__, "--scrape", url, str(scrapers)],
                        stdout=subprocess.PIPE,
                        text=True,
                    )
                    assert scraper.stdout is not None
                    if scraper.stdout.readline().strip() != "ready":
                        raise SystemExit("the scrapers did not start")
                samples = measure(url, token, seconds)
            finally:
                if scraper is not None:
                    scraper.terminate()
                    rate = scraper.communicate(timeout=120)[0].strip() or "?"
                server.terminate()
                server.wait(30)
            p50 = pct(samples, 0.5)
            quiet_p50 = quiet_p50 or p50
            print(
                f"{'before' if before else 'extreg':>8} {scrapers:>9} {len(samples):>9,}"
                f" {p50:>7.2f} {pct(samples, 0.99):>7.2f} {p50 / quiet_p50:>11.1f}x"
                f" {rate:>10}"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve", nargs=2, metavar=("PORT", "FOLDER"), help=argparse.SUPPRESS)
    parser.add_argument("--before", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--scrape", nargs=2, metavar=("URL", "N"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(int(args.serve[0]), Path(args.serve[1]), args.before)
        return
    if args.scrape:
        scrape_forever(args.scrape[0], int(args.scrape[1]))
        return
    print(
        f"# bench_metrics: {platform.python_implementation()} {platform.python_version()},"
        f" {os.cpu_count()} CPUs, {time.strftime('%Y-%m-%d %H:%M')}"
    )
    bench_scrape_cost(args.quick)
    bench_api_under_scrapers(args.quick)


if __name__ == "__main__":
    main()
