"""Property-based run of every operation in the API's own OpenAPI document (schemathesis)
against a live uvicorn server over a real PostgreSQL: no generated request gets a server error.

The document is generated at import time by the same `create_app` (schemathesis' lazy,
fixture-based loading does not work with pytest 9), and a test checks that the live server's
/openapi.json is exactly that document. Bounded and deterministic: `MAX_EXAMPLES` per
operation, derandomized, no example database. An admin token goes with every request so
generation reaches the handlers, not only the auth check.
"""

from __future__ import annotations

import asyncio
import copy
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import schemathesis
from api_helpers import EchoInvoker, LiveServer, make_tokens, seed
from helpers import make_settings, record
from hypothesis import HealthCheck, settings

from extreg.adapters.migrate import migrate
from extreg.api import create_app
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings
from testsupport.pgprocess import PostgresProcess

MAX_EXAMPLES = 25


@pytest.fixture(scope="module")
def live(
    pg_server: PostgresProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[LiveServer, str]]:
    """A live server with two records and an admin token; (server, token)."""
    tmp = tmp_path_factory.mktemp("schema")
    db_url = pg_server.create_database(f"schema_{uuid.uuid4().hex[:8]}")
    migrate(db_url)
    config = make_settings(tmp, source="database", database_url=db_url)
    asyncio.run(seed(db_url, config, record("alpha"), record("beta", type="post")))
    tokens = asyncio.run(make_tokens(db_url))
    # schemathesis also sends requests without a valid token: lift the failed-auth limit
    with LiveServer(config, invoker=EchoInvoker(), failed_auth_limit=1_000_000) as server:
        yield server, tokens["admin"]


def openapi_document() -> dict[str, Any]:
    """The app's OpenAPI document, built without any I/O."""
    config = Settings.load(environ={}, source="fixtures")
    return create_app(Runtime(config, Registry(config), metrics=Metrics())).openapi()


OPENAPI = openapi_document()
schema = schemathesis.openapi.from_dict(copy.deepcopy(OPENAPI))  # it edits what it gets


def test_the_live_openapi_document_is_the_one_tested(live: tuple[LiveServer, str]) -> None:
    """GET /openapi.json on the live server returns the document the run below is built from."""
    server, token = live
    answer = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {token}"})
    assert OPENAPI == answer.json()


@schema.parametrize()
@settings(
    max_examples=MAX_EXAMPLES,
    derandomize=True,
    database=None,
    deadline=None,
    suppress_health_check=list(HealthCheck),
)
def test_no_generated_request_gets_a_server_error(
    case: schemathesis.Case[Any], live: tuple[LiveServer, str]
) -> None:
    """Every operation, with generated valid and invalid input, answers below 500."""
    server, token = live
    response = case.call(base_url=server.url, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code < 500, (
        f"{case.method} {case.formatted_path} -> {response.status_code}: {response.text[:300]}"
    )
