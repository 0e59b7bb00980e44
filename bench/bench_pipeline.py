"""The pipeline's cost: `Invoker.run_policy` against the same requests sent with nats-py's own
`nc.request`, one after the other, on the same connection, in the same run.

Run: `scripts/bench bench_pipeline [--runs N] [--slow-runs N] [--rounds R] [--quick]`

Everything is started here and thrown away: a private NATS server, the responders in their own
process (this file run with `--serve URL`, so their work does not share the client's event
loop), and a registry in fixtures mode on a temporary folder holding the extension records and
two policies. Fixtures mode rather than the database: in either mode a run touches no database
(lookups come from the in-memory cache, health is kept in memory and flushed apart), and
without a PostgreSQL server on the two cores there is one process fewer competing with them.
The circuit breaker and health are on (`circuit_breaker_enabled=true`) throughout. One
`NatsTransport` is connected and handed to the `Invoker`; its connection also carries every
raw request. Clients alternate round by round and each row shows the median round.

1. `bench_pipe` = pre (`bench_pre`) -> validator (`bench_validator`) -> provider
   (`bench_provider`) -> post (`bench_post`). A policy without providers ends after its
   validators, so a pre, validator and post policy needs a provider for its post to run: the
   like-for-like raw side is therefore the *four* requests one run makes. Before measuring,
   one run is watched (a plain subscription beside each responder's) and the exact envelope
   bytes and headers of its four requests are kept; `nc.request x4` sends those, in order,
   each awaited before the next (as the pipeline must: each stage waits for the one before).
   `invoke x4` makes the same four calls through `Invoker.invoke` (what the pipeline adds on
   top of the invoker shows between it and `run_policy`). Pre and post echo the request (the
   message comes back unchanged), the validator answers `{"status": "ok"}`, the provider a
   constant provider reply. Sequentially and with 64 runs in flight; target: `run_policy`
   takes <= 1.2x the time of the four raw requests.
2. `bench_slow` = three validators, each answering `{"status": "ok"}` 30 ms after its
   request (an `asyncio.sleep` in a task per request, so the responder answers concurrently).
   Sequentially, the validator stage against one 30 ms request alone (the first validator's
   envelope): validators run together, so the stage should last as long as its slowest
   validator, target <= 1.2x; `nc.request x3` (the three one after the other, as the original
   router ran them) shows the sequential stage, about 3x. With 64 runs in flight the stage
   sends three times the requests of `nc.request x1`, and on two cores that is CPU time, not
   waiting: there the like-for-like side is `nc.request x3 together` (the three raw requests
   at once, `asyncio.gather`), target <= 1.2x of its time.
3. Per-step overhead over a raw request, in µs: from part 1's median rounds, (time of a
   `run_policy` run - time of an `nc.request x4` run) / 4, split into what the invoker adds
   (`invoke x4` - raw) and what the pipeline adds (`run_policy` - `invoke x4`). Sequentially
   the time is the p50 latency; with 64 in flight, event-loop time per run (from throughput).
   These are differences of noisy figures (a busy machine makes them swing by tens of µs),
   so the pipeline's own work is also timed alone: `run_policy` with `Invoker.invoke`
   replaced by one answering the responders' replies from memory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import msgspec
import nats
from benchlib import Call, Medians, cells, compare, measure, pct, print_rows, started_invoker
from nats.aio.client import Client
from nats.aio.msg import Msg

from extreg import Settings, logs
from extreg.adapters.nats import subscriptions_active
from extreg.invoke import Invoker
from extreg.local.natsserver import NatsServer

IN_FLIGHT = 64
TARGET_RATIO = 1.2
TIMEOUT_S = 1.0
SLOW_S = 0.030
PREFIX = "bench.pipeline"
# extension id -> (type, subject, how its responder answers)
EXTENSIONS = {
    "bench_pre": ("pre", f"{PREFIX}.pre.v1", "echo"),
    "bench_validator": ("validator", f"{PREFIX}.validator.v1", "ok"),
    "bench_provider": ("provider", f"{PREFIX}.provider.v1", "provider"),
    "bench_post": ("post", f"{PREFIX}.post.v1", "echo"),
    "slow_a": ("validator", f"{PREFIX}.slow_a.v1", "slow"),
    "slow_b": ("validator", f"{PREFIX}.slow_b.v1", "slow"),
    "slow_c": ("validator", f"{PREFIX}.slow_c.v1", "slow"),
}
PIPE, SLOW = "bench_pipe", "bench_slow"
POLICIES: dict[str, dict[str, Any]] = {
    PIPE: {
        "policy_id": PIPE,
        "pre": [{"id": "bench_pre"}],
        "validators": [{"id": "bench_validator"}],
        "providers": ["bench_provider"],
        "post": [{"id": "bench_post"}],
    },
    SLOW: {"policy_id": SLOW, "validators": [{"id": i} for i in ("slow_a", "slow_b", "slow_c")]},
}
PIPE_IDS = ("bench_pre", "bench_validator", "bench_provider", "bench_post")
SLOW_IDS = ("slow_a", "slow_b", "slow_c")
OK_REPLY = b'{"status":"ok"}'
PROVIDER_REPLY = msgspec.json.encode(
    {
        "provider_id": "bench_provider",
        "output": "Answer text",
        "usage": {"prompt_tokens": 2, "completion_tokens": 2},
        "metadata": {},
    }
)
MESSAGE = {
    "message_id": "m-1",
    "message_type": "chat",
    "payload": "Original text",
    "metadata": {"channel": "telegram"},
}
CONTEXT = {"trace_id": "0b6a2c1e-bench", "tenant_id": "tenant-123"}

Sent = tuple[str, bytes, dict[str, str] | None]  # subject, envelope bytes, headers


# -- the responders' process ------------------------------------------------------------------


async def serve(url: str) -> None:
    """Answer every bench subject until SIGTERM. A slow responder answers from a task per
    request, so 64 requests in flight all answer after 30 ms, not one after another."""
    nc = await nats.connect(url)
    pending: set[asyncio.Task[None]] = set()

    async def echo(msg: Msg) -> None:
        await msg.respond(msg.data)

    async def ok(msg: Msg) -> None:
        await msg.respond(OK_REPLY)

    async def provider(msg: Msg) -> None:
        await msg.respond(PROVIDER_REPLY)

    async def later(msg: Msg) -> None:
        await asyncio.sleep(SLOW_S)
        await msg.respond(OK_REPLY)

    async def slow(msg: Msg) -> None:
        task = asyncio.create_task(later(msg))
        pending.add(task)
        task.add_done_callback(pending.discard)

    handlers = {"echo": echo, "ok": ok, "provider": provider, "slow": slow}
    for _, subject, kind in EXTENSIONS.values():
        await nc.subscribe(subject, cb=handlers[kind])
    await subscriptions_active(nc)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await nc.close()


def start_responders(url: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--serve", url], stderr=subprocess.DEVNULL)


async def wait_for_responders(nc: Client) -> None:
    for _, subject, _ in EXTENSIONS.values():
        for _ in range(200):
            try:
                await nc.request(subject, b"{}", timeout=0.5)
                break
            except nats.errors.Error:
                await asyncio.sleep(0.05)
        else:
            raise RuntimeError(f"no responder answered on {subject}")


# -- the registry -----------------------------------------------------------------------------


def write_fixtures(folder: Path) -> None:
    records = [
        {"id": ext_id, "type": kind, "subject": subject, "timeout_ms": int(TIMEOUT_S * 1000)}
        for ext_id, (kind, subject, _) in EXTENSIONS.items()
    ]
    (folder / "records.json").write_text(json.dumps(records), "utf-8")
    (folder / "policies").mkdir()
    for name, policy in POLICIES.items():
        (folder / "policies" / f"{name}.json").write_text(json.dumps(policy), "utf-8")


async def watch_one_run(
    nc: Client, inv: Invoker, policy_id: str, ids: tuple[str, ...]
) -> list[Sent]:
    """The requests one run of the policy sends, in policy order, as they reached NATS."""
    seen: dict[str, Sent] = {}
    subs = []
    for ext_id in ids:
        subject = EXTENSIONS[ext_id][1]

        async def keep(msg: Msg, ext_id: str = ext_id) -> None:
            seen[ext_id] = (msg.subject, msg.data, dict(msg.headers) if msg.headers else None)

        subs.append(await nc.subscribe(subject, cb=keep))
    await nc.flush()
    await inv.run_policy(policy_id, MESSAGE, CONTEXT)
    for _ in range(200):
        if len(seen) == len(ids):
            break
        await asyncio.sleep(0.01)
    for sub in subs:
        await sub.unsubscribe()
    missing = [i for i in ids if i not in seen]
    if missing:
        raise RuntimeError(f"a run of {policy_id} sent nothing to {missing}")
    return [seen[i] for i in ids]


# -- measuring --------------------------------------------------------------------------------


TABLE_HEADER = (  # the columns of table()'s rows, parts 1 and 2 alike
    "mode",
    "client",
    "runs/s",
    "p50 µs",
    "p99 µs",
    f"time ÷ base (target <= {TARGET_RATIO})",
)


def table(
    medians: Medians,
    bases: dict[str, str],
    target: str,
) -> list[tuple[str, ...]]:
    """Rows of (mode, client, runs/s, p50, p99, time per run / the mode's base client's);
    `bases` names each mode's base, the one `target` must stay within TARGET_RATIO of."""
    rows: list[tuple[str, ...]] = []
    for label, by_client in medians.items():
        base = bases[label]
        base_rate = by_client[base][0]
        for name, (rate, latencies) in by_client.items():
            ratio = "base" if name == base else f"{base_rate / rate:.3f}"
            if name == target:
                ratio += " ok" if base_rate / rate <= TARGET_RATIO else " OVER TARGET"
            rows.append((label, name, *cells(rate, latencies), ratio))
    return rows


