"""Advisory-lock waits as PostgreSQL sees them: a write-path test holds a lock in one session
and must know that the write under test waits for it before letting go, or it would prove
nothing about the lock."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg

WAITERS = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE wait_event_type = 'Lock' AND wait_event = 'advisory'"
)


async def until_one_waits(conn: psycopg.AsyncConnection[Any], what: str, timeout: float) -> None:
    """Return once exactly one session waits for an advisory lock (asked through `conn`, which
    may be the holder's: the question takes no lock); AssertionError naming `what` after
    `timeout` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        row = await (await conn.execute(WAITERS)).fetchone()
        if row is not None and row[0] == 1:
            return
        if loop.time() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(0.01)
