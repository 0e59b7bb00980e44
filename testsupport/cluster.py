"""Several `extreg serve` processes on one database: the harness of the multi-node tests and
of the load run (`bench/load.py`).

Why: the registry's promises that matter most in production are about *several* processes
sharing one PostgreSQL: a write on one node reaches the others' caches, health written by all
of them adds up exactly, and every node keeps serving from its cache while the database is
away. Those can only be shown with real processes, so `Cluster` starts them:

- one throwaway PostgreSQL (`PostgresProcess`, which can be stopped and started on the same
  port) holding a migrated database with the sample extensions imported and API tokens made;
- one private NATS server (`NatsServer`) and the sample extensions served once, in their own
  process (`extreg sample-extensions --nats-url ...`), so their work never shares the event
  loop of whoever drives the cluster;
- N nodes (default 3): `extreg serve --port P` each with its own port, data folder and log,
  all pointed by environment at the same database and NATS server (`source = database`). Each
  process names its own health writes (`node_id` = host, pid, random suffix), so the nodes'
  health batches never collide.

Everything is loopback only, and everything started here is stopped on exit (SIGTERM, then
SIGKILL after a grace period; also at interpreter exit if the context was never left).

    async with Cluster(nodes=3) as cluster:
        a, b, c = cluster.nodes
        await a.client.patch("/admin/extensions/echo", json={"timeout_ms": 900})
        (await b.client.get("/admin/extensions/echo")).json()["timeout_ms"]
        await cluster.flaky(failure_rate=0.3)          # the flaky sample's control subject
        cluster.pg.stop(); cluster.pg.start()          # the database away and back

Node clients (`node.client`) are `httpx.AsyncClient`s with the admin token; `cluster.tokens`
holds a token per role.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx
import msgspec
import nats
import psycopg
from nats.aio.client import Client as NatsClient
from prometheus_client.parser import text_string_to_metric_families

from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLE_EXTENSIONS
from extreg.local.samples.extensions import FLAKY_CONTROL_SUBJECT
from extreg.settings import ENV_PREFIX, Settings
from extreg.tokens import TokenStore
from testsupport.pgprocess import PostgresProcess, free_port

DEFAULT_NODES = 3
DATABASE = "extreg"
ACTOR = "cluster:setup"
TOKEN_NAMES = {"viewer": "cluster-viewer", "operator": "cluster-operator", "admin": "cluster-admin"}
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 10.0
# Health reaches the database (and so the other nodes) within half a second; record changes
# travel by notification, the periodic sync is only the safety net.
BASE_SETTINGS: dict[str, Any] = {
    "health_flush_interval_seconds": 0.5,
    "sync_interval_seconds": 30,
}

_live: set[subprocess.Popen[bytes]] = set()  # children to kill if the interpreter exits early


@atexit.register
def _kill_leftovers() -> None:
    for proc in list(_live):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait(5)


class ClusterError(RuntimeError):
    """A process of the cluster did not start or answer; the message carries its log tail."""


def _extreg_command() -> list[str]:
    """The `extreg` command of this environment (the venv's script, else this Python)."""
    script = Path(sys.executable).parent / "extreg"
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-c", "from extreg.cli import main; main()"]


def _clean_environment(extra: Mapping[str, str]) -> dict[str, str]:
    """This process's environment without any extreg setting, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith((ENV_PREFIX, "EXTREG_"))}
    env.update(extra)
    return env


def _spawn(args: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`extreg ARGS` in its own session (a Ctrl-C meant for the caller does not reach it, the
    harness stops it), output appended to `log_path`; remembered for the exit handler."""
    with log_path.open("ab") as log_file:
        proc = subprocess.Popen(
            [*_extreg_command(), *args],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    _live.add(proc)
    return proc


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _stop_process(proc: subprocess.Popen[bytes], grace_s: float = STOP_GRACE_S) -> int | None:
    """SIGTERM, wait up to `grace_s`, then SIGKILL; the exit status (None if it would not die)."""
    try:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        return proc.returncode
    except (OSError, subprocess.TimeoutExpired):
        return None
    finally:
        _live.discard(proc)


def rss_bytes(pid: int) -> int | None:
    """Resident memory of a process, from /proc (Linux); None when it is gone or unknown."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text → {(sample name, sorted labels): value}."""
    found: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


@dataclass
class Node:
    """One `extreg serve` process of the cluster."""

    index: int
    port: int
    data_dir: Path
    log_path: Path
    token: str
    proc: subprocess.Popen[bytes] | None = None
    client: httpx.AsyncClient = field(init=False)

    def __post_init__(self) -> None:
        self.client = self._new_client()

    def _new_client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(
            base_url=self.url, timeout=10.0, headers={"Authorization": f"Bearer {self.token}"}
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def name(self) -> str:
        return f"node{self.index}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def alive(self) -> bool:
        return self.pid is not None

    def rss(self) -> int | None:
        """Resident memory in bytes (None when not running)."""
        pid = self.pid
        return None if pid is None else rss_bytes(pid)

    def log_tail(self, lines: int = 30) -> str:
        return _tail(self.log_path, lines)

    def log_events(self) -> list[dict[str, Any]]:
        """The node's structured log lines (JSON; other lines are skipped)."""
        events = []
        with contextlib.suppress(OSError):
            for line in self.log_path.read_bytes().splitlines():
                with contextlib.suppress(msgspec.DecodeError):
                    event = msgspec.json.decode(line)
                    if isinstance(event, dict):
                        events.append(event)
        return events

    async def metrics(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The node's /metrics, parsed (see `parse_metrics`)."""
        response = await self.client.get("/metrics")
        response.raise_for_status()
        return parse_metrics(response.text)

    async def wait_ready(self, timeout_s: float = START_TIMEOUT_S) -> None:
        """Until /readyz answers 200; `ClusterError` with the log tail if it never does."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if (await self.client.get("/readyz", timeout=1.0)).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc is None or self.proc.poll() is not None:
                raise ClusterError(f"{self.name} exited while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} not ready after {timeout_s} s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)


class Cluster:
    """N `extreg serve` nodes on one PostgreSQL and one NATS server (see the module docstring).

    `settings` are extra registry settings for every node (keys as in `Settings`, e.g.
    `circuit_breaker_enabled=True`), passed as `EXTENSION_REGISTRY_*` environment variables.
    `workdir` keeps the logs and data folders there (else a temporary folder, removed on exit
    unless startup failed). `samples=False` leaves the sample extensions out.
    """

    def __init__(
        self,
        nodes: int = DEFAULT_NODES,
        *,
        settings: Mapping[str, Any] | None = None,
        workdir: Path | None = None,
        samples: bool = True,
    ) -> None:
        if nodes < 1:
            raise ValueError("a cluster needs at least one node")
        self.size = nodes
        self.settings = {**BASE_SETTINGS, **(settings or {})}
        Settings.load(environ={}, **self.settings)  # a bad key or value fails here, clearly
        self._own_workdir = workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="extreg-cluster-")) if workdir is None else workdir
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.with_samples = samples
        self.pg: PostgresProcess | None = None
        self.nats: NatsServer | None = None
        self.db_url = ""
        self.tokens: dict[str, str] = {}
        self.nodes: list[Node] = []
        self.samples_proc: subprocess.Popen[bytes] | None = None
        self.nc: NatsClient | None = None
        self.startup_s: float | None = None

    # -- lifecycle ------------------------------------------------------------------------

    async def __aenter__(self) -> Self:
        started = time.monotonic()
        try:
            await self._start()
        except BaseException:
            await self.aclose(keep_workdir=True)
            raise
        self.startup_s = time.monotonic() - started
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose(keep_workdir=exc is not None)

    async def _start(self) -> None:
        self.pg = PostgresProcess()
        await asyncio.to_thread(self.pg.start)
        self.db_url = await asyncio.to_thread(self.pg.create_database, DATABASE)
        await asyncio.to_thread(migrate, self.db_url)
        await self._import_samples()
        store = TokenStore(self.db_url)
        self.tokens = {
            role: await store.create(name, role, ACTOR) for role, name in TOKEN_NAMES.items()
        }
        self.nats = NatsServer()
        await self.nats.astart()
        if self.with_samples:
            await self._start_samples()
        for index in range(self.size):
            data_dir = self.workdir / f"node{index}"
            data_dir.mkdir(exist_ok=True)
            self.nodes.append(
                Node(
                    index,
                    free_port(),
                    data_dir,
                    self.workdir / f"node{index}.log",
                    self.tokens["admin"],
                )
            )
        for node in self.nodes:
            self._launch(node)
        await asyncio.gather(*(node.wait_ready() for node in self.nodes))

    async def aclose(self, *, keep_workdir: bool = False) -> None:
        """Stop everything this cluster started, nodes first; safe to call twice."""
        for node in self.nodes:
            await node.client.aclose()
        procs = [n.proc for n in self.nodes if n.proc is not None]
        await asyncio.gather(*(asyncio.to_thread(_stop_process, p) for p in procs))
        for node in self.nodes:
            node.proc = None
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
            self.nc = None
        if self.samples_proc is not None:
            await asyncio.to_thread(_stop_process, self.samples_proc)
            self.samples_proc = None
        if self.nats is not None:
            await self.nats.astop()
            self.nats = None
        if self.pg is not None:
            await asyncio.to_thread(self.pg.cleanup)
            self.pg = None
        if self._own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)

    # -- nodes ----------------------------------------------------------------------------

    def node_environment(self, node: Node) -> dict[str, str]:
        """The environment of one node's `extreg serve`."""
        assert self.nats is not None
        values = {
            "source": "database",
            "database_url": self.db_url,
            "nats_url": self.nats.url,
            "data_dir": str(node.data_dir),
            **self.settings,
        }
        return _clean_environment(
            {ENV_PREFIX + key.upper(): _env_value(value) for key, value in values.items()}
        )

    def _launch(self, node: Node) -> None:
        node.proc = _spawn(
            ["serve", "--host", "127.0.0.1", "--port", str(node.port)],
            node.log_path,
            self.node_environment(node),
        )

    async def stop_node(self, index: int, sig: int = signal.SIGTERM) -> int | None:
        """Stop one node (`sig` = SIGKILL for a crash); its exit status."""
        node = self.nodes[index]
        proc, node.proc = node.proc, None
        if proc is None:
            return None
        if sig != signal.SIGTERM and proc.poll() is None:
            proc.send_signal(sig)
        return await asyncio.to_thread(_stop_process, proc)

    async def start_node(self, index: int) -> Node:
        """(Re)start a stopped node on its port and data folder, and wait until it is ready."""
        node = self.nodes[index]
        if node.alive:
            return node
        await node.client.aclose()
        node.client = node._new_client()
        self._launch(node)
        await node.wait_ready()
        return node

    # -- database and samples -------------------------------------------------------------

    async def _import_samples(self) -> None:
        settings = Settings.load(environ={}, source="database", database_url=self.db_url)
        records = [
            parse_extension(
                s.record(),
                max_timeout_ms=settings.extension_max_timeout_ms,
                max_retries=settings.extension_max_retries,
            )
            for s in SAMPLE_EXTENSIONS
        ]
        async with PostgresSource(settings) as db:
            await db.import_extensions(records, ACTOR)

    async def query(self, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one SQL statement on the cluster's database (autocommit); its rows."""
        async with await psycopg.AsyncConnection.connect(
            self.db_url, autocommit=True, connect_timeout=3
        ) as conn:
            cur = await conn.execute(statement, params)
            return list(await cur.fetchall()) if cur.description else []

    async def _start_samples(self) -> None:
        assert self.nats is not None
        log_path = self.workdir / "samples.log"
        self.samples_proc = _spawn(
            ["sample-extensions", "--nats-url", self.nats.url], log_path, _clean_environment({})
        )
        self.nc = await nats.connect(self.nats.url, name="extreg-cluster", connect_timeout=2)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:  # the control subject answers once every sample is subscribed
            try:
                await self.flaky(reset=True, timeout_s=0.5)
                return
            except (nats.errors.Error, TimeoutError):
                pass
            if self.samples_proc.poll() is not None or time.monotonic() > deadline:
                raise ClusterError(f"sample extensions did not start:\n{_tail(log_path)}")
            await asyncio.sleep(0.05)

    async def flaky(self, *, timeout_s: float = 2.0, **control: Any) -> dict[str, Any]:
        """Send a control request to the `flaky` sample (`failure_rate=0.3`, `delay_ms`,
        `failure_mode`, `seed`, `reset`; nothing reads its state) and return its answer."""
        if self.nc is None:
            raise ClusterError("the sample extensions are not running")
        reply = await self.nc.request(
            FLAKY_CONTROL_SUBJECT, msgspec.json.encode(control), timeout=timeout_s
        )
        answer: dict[str, Any] = msgspec.json.decode(reply.data)
        if not answer.get("ok"):
            raise ClusterError(f"flaky control refused {control}: {answer.get('error')}")
        return answer
