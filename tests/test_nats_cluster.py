"""A NATS cluster under the invoker: `nats_url` lists three servers routed to each other
(`testsupport.natscluster`), the sample extensions serve on it, and members die while eight
callers invoke `echo` in a loop.

What is promised when a member dies (SPEC, "Scale: past one machine"; docs/usage.md, "NATS
clusters"):
(a) calls succeed again, through the other members, without a new invoker; (b) no call waits
past its own timeout (each call is timed; the margin covers loop scheduling on a busy
machine, the tests never bound the gap itself); (c) the calls that fail meanwhile fail with
extreg's errors (the link is down, no reply in time, nobody subscribed yet), never a nats-py
exception. The sample extensions' own connection survives the same way, in-process (where its
nats-py client can be read) and as the `extreg sample-extensions --nats-url a,b,c` process.
A member that hangs (SIGSTOP) is left once its PINGs go unanswered; credentials in the URLs
reach every member, those nats-py discovers too.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from invoke_helpers import fixture_settings, open_invoker

from extreg import ExtensionTimeout, InvocationError, MaxRetriesExceeded
from extreg.adapters import nats as nats_adapter
from extreg.adapters.nats import RECONNECT_WAIT_S, servers_and_credentials
from extreg.errors import ExtensionError, TransportUnavailable
from extreg.invoke import Invoker
from extreg.invoke.invoker import BACKOFF_CAP_S
from extreg.local.samples import SAMPLES_BY_ID, SampleRunner
from testsupport.cluster import _clean_environment, _spawn, _stop_process, _tail
from testsupport.natscluster import NatsCluster

CALLERS = 8
PAUSE_S = 0.005  # between one caller's calls: the callers must not starve the loop
MARGIN_S = 1.0  # loop scheduling on a busy machine, on top of a call's own time limit
RESUME_DEADLINE_S = 30.0  # generous: only calls that never resume reach it
SUCCESSES_AFTER = 20  # successful calls, after the kill, that show calls go on
# nats-py waits `reconnect_time_wait` before retrying a server it tried (or connected to) that
# recently; connections of a few milliseconds are not what a member's death meets in
# production, so calls run this long before a kill.
SETTLE_S = 2 * RECONNECT_WAIT_S
INVOKER = "extreg-invoker"  # the connection names the servers list in /connz
SAMPLES = "extreg-sample-extensions"
ECHO = SAMPLES_BY_ID["echo"]
CONTEXT = {"trace_id": "t-cluster", "tenant_id": "acme"}


def time_limit_s() -> float:
    """The longest a call of `echo` may take: every attempt's timeout and the backoffs."""
    attempts = 1 + ECHO.retry
    return attempts * ECHO.timeout_ms / 1000 + ECHO.retry * BACKOFF_CAP_S * 1.5


@dataclass
class Call:
    started: float
    seconds: float
    error: BaseException | None


