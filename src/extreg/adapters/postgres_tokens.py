"""SQL for `extreg_api_tokens`: the token table's statements, translated like every other.

Each call uses a short-lived connection: token commands are rare, and a server's follower holds
its own listening connection. Every psycopg error goes through `postgres.translate`, the one
translator of the adapter layer, so a missing table or an unreachable database reads and exits
the same for `extreg token list` as for `extreg list`. Rules about tokens (names, roles,
hashing, what a conflict means) stay in `extreg.tokens`; this module only stores rows.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import psycopg

from .postgres import CONNECT_TIMEOUT_S, translate_for

CHANNEL = "extreg_tokens"
TokenRow = tuple[str, str, str]  # name, role, SHA-256 hex digest

_CREATE = """
INSERT INTO extreg_api_tokens (name, role, token_hash, created_by) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO UPDATE SET role = excluded.role, token_hash = excluded.token_hash,
    created_at = now(), created_by = excluded.created_by, revoked_at = NULL
    WHERE extreg_api_tokens.revoked_at IS NOT NULL
RETURNING name
"""
_CREATE_ONCE = """
INSERT INTO extreg_api_tokens (name, role, token_hash, created_by) VALUES (%s, %s, %s, %s)
ON CONFLICT (name) DO NOTHING
RETURNING name
"""
_LIST_KEYS = ("name", "role", "created_at", "created_by", "revoked_at")
_LIST = f"SELECT {', '.join(_LIST_KEYS)} FROM extreg_api_tokens ORDER BY name"
_REVOKE = """
UPDATE extreg_api_tokens SET revoked_at = coalesce(revoked_at, now())
WHERE name = %s RETURNING revoked_at
"""
_ACTIVE = "SELECT name, role, token_hash FROM extreg_api_tokens WHERE revoked_at IS NULL"


class TokenTable:
    """The token table of one database (`conninfo`)."""

    def __init__(self, conninfo: str) -> None:
        self._conninfo = conninfo

    async def insert(self, row: TokenRow, created_by: str, *, replace_revoked: bool) -> bool:
        """Store a token row; False when the name is taken (by a live token, or by any token
        unless `replace_revoked`)."""
        sql = _CREATE if replace_revoked else _CREATE_ONCE
        async with self._connection() as conn:
            cur = await conn.execute(sql, (*row, created_by))
            return await cur.fetchone() is not None

    async def rows(self) -> list[dict[str, Any]]:
        """Every token's name, role and dates (never the digest), by name."""
        async with self._connection() as conn:
            rows = await (await conn.execute(_LIST)).fetchall()
        return [dict(zip(_LIST_KEYS, row, strict=True)) for row in rows]

    async def revoke(self, name: str) -> datetime | None:
        """When the token was revoked (now, or earlier); None when there is no such name."""
        async with self._connection() as conn:
            row = await (await conn.execute(_REVOKE, (name,))).fetchone()
        revoked: datetime | None = None if row is None else row[0]
        return revoked

    async def active(self) -> list[TokenRow]:
        """(name, role, hex digest) of the tokens that work now."""
        async with self._connection() as conn:
            rows = await (await conn.execute(_ACTIVE)).fetchall()
        return [(name, role, digest) for name, role, digest in rows]

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[TokenChanges]:
        """A connection listening on the token channel, for `TokenChanges.wait`."""
        async with self._connection() as conn:
            with translate_for(self._conninfo):
                await conn.execute(f"LISTEN {CHANNEL}")
            yield TokenChanges(conn, self._conninfo)

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        with translate_for(self._conninfo):
            conn = await psycopg.AsyncConnection.connect(
                self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S
            )
        try:
            with translate_for(self._conninfo):
                yield conn
        finally:
            with contextlib.suppress(Exception):
                await conn.close()


class TokenChanges:
    """Notifications of token changes on a listening connection."""

    def __init__(self, conn: psycopg.AsyncConnection[Any], conninfo: str) -> None:
        self._conn = conn
        self._conninfo = conninfo

    async def wait(self, timeout: float) -> None:
        """Return after the next change, or after `timeout` seconds without one."""
        with translate_for(self._conninfo):
            async for _ in self._conn.notifies(timeout=timeout, stop_after=1):
                pass
