"""Helpers shared by the admin API tests: tokens, a registry + runtime + app on a real
database, and a live uvicorn server in a background thread (for schemathesis, the CLI and
the dashboard; `InvokingServer` with a real Invoker on NATS, `samples_server` over the sample
extensions).

`EchoInvoker` stands in for the NATS invoker: it uses the real `CircuitBreakers`,
`HealthMonitor` and `PipelineRunner` and answers every call by echoing the request, so the
API's circuit, health, invoke and policy-run routes can be exercised without NATS.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Self, cast

import httpx
import psycopg
import uvicorn
from helpers import make_settings, record

from extreg.adapters.postgres import PostgresSource
from extreg.api import create_app
from extreg.auth import generate_token, hash_token
from extreg.core.breaker import BreakerConfig, CircuitBreakers
from extreg.core.health import HealthMonitor
from extreg.core.model import parse_extension
from extreg.invoke import Invoker, PipelineRunner, PolicyResult
from extreg.local.samples import SAMPLE_EXTENSIONS
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings
from extreg.tokens import TokenStore
from testsupport.pgprocess import free_port

BUNDLED_POLICIES = Path(__file__).parents[1] / "src/extreg/fixtures/policies"
SUPPORT_EN: dict[str, Any] = json.loads((BUNDLED_POLICIES / "support_en.json").read_text("utf-8"))
"""The bundled policy over the samples: pre, validator, provider, post."""
ROLE_TOKENS = {"viewer": "vera-viewer", "operator": "otto-operator", "admin": "ada-admin"}


class EchoInvoker:
    """Real breakers and health; `invoke` echoes payload and metadata (see module docstring);
    `run_policy` runs the registry's policies through the real runner over that echo, once
    `attach` has given it the registry (the helpers below do, as they open one)."""

    def __init__(self) -> None:
        self.breaker = CircuitBreakers(BreakerConfig(enabled=True))
        self.health = HealthMonitor(self.breaker)
        self.calls: list[tuple[str, dict[str, Any], dict[str, Any]]] = []
        self.observer: Any = None  # told what the Invoker's observer is told
        self.pipeline = PipelineRunner(cast(Invoker, self))  # it reads registry and settings
        self.registry: Registry
        self.settings: Settings

    def attach(self, registry: Registry, settings: Settings) -> None:
        self.registry, self.settings = registry, settings

    async def run_policy(
        self, policy_id: str, message: dict[str, Any], context: dict[str, Any] | None = None
    ) -> PolicyResult:
        return await self.pipeline.run(policy_id, message, context)

    async def invoke(
        self, extension_id: str, request: dict[str, Any], context: dict[str, Any]
    ) -> dict[str, Any]:
        self.breaker.check_circuit(extension_id)
        self.calls.append((extension_id, request, context))
        self.health.record(extension_id, True, 1.5)
        self.breaker.record_success(extension_id)
        if self.observer is not None:
            ext = self.registry.lookup(extension_id)
            self.observer(extension_id, ext.type, ext.version, "ok", 0.0015)
        return {"payload": request["payload"], "metadata": request["metadata"]}


@dataclass
class Api:
    """A running API over a real registry: its client, tokens by role, and where things are."""

    client: httpx.AsyncClient
    runtime: Runtime
    tokens: dict[str, str]
    db_url: str | None
    extras: dict[str, Any] = field(default_factory=dict)

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}


async def seed(db_url: str, settings: Settings, *records: dict[str, Any]) -> None:
    """Store records through the database adapter (audited as `test:seed`)."""
    exts = [parse_extension(r, max_timeout_ms=60_000, max_retries=10) for r in records]
    async with PostgresSource(settings) as db:
        await db.import_extensions(exts, "test:seed")


async def make_tokens(db_url: str) -> dict[str, str]:
    """One database token per role, named as in ROLE_TOKENS; returns role -> token."""
    store = TokenStore(db_url)
    return {role: await store.create(name, role, "test") for role, name in ROLE_TOKENS.items()}


@contextlib.asynccontextmanager
async def database_api(
    tmp_path: Path, db_url: str, *, invoker: Any | None = None, **app_options: Any
) -> AsyncIterator[Api]:
    """The API over a database registry holding `alpha` (pre) and `beta` (post, disabled)."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    await seed(db_url, settings, record("alpha"), record("beta", type="post", enabled=False))
    tokens = await make_tokens(db_url)
    async with Registry.open(settings) as registry:
        attach(invoker, registry, settings)
        async with Runtime.open(settings, registry, invoker, metrics=Metrics()) as runtime:
            app = create_app(runtime, **app_options)
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(
                transport=transport, base_url="http://extreg.test"
            ) as client:
                yield Api(client, runtime, tokens, db_url)