@dataclass
class Callers:
    """`CALLERS` tasks invoking `echo` in a loop; every call is kept, timed."""

    inv: Invoker
    calls: list[Call] = field(default_factory=list)

    async def run(self, n: int) -> None:
        payload = {"payload": {"n": n}}
        while True:
            started = time.monotonic()
            error: BaseException | None = None
            try:
                reply = await self.inv.invoke("echo", payload, CONTEXT)
                assert reply["payload"] == {"n": n}
            except Exception as exc:  # every one is judged by check_errors
                error = exc
            self.calls.append(Call(started, time.monotonic() - started, error))
            await asyncio.sleep(PAUSE_S)

    def ok_since(self, moment: float) -> list[Call]:
        """The successful calls that started at or after `moment`."""
        return [c for c in self.calls if c.error is None and c.started >= moment]

    async def resumed(self, moment: float) -> float:
        """Wait until `SUCCESSES_AFTER` calls started after `moment` have succeeded; the
        seconds from `moment` to the end of the first of them (the gap the callers saw)."""
        deadline = time.monotonic() + RESUME_DEADLINE_S
        while len(self.ok_since(moment)) < SUCCESSES_AFTER:
            assert time.monotonic() < deadline, (
                f"calls did not resume within {RESUME_DEADLINE_S} s; last errors: "
                f"{[repr(c.error) for c in self.calls[-5:]]}"
            )
            await asyncio.sleep(0.01)
        first = min(self.ok_since(moment), key=lambda c: c.started + c.seconds)
        return first.started + first.seconds - moment

    async def flowing(self) -> None:
        """Wait until calls succeed, then `SETTLE_S` more: the state before a kill."""
        await self.resumed(time.monotonic())
        await asyncio.sleep(SETTLE_S)

    def summary(self) -> str:
        """How many calls, and the failures by class, for the printed figures."""
        failed = Counter(type(c.error).__name__ for c in self.calls if c.error is not None)
        return f"{len(self.calls)} calls, failed: {dict(failed) or 0}"

    def check(self) -> None:
        """(b) and (c) over every call made so far."""
        assert self.calls
        limit = time_limit_s() + MARGIN_S
        slowest = max(self.calls, key=lambda c: c.seconds)
        assert slowest.seconds <= limit, f"a call took {slowest.seconds:.3f} s: {slowest}"
        for call in self.calls:
            if call.error is not None:
                assert_clear(call.error)


def assert_clear(error: BaseException) -> None:
    """(c): one of extreg's errors, and one that says what happened to NATS."""
    assert type(error).__module__ == "extreg.errors", repr(error)
    assert isinstance(error, ExtensionError), repr(error)
    if isinstance(error, TransportUnavailable | ExtensionTimeout | MaxRetriesExceeded):
        return
    # The samples' server died: until they are back on another member nobody listens.
    assert type(error) is InvocationError, repr(error)
    assert error.reason == f"no responders on {ECHO.subject}", repr(error)


@contextlib.asynccontextmanager
async def calling(inv: Invoker) -> AsyncIterator[Callers]:
    """The callers, running for the duration."""
    callers = Callers(inv)
    tasks = [asyncio.create_task(callers.run(n), name=f"caller-{n}") for n in range(CALLERS)]
    try:
        yield callers
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@contextlib.contextmanager
def samples_in_thread(url: str) -> Iterator[SampleRunner]:
    """The sample extensions on `url`, on an event loop of their own in a thread (as the
    `sample_extensions` fixture runs them), so their nats-py client can be read."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="cluster-samples", daemon=True)
    thread.start()
    runner = SampleRunner(url)
    try:
        asyncio.run_coroutine_threadsafe(runner.start(), loop).result(RESUME_DEADLINE_S)
        yield runner
    finally:  # stopped even when the test failed: no nats-py task left on a closed loop
        asyncio.run_coroutine_threadsafe(runner.stop(), loop).result(RESUME_DEADLINE_S)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(RESUME_DEADLINE_S)
        loop.close()


async def first_call(inv: Invoker) -> None:
    """Wait until `echo` answers: the samples' subscriptions have crossed the routes."""
    deadline = time.monotonic() + RESUME_DEADLINE_S
    while True:
        try:
            await inv.invoke("echo", {"payload": "hi"}, CONTEXT)
            return
        except (InvocationError, ExtensionTimeout):
            assert time.monotonic() < deadline, "echo never answered on the cluster"
            await asyncio.sleep(0.05)


async def serving(cluster: NatsCluster, client: str) -> int:
    """The one member the client named `client` is connected to (waits out a move)."""
    deadline = time.monotonic() + RESUME_DEADLINE_S
    while len(members := await asyncio.to_thread(cluster.serving, client)) != 1:
        assert time.monotonic() < deadline, f"{client} is connected to {members}"
        await asyncio.sleep(0.05)
    return members[0]


@pytest.fixture
async def cluster() -> AsyncIterator[NatsCluster]:
    async with NatsCluster(3) as nats_cluster:
        yield nats_cluster


