"""Load run: invocations through several `extreg serve` nodes, with `flaky` failing on purpose.

Run: `scripts/bench load [--seconds 120] [--nodes 3] [--concurrency 32]
      [--failure-rate 0.3] [--failure-mode drop|invalid]`

Bounded (at most 10 minutes) and loopback only. Everything is started here and thrown away by
the `testsupport.cluster.Cluster` harness: one PostgreSQL, one NATS server, the sample extensions in
their own process, and N nodes with the circuit breaker enabled (open -> half-open after
`--breaker-timeout` seconds, so transitions happen within the run).

`--concurrency` workers keep that many calls in flight, each `POST /admin/extensions/{id}/invoke`
through the nodes in turn, over a fixed mix of the sample extensions (flaky 30 %, echo 30 %,
the four reference extensions 10 % each). The flaky sample drops (or garbles) `--failure-rate`
of the calls that reach it.

Classification of every call:
- ok: HTTP 200 (a validator's `reject` is an answer, so ok);
- injected: `flaky` answering 504 `ExtensionTimeout` (drop mode) or 502 `InvalidResponse`
  (invalid mode), or 503 `CircuitOpen` (its breaker refusing after those failures);
- unexpected: anything else, any extension: other statuses, other errors, transport errors.
  Target: 0. The first few are printed with their detail.

Reported: calls, throughput (total and per node), latency, unexpected failures, flaky's own
count of injected failures against the timeouts seen (a difference would be a timeout that
was not injected: a real answer that came too late, counted as unexpected in the verdicts),
breaker transitions (from each node's /metrics: `extension_circuit_breaker_failures_total` =
circuits opened, `..._recoveries_total` = closed again), the health totals in the database
against the calls the client saw (exact, or not), and each node's resident memory before the
load, after the warm-up (the first 10 % of the run, at least 5 s) and at the end. Exit status 1
when an unexpected failure occurred (including a flaky failure that was not injected), the
health totals disagree, a node died, or a node's memory grew after the warm-up by more than
the bound (`--memory-bound-mib`, default 16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import os
import platform
import random
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import httpx

from extreg.local.demo import REQUESTS
from testsupport.cluster import Cluster, Node

MIX = {"flaky": 3, "echo": 3, "normalize_text": 1, "pii_guard": 1, "mask_pii": 1,
       "test_provider": 1}  # fmt: skip
MAX_SECONDS = 600
MIB = 1024 * 1024


@dataclass
class Tally:
    """What the client saw."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (ext, kind)
    per_node: Counter[str] = field(default_factory=Counter)
    latency_ms: dict[str, list[float]] = field(default_factory=lambda: defaultdict(list))
    unexpected: list[str] = field(default_factory=list)

    def count(self, kind: str) -> int:
        return sum(n for (_, k), n in self.outcomes.items() if k == kind)


def classify(ext: str, response: httpx.Response, failure_mode: str) -> str:
    """ok, injected_timeout, injected_invalid, injected_circuit_open, or unexpected."""
    if response.status_code == 200:
        return "ok"
    try:
        error = response.json().get("error")
    except ValueError:
        error = None
    if ext == "flaky":
        if response.status_code == 503 and error == "CircuitOpen":
            return "injected_circuit_open"
        if failure_mode == "drop" and response.status_code == 504 and error == "ExtensionTimeout":
            return "injected_timeout"
        if failure_mode == "invalid" and response.status_code == 502 and error == "InvalidResponse":
            return "injected_invalid"
    return "unexpected"


async def worker(
    nodes: list[Node],
    turn: itertools.count[int],
    stop_at: float,
    tally: Tally,
    failure_mode: str,
    seed: int,
) -> None:
    rng = random.Random(seed)
    ids, weights = list(MIX), list(MIX.values())
    while time.monotonic() < stop_at:
        node = nodes[next(turn) % len(nodes)]
        ext = rng.choices(ids, weights)[0]
        body = {**REQUESTS[ext], "tenant_id": "load"}
        started = time.perf_counter()
        try:
            response = await node.client.post(f"/admin/extensions/{ext}/invoke", json=body)
        except httpx.HTTPError as exc:
            kind = "unexpected"
            detail = f"{ext} via {node.name}: {type(exc).__name__}: {exc}"
        else:
            kind = classify(ext, response, failure_mode)
            detail = f"{ext} via {node.name}: HTTP {response.status_code} {response.text[:300]}"
        elapsed = (time.perf_counter() - started) * 1000
        tally.outcomes[(ext, kind)] += 1
        tally.per_node[node.name] += 1
        tally.latency_ms[kind].append(elapsed)
        if kind == "unexpected" and len(tally.unexpected) < 20:
            tally.unexpected.append(detail)


