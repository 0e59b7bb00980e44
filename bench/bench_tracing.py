"""What tracing costs per invocation: with no SDK, with the SDK and a no-op exporter, and
nats-py's `nc.request` on the same connection, to the same echo service.

Run: `scripts/bench bench_tracing [--calls N] [--rounds R] [--quick]`

Everything is started here and thrown away: a private NATS server, the `echo` sample in its own
process, a fixtures folder holding its record. One `Invoker` on its own `NatsTransport`; R
rounds alternate between the clients, switching the process's tracer provider between rounds
(`testsupport.otel`):

- nc.request: nats-py's request-reply on the invoker's connection, the same envelope bytes and
              two id headers (`bench_invoke`'s raw client);
- no SDK:     `Invoker.invoke` with no tracer provider set (the fast path: `tracing.active()`
              is False, no span work at all);
- SDK:        `Invoker.invoke` with the OpenTelemetry SDK, every span sampled and handed to a
              `BatchSpanProcessor` whose exporter drops it (the SDK's own cost, no I/O), and the
              `traceparent` header sent;
- sampled out: the same SDK with a sampler that records nothing (`ALWAYS_OFF`, what a low
              `OTEL_TRACES_SAMPLER_ARG` does to most calls): the SDK's decision, a
              non-recording span, the `traceparent` still sent.

sequentially and with 64 in flight: median round's throughput, p50/p99, ratio to nc.request.

Then the fast path's own cost, without the network: `Invoker.invoke` against its untraced body
`Invoker._invoke` on a dry run (`dry_run` stops a call before NATS), alternating, median of R
rounds of N calls each: the difference per call is what the tracing gate adds when no SDK is
set (target <= 1 µs), beside `tracing.active()` alone and, for scale, the API's public
`trace.get_tracer_provider()`, which `active()` does not call (it reads os.environ every time
while no provider is set).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import timeit
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path

from bench_invoke import (
    CONTEXT,
    ENVELOPE,
    EXT,
    HEADERS,
    IN_FLIGHT,
    REQUEST,
    SUBJECT,
    TIMEOUT_S,
    start_echo,
    wait_for_echo,
)
from benchlib import Call, calls_and_rounds, cells, compare, measure, print_rows, started_invoker
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

from extreg import Settings, tracing
from extreg.invoke import Invoker
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLES_BY_ID
from testsupport.otel import use_provider

GATE_TARGET_NS = 1000.0
DRY = {**CONTEXT, "dry_run": True}


class DropExporter(SpanExporter):
    """Takes every batch and does nothing with it: the SDK's cost without an exporter's."""

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS


async def run(calls: int, rounds: int, gate_calls: int) -> None:
    sdk = TracerProvider()
    sdk.add_span_processor(BatchSpanProcessor(DropExporter()))
    sampled_out = TracerProvider(sampler=ALWAYS_OFF)
    sampled_out.add_span_processor(BatchSpanProcessor(DropExporter()))
    with NatsServer() as nats_server, tempfile.TemporaryDirectory() as tmp:
        echo = start_echo(nats_server.url)
        try:
            folder = Path(tmp) / "fixtures"
            folder.mkdir()
            (folder / "records.json").write_text(json.dumps([SAMPLES_BY_ID[EXT].record()]))
            settings = Settings.load(
                environ={}, source="fixtures", fixtures_dir=folder, nats_url=nats_server.url,
                data_dir=Path(tmp) / "data", health_flush_interval_seconds=3600,
            )  # fmt: skip
            async with started_invoker(settings) as (inv, _, nc):
                await wait_for_echo(nc)

                async def raw() -> object:
                    return await nc.request(SUBJECT, ENVELOPE, timeout=TIMEOUT_S, headers=HEADERS)

                async def invoke() -> object:
                    return await inv.invoke(EXT, REQUEST, CONTEXT)

                clients: dict[str, tuple[TracerProvider | None, Call]] = {
                    "nc.request": (None, raw),
                    "invoker, no SDK": (None, invoke),
                    "invoker, SDK + no-op exporter": (sdk, invoke),
                    "invoker, SDK, sampled out": (sampled_out, invoke),
                }
                sizes = [
                    ("sequential", 1, calls // 4),
                    (f"{IN_FLIGHT} in flight", IN_FLIGHT, calls),
                ]
                rows = await compare_traced(clients, sizes, rounds)
                gate = await gate_cost(inv, gate_calls, rounds)
        finally:
            use_provider(None)
            sdk.shutdown()
            sampled_out.shutdown()
            echo.terminate()
            echo.wait()
    print_report(rows, gate, calls, rounds, gate_calls)


async def compare_traced(
    clients: dict[str, tuple[TracerProvider | None, Call]],
    sizes: list[tuple[str, int, int]],
    rounds: int,
) -> list[tuple[str, ...]]:
    """`benchlib.compare`, each client's tracer provider set before its rounds (warm-up
    included); rows with each throughput's ratio to nc.request's."""
    calls = {name: call for name, (_, call) in clients.items()}
    setup = {name: partial(use_provider, provider) for name, (provider, _) in clients.items()}
    for name, call in calls.items():  # warm up every path
        setup[name]()
        await measure(call, 1000, IN_FLIGHT)
    medians = await compare(calls, sizes, rounds, setup)
    use_provider(None)
    rows: list[tuple[str, ...]] = []
    for label, by_client in medians.items():
        raw_rate = by_client["nc.request"][0]
        for name, (rate, latencies) in by_client.items():
            ratio = "" if name == "nc.request" else f"{rate / raw_rate:.3f}"
            rows.append((label, name, *cells(rate, latencies), ratio))
    return rows


async def gate_cost(inv: Invoker, calls: int, rounds: int) -> tuple[float, ...]:
    """(ns per dry-run call through `invoke`, through `_invoke`, their difference, ns of
    `tracing.active()` alone, ns of the API's public `trace.get_tracer_provider()`), medians
    of `rounds` alternating rounds (the last two: the best), no SDK set."""
    use_provider(None)
    assert not tracing.active()

    async def traced_gate() -> None:
        await inv.invoke(EXT, REQUEST, DRY)

    async def untraced() -> None:
        await inv._invoke(EXT, REQUEST, DRY, None)

    async def per_call_ns(call: Callable[[], object]) -> float:
        started = time.perf_counter()
        for _ in range(calls):
            await call()  # type: ignore[misc]
        return (time.perf_counter() - started) / calls * 1e9

    gated, bare = [], []
    await per_call_ns(traced_gate)
    await per_call_ns(untraced)
    for _ in range(rounds):
        gated.append(await per_call_ns(traced_gate))
        bare.append(await per_call_ns(untraced))
    diffs = [g - b for g, b in zip(gated, bare, strict=True)]
    active_ns = min(timeit.repeat(tracing.active, number=calls, repeat=rounds)) / calls * 1e9
    public = min(timeit.repeat(trace.get_tracer_provider, number=calls, repeat=rounds))
    return (
        statistics.median(gated),
        statistics.median(bare),
        statistics.median(diffs),
        active_ns,
        public / calls * 1e9,
    )


def print_report(
    rows: list[tuple[str, ...]],
    gate: tuple[float, ...],
    calls: int,
    rounds: int,
    gate_calls: int,
) -> None:
    print("\nOne connection, echo sample in its own process, same envelope and id headers, 1 s")
    print("timeout. no SDK = no tracer provider set; SDK = every span sampled, batched, dropped;")
    print("sampled out = the SDK with the ALWAYS_OFF sampler.")
    print(
        f"Median of {rounds} alternating rounds ({calls // 4} sequential / {calls} with"
        f" {IN_FLIGHT} in flight per round); ratio = throughput / nc.request's.\n"
    )
    print_rows(("mode", "client", "calls/s", "p50 µs", "p99 µs", "÷ nc.request"), rows)
    gated, bare, diff, active, public = gate
    verdict = "ok" if diff <= GATE_TARGET_NS else "ABOVE TARGET"
    print(f"\nThe fast path without the network (dry runs, no SDK, {gate_calls} calls per round,")
    print(f"median of {rounds} alternating rounds):")
    print(f"  Invoker.invoke (with the tracing gate)  {gated:8,.0f} ns per call")
    print(f"  Invoker._invoke (no gate)               {bare:8,.0f} ns per call")
    print(f"  the gate's cost                         {diff:8,.0f} ns per call "
          f"(target <= {GATE_TARGET_NS:,.0f}: {verdict})")  # fmt: skip
    print(f"  tracing.active() alone                  {active:8,.0f} ns per call")
    print(f"  trace.get_tracer_provider(), for scale  {public:8,.0f} ns per call "
          "(the public call; active() reads the global it reads)")  # fmt: skip


def main() -> None:
    calls, rounds, quick = calls_and_rounds(__doc__.splitlines()[0])
    asyncio.run(run(calls, rounds, gate_calls=100_000 if quick else 300_000))


if __name__ == "__main__":
    main()