# -- tests ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "servers", "credentials"),
    [
        ("nats://a:1", ["nats://a:1"], {}),
        ("nats://a:1, nats://b:2,", ["nats://a:1", "nats://b:2"], {}),
        ("nats://u:p@a:1,nats://u:p@b:2", ["nats://a:1", "nats://b:2"],
         {"user": "u", "password": "p"}),
        ("nats://tok@a:1,nats://b:2", ["nats://a:1", "nats://b:2"], {"token": "tok"}),
        ("nats://u:p@a:1,nats://v:q@b:2", ["nats://u:p@a:1", "nats://v:q@b:2"], {}),
        ("tls://u:p%40x@a:1", ["tls://a:1"], {"user": "u", "password": "p%40x"}),
    ],
)  # fmt: skip
def test_server_lists(url: str, servers: list[str], credentials: dict[str, str]) -> None:
    """A `nats_url` becomes nats-py's server list; one set of credentials in the URLs becomes
    connect options sent to every server (taken verbatim, as nats-py takes a URL's)."""
    assert (servers, credentials) == servers_and_credentials(url)


async def test_the_cluster_url_is_a_server_list(cluster: NatsCluster) -> None:
    """`nats_url` with the three members becomes nats-py's list of three servers."""
    servers, credentials = servers_and_credentials(cluster.url)
    assert cluster.urls == servers
    assert {} == credentials
    assert [0, 1, 2] == cluster.running
    assert cluster.routed()