def rss_mib(nodes: list[Node]) -> list[float]:
    return [round((n.rss() or 0) / MIB, 1) for n in nodes]


async def sample_memory(
    nodes: list[Node], every_s: float, into: list[list[float]], stop: asyncio.Event
) -> None:
    while not stop.is_set():
        into.append(rss_mib(nodes))
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), every_s)


async def breaker_transitions(nodes: list[Node]) -> dict[str, tuple[int, int]]:
    """Per node: (circuits opened, circuits closed again), summed over extensions."""
    found = {}
    for node in nodes:
        metrics = await node.metrics()
        opened = sum(
            v
            for (name, _), v in metrics.items()
            if name == "extension_circuit_breaker_failures_total"
        )
        closed = sum(
            v
            for (name, _), v in metrics.items()
            if name == "extension_circuit_breaker_recoveries_total"
        )
        found[node.name] = (int(opened), int(closed))
    return found


async def health_totals(cluster: Cluster) -> dict[str, tuple[int, int]]:
    rows = await cluster.query(
        "SELECT extension_id, success_count, failure_count FROM extension_health"
    )
    return {ext: (int(ok), int(failed)) for ext, ok, failed in rows}


def expected_health(tally: Tally) -> dict[str, tuple[int, int]]:
    """What the health rows must say: every answered call a success; every injected timeout or
    invalid reply a failure (a circuit-open refusal never reaches the extension)."""
    expected: dict[str, tuple[int, int]] = {}
    for ext in MIX:
        ok = tally.outcomes[(ext, "ok")]
        failed = (
            tally.outcomes[(ext, "injected_timeout")] + tally.outcomes[(ext, "injected_invalid")]
        )
        if ok or failed:
            expected[ext] = (ok, failed)
    return expected


def pct(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            cpu = next(
                line.split(":", 1)[1].strip() for line in info if line.startswith("model name")
            )
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
        f"Python {platform.python_version()}"
    )


