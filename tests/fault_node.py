"""Helpers of the fault-injection tests (test_faults.py): an `extreg serve` node as a
subprocess that can be SIGKILLed and started again on the same data folder, tiny NATS
responders that misbehave on purpose, and small database probes.

A node is `extreg --database-url URL serve --port N`, configured through the environment
(`EXTENSION_REGISTRY_*`) so nothing of the machine's own settings leaks in. It authenticates
API calls with an operator token from a tokens file, so it answers even while the database is
down. Its stderr (JSON log lines) is kept in one file across restarts.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
from nats.aio.client import Client
from nats.aio.msg import Msg

from extreg.adapters.nats import subscriptions_active
from extreg.auth import generate_token, hash_token
from testsupport.pgprocess import free_port

EXTREG = Path(sys.executable).parent / "extreg"
START_TIMEOUT_S = 30.0


class Node:
    """One `extreg serve` process on a fixed port and data folder (see the module docstring)."""

    def __init__(self, folder: Path, db_url: str, nats_url: str, **settings: Any) -> None:
        self.folder = folder
        self.db_url = db_url
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.data_dir = folder / "data"
        self.stderr_path = folder / "node.err"
        self.token = generate_token()
        tokens_file = folder / "tokens.json"
        folder.mkdir(parents=True, exist_ok=True)
        tokens_file.write_text(
            json.dumps(
                {"tokens": {"faults": {"role": "operator", "sha256": hash_token(self.token)}}}
            )
        )
        self.env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
        }
        self.env.update(
            {
                "EXTENSION_REGISTRY_SOURCE": "database",
                "EXTENSION_REGISTRY_NATS_URL": nats_url,
                "EXTENSION_REGISTRY_DATA_DIR": str(self.data_dir),
                "EXTENSION_REGISTRY_API_TOKENS_FILE": str(tokens_file),
            }
        )
        self.env.update({f"EXTENSION_REGISTRY_{k.upper()}": str(v) for k, v in settings.items()})
        self.proc: subprocess.Popen[bytes] | None = None
        self.client = httpx.Client(
            base_url=self.url, timeout=10, headers={"Authorization": f"Bearer {self.token}"}
        )

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self) -> dict[str, Any]:
        """Start the node and wait until /readyz answers 200; its registry status."""
        with self.stderr_path.open("ab") as stderr:
            self.proc = subprocess.Popen(
                [str(EXTREG), "--database-url", self.db_url, "serve", "--port", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=self.env,
                start_new_session=True,
            )
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            with contextlib.suppress(httpx.HTTPError):
                answer = self.client.get("/readyz", timeout=1)
                if answer.status_code == 200:
                    return dict(answer.json()["details"])  # shown to a token
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"node did not become ready:\n{self.stderr_tail()}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (no final flush, no cleanup)."""
        if self.proc is not None and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> int:
        """Ctrl-C, as an operator would; the exit status."""
        proc, self.proc = self.proc, None
        if proc is None:
            return 0
        proc.send_signal(signal.SIGINT)
        try:
            return proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise

    def close(self) -> None:
        self.kill()
        self.client.close()

    def status(self) -> dict[str, Any]:
        return dict(self.client.get("/readyz").json()["details"])

    def invoke(self, extension_id: str, payload: Any) -> httpx.Response:
        return self.client.post(
            f"/admin/extensions/{extension_id}/invoke", json={"payload": payload}
        )

    def events(self) -> list[dict[str, Any]]:
        """Every JSON log line the node wrote to stderr, across restarts."""
        found = []
        for line in self.stderr_path.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def stderr_tail(self, lines: int = 30) -> str:
        if not self.stderr_path.exists():
            return ""
        return "\n".join(self.stderr_path.read_text(errors="replace").splitlines()[-lines:])


# -- NATS responders -------------------------------------------------------------------------


@dataclass
class Responder:
    """Counts requests on one subject and the replies it sent."""

    requests: int = 0
    replies: int = 0
    tasks: set[asyncio.Task[None]] = field(default_factory=set)


@contextlib.asynccontextmanager
async def responder(
    nc: Client, subject: str, behave: Callable[[Msg, Responder], Awaitable[list[bytes]]]
) -> AsyncIterator[Responder]:
    """Subscribe `subject`; for each request, await `behave(msg, state)` (in its own task, so a
    slow answer does not hold up the next request) and publish every reply it returns."""
    state = Responder()

    async def answer(msg: Msg) -> None:
        for reply in await behave(msg, state):
            await nc.publish(msg.reply, reply)
            state.replies += 1

    async def on_request(msg: Msg) -> None:
        state.requests += 1
        task = asyncio.create_task(answer(msg))
        state.tasks.add(task)
        task.add_done_callback(state.tasks.discard)

    sub = await nc.subscribe(subject, cb=on_request)
    await subscriptions_active(nc)
    try:
        yield state
    finally:
        await sub.unsubscribe()
        for task in list(state.tasks):
            task.cancel()
        await asyncio.gather(*state.tasks, return_exceptions=True)


# -- database probes -------------------------------------------------------------------------


def sql(url: str, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(statement, params)
        return cur.fetchall() if cur.description else []


def health_counts(url: str, extension_id: str) -> tuple[int, int]:
    """(success_count, failure_count) stored for one extension; (0, 0) without a row."""
    rows = sql(
        url,
        "SELECT coalesce(success_count, 0), coalesce(failure_count, 0)"
        " FROM extension_health WHERE extension_id = %s",
        (extension_id,),
    )
    return (int(rows[0][0]), int(rows[0][1])) if rows else (0, 0)


def other_backends(conn: psycopg.Connection[Any], where: str = "true") -> list[int]:
    """Pids of the other backends connected to this connection's database matching `where`."""
    cur = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database()"
        f" AND pid <> pg_backend_pid() AND ({where}) ORDER BY pid"
    )
    return [int(row[0]) for row in cur.fetchall()]