async def test_calls_go_on_when_the_invokers_server_dies(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    """Kill the member the invoker is connected to, with eight callers running: calls resume
    through another member, none waits past its timeout, every failure is extreg's. The
    samples' connection, on whichever member, is still up afterwards."""
    settings = fixture_settings(tmp_path, cluster.url)
    with samples_in_thread(cluster.url) as samples:
        async with open_invoker(settings) as inv:
            await first_call(inv)
            victim = await serving(cluster, INVOKER)
            async with calling(inv) as callers:
                await callers.flowing()
                await cluster.akill(victim)
                killed = time.monotonic()
                gap = await callers.resumed(killed)
            callers.check()
            assert inv.connected
            assert victim not in await asyncio.to_thread(cluster.serving, INVOKER)
            assert samples.connection.is_connected
            assert cluster.index_of(samples.connection.connected_url) in cluster.running
        print(f"\ninvoker's server killed: first success {gap * 1000:.0f} ms after the kill; "
              f"{callers.summary()}")  # fmt: skip


async def test_calls_go_on_when_the_samples_server_dies(
    tmp_path: Path, cluster: NatsCluster
) -> None:
    """Kill the member the sample extensions are connected to: their connection moves to
    another member (it is not closed), and the invoker's calls resume through it."""
    settings = fixture_settings(tmp_path, cluster.url)
    with samples_in_thread(cluster.url) as samples:
        async with open_invoker(settings) as inv:
            await first_call(inv)
            victim = cluster.index_of(samples.connection.connected_url)
            reconnects = samples.connection.stats["reconnects"]
            async with calling(inv) as callers:
                await callers.flowing()
                await cluster.akill(victim)
                killed = time.monotonic()
                gap = await callers.resumed(killed)
            callers.check()
            nc = samples.connection
            assert nc.is_connected
            assert not nc.is_closed
            assert nc.stats["reconnects"] == reconnects + 1
            assert cluster.index_of(nc.connected_url) in cluster.running
            assert inv.connected
        print(f"\nsamples' server killed: first success {gap * 1000:.0f} ms after the kill; "
              f"{callers.summary()}")  # fmt: skip


async def test_a_restarted_server_serves_again(tmp_path: Path, cluster: NatsCluster) -> None:
    """The sample extensions run as `extreg sample-extensions --nats-url a,b,c`. Kill the
    invoker's member (calls resume), start it again on the same ports, then kill the two
    others: invoker and samples can only go on through the restarted one, and do."""
    log_path = tmp_path / "samples.log"
    proc = _spawn(
        ["sample-extensions", "--nats-url", cluster.url], log_path, _clean_environment({})
    )
    try:
        settings = fixture_settings(tmp_path, cluster.url)
        async with open_invoker(settings) as inv:
            await first_call(inv)
            first = await serving(cluster, INVOKER)
            async with calling(inv) as callers:
                await callers.flowing()
                await cluster.akill(first)
                gap = await callers.resumed(time.monotonic())
                await cluster.astart(first)  # same ports; routed again on return
                assert [0, 1, 2] == cluster.running
                await callers.flowing()
                for other in [i for i in range(3) if i != first]:
                    await cluster.akill(other)
                back = await callers.resumed(time.monotonic())
                assert [first] == cluster.running
                assert [first] == await serving_all(cluster, INVOKER, SAMPLES)
            callers.check()
        assert proc.poll() is None, f"the samples process ended:\n{_tail(log_path)}"
    finally:
        _stop_process(proc)
    print(f"\nrestart: first success {gap * 1000:.0f} ms after the invoker's server died, "
          f"{back * 1000:.0f} ms after the two others died (restarted one left); "
          f"{callers.summary()}")  # fmt: skip


async def serving_all(cluster: NatsCluster, *clients: str) -> list[int]:
    """The member each client is connected to, once each is on exactly one."""
    found = {await serving(cluster, client) for client in clients}
    return sorted(found)


# nats-py drops, unclosed, the socket of a connection whose INFO never came (a frozen member
# accepts TCP but says nothing); the garbage collector closes it, with this warning.
@pytest.mark.filterwarnings("ignore:unclosed <StreamWriter:ResourceWarning")
async def test_calls_go_on_when_the_invokers_server_hangs(
    tmp_path: Path, cluster: NatsCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Freeze (SIGSTOP) the invoker's member, the samples being on another: nothing is closed,
    so calls time out on it (never past their timeout) until unanswered PINGs make nats-py
    leave it; then calls resume through another member. The PING interval is 1 s here (5 s in
    production, where leaving takes 10 to 15 s)."""
    monkeypatch.setattr(nats_adapter, "PING_INTERVAL_S", 1)
    settings = fixture_settings(tmp_path, cluster.url)
    async with open_invoker(settings) as inv:
        victim = await serving(cluster, INVOKER)
        others = ",".join(url for i, url in enumerate(cluster.urls) if i != victim)
        with samples_in_thread(others):  # first connects to one of these
            await first_call(inv)
            async with calling(inv) as callers:
                await callers.flowing()
                await cluster.afreeze(victim)
                gap = await callers.resumed(time.monotonic())
            callers.check()
            assert inv.connected
    gc.collect()  # the sockets nats-py dropped are closed here, under this test's filter
    timeouts = sum(isinstance(c.error, ExtensionTimeout) for c in callers.calls)
    assert timeouts, "calls on the frozen member should have waited out their timeout"
    print(f"\ninvoker's server frozen: first success {gap * 1000:.0f} ms after the freeze "
          f"(1 s pings); {callers.summary()}")  # fmt: skip


async def test_credentials_reach_every_member() -> None:
    """With a user and password in every URL, the connection sends them to every member,
    those nats-py discovers too (it would send a URL's user part to that server only): the
    pool holds each member once, and moving from member to member meets no refusal."""
    auth = ("--user", "extreg", "--pass", "s3cret")
    async with NatsCluster(3, extra_args=auth) as secured:
        url = ",".join(u.replace("nats://", "nats://extreg:s3cret@") for u in secured.urls)
        errors: list[str] = []

        async def on_error(exc: Exception) -> None:
            errors.append(repr(exc))

        nc = await nats_adapter.connect(url, "extreg-test", error_cb=on_error)
        try:
            assert sorted(secured.urls) == sorted(u.geturl() for u in nc.servers)
            for _ in range(3):
                victim = secured.index_of(nc.connected_url)
                await secured.akill(victim)
                deadline = time.monotonic() + RESUME_DEADLINE_S
                while not nc.is_connected or secured.index_of(nc.connected_url) == victim:
                    assert time.monotonic() < deadline, f"no reconnect: {errors}"
                    await asyncio.sleep(0.01)
                await nc.flush()
                await secured.astart(victim)
        finally:
            await nc.close()
        assert not [e for e in errors if "Authorization" in e]