def table(rows: list[tuple[object, ...]], header: tuple[str, ...]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    out = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths, strict=True)), line]
    for row in rows:
        out.append(
            "  ".join(
                str(c).rjust(w) if i else str(c).ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
    return "\n".join(out)


async def run(args: argparse.Namespace) -> int:
    settings = {
        "circuit_breaker_enabled": True,
        "circuit_breaker_timeout_seconds": args.breaker_timeout,
        "health_flush_interval_seconds": 1.0,
    }
    print(
        f"load run: {args.seconds:g} s, {args.nodes} nodes, {args.concurrency} in flight, "
        f"flaky failing {args.failure_rate:.0%} ({args.failure_mode}), breaker enabled "
        f"(open -> half-open after {args.breaker_timeout:g} s)"
    )
    print(f"machine: {machine()}")
    async with Cluster(args.nodes, settings=settings) as cluster:
        nodes = cluster.nodes
        print(
            f"cluster ready in {cluster.startup_s:.1f} s: "
            + ", ".join(f"{n.name} {n.url} (pid {n.pid})" for n in nodes)
        )
        await cluster.flaky(
            reset=True,
            failure_rate=args.failure_rate,
            failure_mode=args.failure_mode,
            seed=args.seed,
        )
        rss_start = rss_mib(nodes)
        memory: list[list[float]] = []
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_memory(nodes, 1.0, memory, stop_sampling))
        tally = Tally()
        started = time.monotonic()
        warmup_s = max(5.0, args.seconds * 0.1)
        turn = itertools.count()
        workers = [
            asyncio.create_task(
                worker(nodes, turn, started + args.seconds, tally, args.failure_mode, args.seed + i)
            )
            for i in range(args.concurrency)
        ]
        await asyncio.sleep(min(warmup_s, args.seconds))
        rss_warm = rss_mib(nodes)
        calls_warm = sum(tally.per_node.values())
        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        stop_sampling.set()
        await sampler
        rss_end = rss_mib(nodes)
        calls = sum(tally.per_node.values())

        flaky_state = (await cluster.flaky())["stats"]
        transitions = await breaker_transitions(nodes)
        expected = expected_health(tally)
        deadline = time.monotonic() + 15  # every node flushes every second
        while True:
            written = await health_totals(cluster)
            if (
                all(written.get(ext) == want for ext, want in expected.items())
                or time.monotonic() > deadline
            ):
                break
            await asyncio.sleep(0.25)
        alive = [n.alive for n in nodes]

    # -- report --------------------------------------------------------------------------------
    unexpected = tally.count("unexpected")
    timeouts = (
        tally.outcomes[("flaky", "injected_timeout")]
        + tally.outcomes[("flaky", "injected_invalid")]
    )
    spurious = timeouts - flaky_state["failures"]  # e.g. a real answer that came too late
    print()
    print(
        table(
            [
                (
                    ext,
                    tally.outcomes[(ext, "ok")],
                    tally.outcomes[(ext, "injected_timeout")]
                    + tally.outcomes[(ext, "injected_invalid")],
                    tally.outcomes[(ext, "injected_circuit_open")],
                    tally.outcomes[(ext, "unexpected")],
                    f"{expected.get(ext, (0, 0))}",
                    f"{written.get(ext, (0, 0))}",
                    "exact"
                    if written.get(ext, (0, 0)) == expected.get(ext, (0, 0))
                    else "MISMATCH",
                )
                for ext in MIX
            ],
            (
                "extension",
                "ok",
                "injected fail",
                "circuit open",
                "unexpected",
                "health expected (ok, fail)",
                "health in database",
                "",
            ),
        )
    )
    print()
    ok_lat = tally.latency_ms["ok"]
    rows = [
        ("duration", f"{elapsed:.1f} s (warm-up {warmup_s:.0f} s included)"),
        ("calls made", f"{calls}"),
        (
            "throughput",
            f"{calls / elapsed:.0f} calls/s  (per node: "
            + ", ".join(f"{k} {v / elapsed:.0f}" for k, v in sorted(tally.per_node.items()))
            + ")",
        ),
        (
            "latency of ok calls",
            f"p50 {pct(ok_lat, 0.5):.1f} ms, p95 {pct(ok_lat, 0.95):.1f} ms, "
            f"p99 {pct(ok_lat, 0.99):.1f} ms, max {max(ok_lat, default=0):.1f} ms",
        ),
        ("ok", f"{tally.count('ok')}"),
        (
            "injected failures (flaky)",
            f"{timeouts} {'timeouts' if args.failure_mode == 'drop' else 'invalid replies'}, "
            f"{tally.count('injected_circuit_open')} circuit-open refusals",
        ),
        (
            "flaky's own count",
            f"{flaky_state['calls']} calls reached it, {flaky_state['failures']} failed on purpose",
        ),
        ("UNEXPECTED failures", f"{unexpected}  (target 0)"),
        (
            "flaky failures not injected",
            f"{spurious}  (failures seen - failures flaky made; target 0)",
        ),
        (
            "breaker transitions",
            ", ".join(f"{k}: opened {o}, closed {c}" for k, (o, c) in transitions.items())
            + f"  (total opened {sum(o for o, _ in transitions.values())}, "
            f"closed {sum(c for _, c in transitions.values())})",
        ),
    ]
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key.ljust(width)}  {value}")
    print()
    growth = [round(e - w, 1) for e, w in zip(rss_end, rss_warm, strict=True)]
    peak = [max(sample[i] for sample in memory) if memory else 0 for i in range(len(nodes))]
    print(
        table(
            [
                (
                    n.name,
                    f"{s:.1f}",
                    f"{w:.1f}",
                    f"{e:.1f}",
                    f"{p:.1f}",
                    f"{g:+.1f}",
                    f"{e - s:+.1f}",
                )
                for n, s, w, e, p, g in zip(
                    nodes, rss_start, rss_warm, rss_end, peak, growth, strict=True
                )
            ],
            (
                "RSS MiB",
                "before load",
                f"after warm-up ({calls_warm} calls)",
                "end",
                "peak",
                "growth after warm-up",
                "growth overall",
            ),
        )
    )
    verdicts = {
        "no unexpected failures": unexpected == 0,
        "every flaky failure was an injected one": spurious == 0,
        "health totals exact": all(written.get(e) == w for e, w in expected.items()),
        f"memory growth after warm-up <= {args.memory_bound_mib} MiB": all(
            g <= args.memory_bound_mib for g in growth
        ),
        "every node alive at the end": all(alive),
    }
    print()
    for name, passed in verdicts.items():
        print(f"{'PASS' if passed else 'FAIL'}  {name}")
    if tally.unexpected:
        print("\nfirst unexpected failures:")
        for line in tally.unexpected:
            print("  " + line)
    return 0 if all(verdicts.values()) else 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--failure-rate", type=float, default=0.3)
    parser.add_argument("--failure-mode", choices=("drop", "invalid"), default="drop")
    parser.add_argument("--breaker-timeout", type=float, default=2.0)
    parser.add_argument("--memory-bound-mib", type=float, default=16.0)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    if not 0 < args.seconds <= MAX_SECONDS:
        parser.error(f"--seconds must be in (0, {MAX_SECONDS}]")
    if not 1 <= args.nodes <= 16 or not 1 <= args.concurrency <= 1024:
        parser.error("--nodes must be 1..16 and --concurrency 1..1024")
    sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
