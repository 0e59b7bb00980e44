"""Invocation cost, one layer at a time: nats-py's `nc.request`, our `NatsTransport.request`
on that same connection, and `Invoker.invoke` on that transport, to the same echo service.

Run: `scripts/bench bench_invoke [--calls N] [--rounds R] [--quick]`

Everything is started here and thrown away: a private NATS server, the `echo` sample in its own
process (so its work does not share the client's event loop), and a private PostgreSQL holding
the registry. One `NatsTransport` is connected (extreg's connection options) and handed to the
`Invoker`; the same process then alternates, R rounds, between three clients on that one
connection, each sending the same envelope bytes with the same two headers (trace_id,
tenant_id) and a 1 s timeout:

- nc.request: `await nc.request(subject, envelope, timeout=1, headers=...)`, nats-py's own
              request-reply on the transport's connection (the reply is not decoded);
- transport:  `await transport.request(ext, subject, envelope, 1.0, headers)`, extreg's
              request-reply (shared inbox subscription, timer handle, error translation);
- invoker:    `await inv.invoke("echo", request, context)` (registry lookup, routing, envelope
              encoding and size checks, headers, breaker, reply decoding and check, health).

sequentially and with 64 calls in flight. Each row shows the median round's throughput and the
p50/p99 latency of all its calls, and two ratios of throughput within the same run: to the
layer below (transport / nc.request: our request-reply; invoker / transport: everything the
invoker adds), and to nc.request (invoker target >= 0.85). The last rows count, at the
PostgreSQL server (its statement log), the SQL statements issued while the invoker made its
calls, with the health flusher paused: the hot path's statements per invocation (target 0);
then one health flush, for scale.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
from pathlib import Path

import nats
from benchlib import (
    Call,
    Medians,
    calls_and_rounds,
    cells,
    compare,
    measure,
    print_rows,
    started_invoker,
)
from nats.aio.client import Client

from extreg import Settings
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.core.envelope import encode_envelope
from extreg.core.model import parse_extension
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLES_BY_ID
from testsupport.pgcount import StatementCounter
from testsupport.pgprocess import PostgresProcess

EXT = "echo"
SUBJECT = SAMPLES_BY_ID[EXT].subject
IN_FLIGHT = 64
TARGET_RATIO = 0.85
REQUEST = {
    "payload": {"message_id": "m-1", "message_type": "chat", "payload": "Original text",
                "metadata": {"channel": "telegram"}},
    "metadata": {"lang": "en", "policy_id": "policy-456"},
}  # fmt: skip
CONTEXT = {"trace_id": "0b6a2c1e-bench", "tenant_id": "tenant-123"}
# The bytes the invoker sends for REQUEST and CONTEXT, encoded once for the two lower layers.
ENVELOPE = encode_envelope(
    EXT, REQUEST, CONTEXT["trace_id"], CONTEXT["tenant_id"], 1 << 20, 1 << 20
)
HEADERS = {"trace_id": CONTEXT["trace_id"], "tenant_id": CONTEXT["tenant_id"]}
TIMEOUT_S = 1.0
BELOW = {"transport": "nc.request", "invoker": "transport"}  # each client's layer below


def start_echo(url: str) -> subprocess.Popen[bytes]:
    code = f"from extreg.local.samples import main; main({url!r}, names=['echo'])"
    return subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.DEVNULL)


async def wait_for_echo(nc: Client) -> None:
    for _ in range(200):
        try:
            await nc.request(SUBJECT, ENVELOPE, timeout=0.5)
            return
        except nats.errors.Error:
            await asyncio.sleep(0.05)
    raise RuntimeError("the echo sample did not answer")


async def prepare_database(url: str, settings: Settings) -> None:
    migrate(url)
    record = parse_extension(SAMPLES_BY_ID[EXT].record(), max_timeout_ms=60_000, max_retries=10)
    async with PostgresSource(settings) as db:
        await db.import_extensions([record], "bench")


async def run(calls: int, rounds: int) -> None:
    with NatsServer() as nats_server, PostgresProcess() as pg:
        echo = start_echo(nats_server.url)
        try:
            url = pg.create_database("bench")
            settings = Settings.load(
                environ={}, source="database", database_url=url, nats_url=nats_server.url,
                data_dir=Path(tempfile.mkdtemp()), health_flush_interval_seconds=3600,
            )  # fmt: skip
            await prepare_database(url, settings)
            counter = StatementCounter(pg.root / "log", url)
            async with started_invoker(settings) as (inv, transport, nc):
                await wait_for_echo(nc)

                async def raw() -> object:
                    return await nc.request(SUBJECT, ENVELOPE, timeout=TIMEOUT_S, headers=HEADERS)

                async def ours() -> object:
                    return await transport.request(EXT, SUBJECT, ENVELOPE, TIMEOUT_S, HEADERS)

                async def invoke() -> object:
                    return await inv.invoke(EXT, REQUEST, CONTEXT)

                clients: dict[str, Call] = {
                    "nc.request": raw,
                    "transport": ours,
                    "invoker": invoke,
                }
                for call in clients.values():  # warm up every path
                    await measure(call, 2000, 8)
                sizes = [
                    ("sequential", 1, calls // 4),
                    (f"{IN_FLIGHT} in flight", IN_FLIGHT, calls),
                ]
                results = table(await compare(clients, sizes, rounds))
                start = counter.mark()
                invoked = 0
                for _ in range(2):
                    _, done = await measure(invoke, calls, IN_FLIGHT)
                    invoked += len(done)
                hot_statements = counter.count_since(start)
                start = counter.mark()
                await inv.flush_health()
                flush_statements = counter.count_since(start)
        finally:
            echo.terminate()
            echo.wait()
    print_table(results, calls, rounds)
    print(
        f"\ndatabase statements during {invoked} invocations (flusher paused): "
        f"{hot_statements} -> {hot_statements / invoked:g} per invocation (target 0)"
    )
    print(f"database statements of one health flush (any number of calls): {flush_statements}")


def table(medians: Medians) -> list[tuple[str, ...]]:
    """Rows of (mode, client, calls/s, p50, p99, ratio to the layer below, ratio to nc.request)."""
    rows: list[tuple[str, ...]] = []
    for label, by_client in medians.items():
        rates: dict[str, float] = {}
        for name, (rate, latencies) in by_client.items():
            rates[name] = rate
            below = f"{rate / rates[BELOW[name]]:.3f}" if name in BELOW else ""
            overall = "" if name == "nc.request" else f"{rate / rates['nc.request']:.3f}"
            if name == "invoker":
                overall += " ok" if rate / rates["nc.request"] >= TARGET_RATIO else " BELOW TARGET"
            rows.append((label, name, *cells(rate, latencies), below, overall))
    return rows


def print_table(rows: list[tuple[str, ...]], calls: int, rounds: int) -> None:
    print(
        "\nOne connection (a NatsTransport's), echo sample, same envelope bytes, same two headers,"
    )
    print("1 s timeout on every side: nc.request = nats-py's request-reply; transport = extreg's")
    print("NatsTransport.request; invoker = Invoker.invoke on that transport (lookup, routing,")
    print("encoding, breaker, reply check, health).")
    print(
        f"Median of {rounds} alternating rounds ({calls // 4} sequential / {calls} with"
        f" {IN_FLIGHT} in flight per round); ratios are throughputs.\n"
    )
    header = (
        "mode",
        "client",
        "calls/s",
        "p50 µs",
        "p99 µs",
        "÷ layer below",
        f"÷ nc.request (invoker target >= {TARGET_RATIO})",
    )
    print_rows(header, rows)


def main() -> None:
    calls, rounds, _ = calls_and_rounds(__doc__.splitlines()[0])
    asyncio.run(run(calls, rounds))


if __name__ == "__main__":
    main()