def per_step(medians: Medians) -> list[tuple[str, ...]]:
    """Rows of (mode, µs per step over raw, of which the invoker's, of which the pipeline's):
    sequentially from the median rounds' p50 latencies (a burst of load on a shared machine
    moves a mean more than a median), in flight from their throughputs."""
    rows: list[tuple[str, ...]] = []
    steps = len(PIPE_IDS)
    names = ("nc.request x4", "invoke x4", "run_policy")
    for label, by_client in medians.items():
        if label == "sequential":
            raw, inv, pol = (pct(by_client[n][1], 0.5) for n in names)
        else:
            raw, inv, pol = (1e6 / by_client[n][0] for n in names)
        rows.append(
            (
                label,
                f"{(pol - raw) / steps:,.1f}",
                f"{(inv - raw) / steps:,.1f}",
                f"{(pol - inv) / steps:,.1f}",
            )
        )
    return rows


async def run(runs: int, slow_runs: int, rounds: int) -> None:
    with NatsServer() as nats_server, tempfile.TemporaryDirectory() as tmp:
        responders = start_responders(nats_server.url)
        try:
            folder = Path(tmp) / "fixtures"
            folder.mkdir()
            write_fixtures(folder)
            settings = Settings.load(
                environ={}, source="fixtures", fixtures_dir=folder, nats_url=nats_server.url,
                data_dir=Path(tmp) / "data", circuit_breaker_enabled=True,
                sync_interval_seconds=3600,
            )  # fmt: skip
            async with started_invoker(settings) as (inv, _, nc):
                await wait_for_responders(nc)
                pipe_sent = await watch_one_run(nc, inv, PIPE, PIPE_IDS)
                slow_sent = await watch_one_run(nc, inv, SLOW, SLOW_IDS)
                pipe, slow = clients(nc, inv, pipe_sent, slow_sent)
                for call in [*pipe.values(), *slow.values()]:  # warm up every path
                    await measure(call, 200, 8)
                pipe_medians = await compare(
                    pipe,
                    [("sequential", 1, runs // 4), (f"{IN_FLIGHT} in flight", IN_FLIGHT, runs)],
                    rounds,
                )
                slow_medians = await compare(
                    slow,
                    [
                        ("sequential", 1, slow_runs),
                        (f"{IN_FLIGHT} in flight", IN_FLIGHT, slow_runs * IN_FLIGHT // 4),
                    ],
                    rounds,
                )
                alone = await pipeline_alone(inv, pipe_sent, runs, rounds)
        finally:
            responders.terminate()
            responders.wait()
    report(pipe_medians, slow_medians, alone, runs, slow_runs, rounds)


def clients(
    nc: Client, inv: Invoker, pipe_sent: list[Sent], slow_sent: list[Sent]
) -> tuple[dict[str, Call], dict[str, Call]]:
    """The clients of part 1 and of part 2, each sending what one run of its policy sent."""
    requests = [
        (ext_id, {"payload": envelope["payload"], "metadata": envelope["metadata"]})
        for ext_id, envelope in zip(
            PIPE_IDS, (msgspec.json.decode(data) for _, data, _ in pipe_sent), strict=True
        )
    ]

    def raw_sequence(sent: list[Sent]) -> Call:
        async def call() -> object:
            for subject, data, headers in sent:
                await nc.request(subject, data, timeout=TIMEOUT_S, headers=headers)
            return None

        return call

    def raw_together(sent: list[Sent]) -> Call:
        async def call() -> object:
            return await asyncio.gather(
                *(nc.request(s, d, timeout=TIMEOUT_S, headers=h) for s, d, h in sent)
            )

        return call

    async def invoke4() -> object:
        for ext_id, request in requests:
            await inv.invoke(ext_id, request, CONTEXT)
        return None

    async def pipe_run() -> object:
        return await inv.run_policy(PIPE, MESSAGE, CONTEXT)

    async def slow_run() -> object:
        return await inv.run_policy(SLOW, MESSAGE, CONTEXT)

    pipe: dict[str, Call] = {
        "nc.request x4": raw_sequence(pipe_sent),
        "invoke x4": invoke4,
        "run_policy": pipe_run,
    }
    slow: dict[str, Call] = {
        "nc.request x1": raw_sequence(slow_sent[:1]),
        "nc.request x3 together": raw_together(slow_sent),
        "run_policy": slow_run,
        "nc.request x3": raw_sequence(slow_sent),
    }
    return pipe, slow


async def pipeline_alone(inv: Invoker, sent: list[Sent], runs: int, rounds: int) -> float:
    """µs per step of the pipeline's own work (median round): `run_policy` of `bench_pipe`
    with `invoke` answering in memory the replies its responders give, so neither NATS nor
    the invoker nor the other process is in the figure (the runner reads `invoker.invoke`
    per run, for this)."""
    replies = {
        "bench_pre": msgspec.json.decode(sent[0][1]),
        "bench_validator": msgspec.json.decode(OK_REPLY),
        "bench_provider": msgspec.json.decode(PROVIDER_REPLY),
        "bench_post": msgspec.json.decode(sent[3][1]),
    }

    async def answer(ext_id: str, request: object, context: object = None) -> dict[str, Any]:
        return replies[ext_id]  # type: ignore[no-any-return]

    async def pipe_run() -> object:
        return await inv.run_policy(PIPE, MESSAGE, CONTEXT)

    setattr(inv, "invoke", answer)  # noqa: B010 - an instance attribute over the method
    try:
        rates = sorted([(await measure(pipe_run, runs, 1))[0] for _ in range(rounds)])
    finally:
        delattr(inv, "invoke")
    return 1e6 / rates[len(rates) // 2] / len(PIPE_IDS)


def report(
    pipe: Medians,
    slow: Medians,
    alone: float,
    runs: int,
    slow_runs: int,
    rounds: int,
) -> None:
    print("\nOne connection (a NatsTransport's), responders in their own process, breaker and")
    print("health on, 1 s timeout everywhere; the raw sides send the envelope bytes and headers")
    print("that one run of the policy sent. Median of", rounds, "alternating rounds.\n")
    print(f"1. {PIPE}: pre -> validator -> provider -> post (4 requests), on echo-like responders;")
    print("   nc.request x4 = the four requests one after the other; invoke x4 = the same four")
    print(
        f"   Invoker.invoke calls. {runs // 4} sequential / {runs} with {IN_FLIGHT} in flight"
        " per round.\n"
    )
    print_rows(TABLE_HEADER, table(pipe, dict.fromkeys(pipe, "nc.request x4"), "run_policy"))
    print(f"\n2. {SLOW}: three validators that each answer after {SLOW_S * 1000:g} ms;")
    print("   nc.request x1 = one of them alone; x3 together = the three at once; x3 = the three")
    print("   one after the other (the original's sequential stage). Base: x1 sequentially (the")
    print(
        f"   stage's latency), x3 together with {IN_FLIGHT} in flight (as many requests at once)."
    )
    print(
        f"   {slow_runs} sequential / {slow_runs * IN_FLIGHT // 4} with {IN_FLIGHT} in flight"
        " per round.\n"
    )
    bases = {
        label: "nc.request x1" if label == "sequential" else "nc.request x3 together"
        for label in slow
    }
    print_rows(TABLE_HEADER, table(slow, bases, "run_policy"))
    print(
        f"\n3. Per-step overhead over a raw request, µs (part 1, time per run / {len(PIPE_IDS)}):"
    )
    print("   sequential: from p50 latencies; in flight: event-loop time (from throughput).\n")
    header = ("mode", "run_policy - raw", "of which invoke - raw", "of which run_policy - invoke")
    print_rows(header, per_step(pipe))
    print(
        f"\n   The pipeline's own work (invoke answered in memory, {runs} sequential runs per"
        f" round): {alone:,.1f} µs per step"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2_400, help="runs in flight per round (part 1)")
    parser.add_argument(
        "--slow-runs", type=int, default=12, help="sequential runs per round (part 2)"
    )
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--quick", action="store_true", help="1,200 runs, 8 slow runs, 3 rounds")
    parser.add_argument("--serve", metavar="URL", help=argparse.SUPPRESS)  # the responders
    args = parser.parse_args()
    if args.serve:
        asyncio.run(serve(args.serve))
        return
    logs.configure("warning")
    if args.quick:
        asyncio.run(run(1_200, 8, 3))
    else:
        asyncio.run(run(args.runs, args.slow_runs, args.rounds))


if __name__ == "__main__":
    main()
