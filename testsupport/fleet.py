"""A fleet of registry nodes in one process: the harness of the scale tests and of
`bench/bench_fleet.py`.

Why in one process: the properties of a fleet (one publisher, every node sees every change,
how many database connections the fleet holds, what happens when the publisher dies) are
about each node's own connections and tasks, not about processes; forty `extreg serve`
processes would cost a 2-core machine a minute to start and most of its memory. Each node is
a `Registry` (and, when asked, an `Invoker` with its health flusher) with its own PostgreSQL
pool and listener and its own NATS connections, exactly as in a process of its own. Each
node's database sessions carry `application_name=<name>`, so `connections()` tells them apart.

    async with Fleet(settings_for, size=40) as fleet:
        await fleet.wait_publisher()
        publisher = fleet.publisher
        await publisher.database.upsert_extension(record, "test")
        await fleet.wait(lambda node: node.get("x") is not None)
        fleet.connections()                      # {"node-0": 2, "node-7": 0, ...}

For PostgreSQL primary/standby pairs see `testsupport.pgha`; for NATS clusters
`testsupport.natscluster`; `testsupport.cluster` runs `extreg serve` processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg

from extreg import Registry
from extreg.invoke import Invoker
from extreg.settings import Settings

DEADLINE_S = 60.0  # generous: fails only what never happens


def with_application_name(url: str, name: str) -> str:
    """`url` with `application_name=<name>` among its query parameters."""
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query) if k != "application_name"]
    return urlunsplit(parts._replace(query=urlencode([*query, ("application_name", name)])))


@dataclass
class Node:
    name: str
    registry: Registry
    invoker: Invoker | None
    stack: contextlib.AsyncExitStack

    async def stop(self) -> None:
        await self.stack.aclose()


class Fleet:
    """`size` nodes built from `settings_for(name, database_url)`; see the module docstring."""

    def __init__(
        self,
        settings_for: Callable[[str, str], Settings],
        database_url: str,
        *,
        size: int,
        invokers: bool = False,
    ) -> None:
        self.settings_for = settings_for
        self.database_url = database_url
        self.size = size
        self.invokers = invokers
        self.nodes: list[Node] = []

    async def __aenter__(self) -> Self:
        try:
            started = await asyncio.gather(
                *(self.start_node(f"node-{i}") for i in range(self.size))
            )
        except BaseException:
            await self.aclose()
            raise
        self.nodes = list(started)
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        nodes, self.nodes = self.nodes, []
        await asyncio.gather(*(node.stop() for node in nodes), return_exceptions=True)

    async def start_node(self, name: str) -> Node:
        settings = self.settings_for(name, with_application_name(self.database_url, name))
        stack = contextlib.AsyncExitStack()
        try:
            registry = await stack.enter_async_context(Registry.open(settings))
            invoker = None
            if self.invokers:
                invoker = await stack.enter_async_context(
                    Invoker.open(registry, settings, node_id=name)
                )
        except BaseException:
            await stack.aclose()
            raise
        return Node(name, registry, invoker, stack)

    async def add_node(self) -> Node:
        node = await self.start_node(f"node-{len(self.nodes)}")
        self.nodes.append(node)
        return node

    @property
    def registries(self) -> list[Registry]:
        return [node.registry for node in self.nodes]

    @property
    def publishers(self) -> list[Node]:
        return [node for node in self.nodes if node.registry.feed_role == "publisher"]

    @property
    def publisher(self) -> Node:
        [node] = self.publishers
        return node

    async def wait_publisher(self, timeout: float = DEADLINE_S) -> Node:
        await self.wait_until(lambda: len(self.publishers) == 1, timeout)
        return self.publisher

    async def wait(
        self, condition: Callable[[Registry], bool], timeout: float = DEADLINE_S
    ) -> None:
        """Until `condition(registry)` holds on every node."""
        await self.wait_until(lambda: all(condition(r) for r in self.registries), timeout)

    @staticmethod
    async def wait_until(condition: Callable[[], bool], timeout: float = DEADLINE_S) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not met within {timeout} s")
            await asyncio.sleep(0.02)

    def connections(self) -> dict[str, int]:
        """Database sessions per application name (each node's name), this one's left out."""
        with psycopg.connect(self.database_url, autocommit=True) as conn:
            rows = conn.execute(
                "SELECT application_name, count(*) FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
                " GROUP BY application_name"
            ).fetchall()
        return {name: int(count) for name, count in rows}