def attach(invoker: Any | None, registry: Registry, settings: Settings) -> None:
    """Give an `EchoInvoker` the registry it runs policies of (a real Invoker has its own)."""
    if isinstance(invoker, EchoInvoker):
        invoker.attach(registry, settings)


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


class LiveServer:
    """`extreg`'s API on uvicorn in a background thread with its own event loop, on a free
    port; the registry and runtime are opened inside that loop. Use as a context manager."""

    def __init__(
        self, settings: Settings, *, invoker: Any | None = None, **app_options: Any
    ) -> None:
        self.settings = settings
        self.invoker = invoker
        self.app_options = app_options
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._server: uvicorn.Server | None = None
        self._thread = threading.Thread(target=self._run, name="extreg-live", daemon=True)

    def __enter__(self) -> Self:
        self._thread.start()
        if not self._ready.wait(30) or self._error is not None:
            raise RuntimeError(f"live server did not start: {self._error!r}")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._serve())
        except BaseException as exc:
            self._error = exc
            self._ready.set()

    async def _serve(self) -> None:
        async with Registry.open(self.settings) as registry:
            await self._serve_with(registry, self.invoker)

    async def _serve_with(self, registry: Registry, invoker: Any | None) -> None:
        attach(invoker, registry, self.settings)
        async with Runtime.open(self.settings, registry, invoker, metrics=Metrics()) as runtime:
            config = uvicorn.Config(
                create_app(runtime, **self.app_options),
                host="127.0.0.1",
                port=self.port,
                log_config=None,
                access_log=False,
                lifespan="off",
            )
            self._server = uvicorn.Server(config)
            task = asyncio.create_task(self._server.serve())
            while not self._server.started:
                if task.done():
                    task.result()
                await asyncio.sleep(0.01)
            self._ready.set()
            await task


@contextlib.contextmanager
def live_server(settings: Settings, **options: Any) -> Iterator[LiveServer]:
    with LiveServer(settings, **options) as server:
        yield server


class InvokingServer(LiveServer):
    """A live server whose runtime carries a real Invoker, opened in the server's own loop,
    so invocations and policy runs go out on NATS."""

    async def _serve(self) -> None:
        async with (
            Registry.open(self.settings) as registry,
            Invoker.open(registry, self.settings) as invoker,
        ):
            await self._serve_with(registry, invoker)


async def samples_server(
    tmp_path: Path, db_url: str, nats_url: str, **values: Any
) -> tuple[InvokingServer, dict[str, str]]:
    """An `InvokingServer` (not started: use it as a context manager) on NATS at `nats_url`
    over a database holding the sample extensions, with a token per role. `values` are
    settings over these: circuit breakers on."""
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=db_url,
        nats_url=nats_url,
        **{"circuit_breaker_enabled": True, **values},
    )
    await seed(db_url, settings, *(s.record() for s in SAMPLE_EXTENSIONS))
    return InvokingServer(settings), await make_tokens(db_url)


def admin_token_file(tmp_path: Path) -> tuple[Path, str]:
    """A tokens file (`api_tokens_file`, what a registry on fixtures authenticates with)
    holding one admin token, `root`; (the file, the token)."""
    token = generate_token()
    file = tmp_path / "tokens.json"
    file.write_text(
        json.dumps({"tokens": {"root": {"role": "admin", "sha256": hash_token(token)}}}),
        encoding="utf-8",
    )
    return file, token


def policy_audit(db_url: str, policy_id: str) -> list[tuple[str, str]]:
    """(action, changed_by) of a policy's audit rows (its `policy_*` actions), oldest first."""
    rows = sql(
        db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = %s AND starts_with(action, 'policy_') ORDER BY changed_at, id",
        (policy_id,),
    )
    return [(r[0], r[1]) for r in rows]
