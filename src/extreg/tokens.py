"""API tokens in the database (`extreg_api_tokens`) and the task that keeps a `TokenBook` fresh.

`TokenStore` creates, lists and revokes tokens; it stores only the SHA-256 digest (see
`extreg.auth`). `TokenFollower` fills a server's `TokenBook` and keeps it current, so that
checking a request never touches the database: it LISTENs on `extreg_tokens` (a trigger
notifies every change, so a revoke applies within milliseconds), re-reads the table every
`REFRESH_S` as a safety net, and re-reads the tokens file when it changes. When the database
is unreachable the book keeps the tokens it had and the follower retries with backoff.

`KnownTokens` keeps the database's active tokens (names, roles and SHA-256 digests, never a
token) beside the last-known-good snapshot file, rewritten whenever they change. A server
booting while the database is down reads them from there, so the admin API accepts the
tokens it knew while it serves the snapshot (`Registry` refuses writes meanwhile, 503); the
first load from the database replaces them.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from .adapters.postgres import location_of
from .adapters.postgres_tokens import TokenChanges, TokenTable
from .auth import (
    TokenBook,
    TokenEntry,
    check_name,
    check_role,
    entry,
    generate_token,
    hash_token,
    load_tokens_file,
)
from .core.chance import jitter
from .errors import ConfigError, Conflict, SourceUnavailable, UnknownToken
from .settings import Settings

if TYPE_CHECKING:
    from .adapters.nats_feed import TokenRelay

log = structlog.get_logger("extreg.tokens")

ADMIN_NAME = "admin"
REFRESH_S = 30.0  # the periodic re-read: a safety net for a lost notification
FILE_CHECK_S = 2.0
BACKOFF_MIN_S, BACKOFF_MAX_S = 0.2, 10.0
KNOWN_FORMAT = "extreg-known-tokens/1"


class TokenStore:
    """The tokens of one database: the rules (names, roles, only digests stored, what a taken
    name means); the SQL and its errors are the adapter's (`TokenTable`)."""

    def __init__(self, conninfo: str) -> None:
        self._table = TokenTable(conninfo)

    @classmethod
    def from_settings(cls, settings: Settings) -> TokenStore:
        return cls(settings.conninfo)

    async def create(self, name: str, role: str, created_by: str) -> str:
        """Store a new token's digest and return the token (the only time it is seen)."""
        token = generate_token()
        row = (check_name(name), check_role(role), hash_token(token))
        if not await self._table.insert(row, created_by, replace_revoked=True):
            raise Conflict(f"token {name!r} exists: revoke it first, or choose another name")
        return token

    async def ensure_admin(self) -> str | None:
        """Create the token named `admin` unless one was ever made; the new token, or None."""
        token = generate_token()
        row = (ADMIN_NAME, "admin", hash_token(token))
        created = await self._table.insert(row, "extreg:bootstrap", replace_revoked=False)
        return token if created else None

    async def list_tokens(self) -> list[dict[str, Any]]:
        """Every token's name, role and dates (never the digest), by name."""
        return await self._table.rows()

    async def revoke(self, name: str) -> datetime:
        """Stop a token from working (at once, on every server); when it was revoked."""
        revoked = await self._table.revoke(name)
        if revoked is None:
            raise UnknownToken(f"no token named {name!r}")
        return revoked

    async def active(self) -> list[TokenEntry]:
        """The tokens that work now."""
        return [entry(name, role, digest) for name, role, digest in await self._table.active()]

    def changes(self) -> contextlib.AbstractAsyncContextManager[TokenChanges]:
        """Notifications of changes to the token table (`TokenChanges.wait`)."""
        return self._table.changes()


async def ensure_admin_token(store: TokenStore) -> str | None:
    """On a registry's first start: create the `admin` token and return it, to print once.

    None when a token named `admin` exists or ever existed (revoked tokens keep their row), so
    the token is shown on the first start only and an operator's revoke is respected.
    """
    return await store.ensure_admin()


class KnownTokens:
    """The database's active tokens as last read, in a JSON file beside the snapshot file
    (`<snapshot>.tokens.json`: format, database location, write time, and per name the role
    and SHA-256 digest). Like the snapshot file, it is used only for the database it came
    from, and written to a temporary name, fsynced and renamed over the old one."""

    def __init__(self, path: Path, location: str) -> None:
        self.path = path
        self.location = location
        self._written: frozenset[TokenEntry] | None = None

    @classmethod
    def from_settings(cls, settings: Settings) -> KnownTokens:
        snapshot = settings.snapshot_path
        return cls(
            snapshot.with_name(snapshot.stem + ".tokens.json"), location_of(settings.conninfo)
        )

    def write(self, entries: list[TokenEntry]) -> None:
        """Replace the file with `entries` (nothing is written when they did not change);
        a failure is logged, never raised: the tokens in memory are what counts."""
        if frozenset(entries) == self._written:
            return
        data = {
            "format": KNOWN_FORMAT,
            "database": self.location,
            "written_at": datetime.now(UTC).isoformat(),
            "tokens": {e.name: {"role": e.role, "sha256": e.digest.hex()} for e in entries},
        }
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(
                prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
            )  # created 0600
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    json.dump(data, fh, indent=1)
                    fh.flush()
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:
            log.error(
                "known_tokens_not_written", path=str(self.path), error=exc.strerror or str(exc)
            )
            return
        self._written = frozenset(entries)

    def read(self) -> list[TokenEntry]:
        """The tokens in the file; `ConfigError` when it is missing, unreadable, malformed or
        from another database."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no known-tokens file at {self.path}") from None
        except (OSError, ValueError) as exc:
            raise ConfigError(f"known-tokens file {self.path} is unreadable: {exc}") from None
        if not isinstance(data, dict) or data.get("format") != KNOWN_FORMAT:
            raise ConfigError(f"known-tokens file {self.path} is not an {KNOWN_FORMAT} file")
        if data.get("database") != self.location:
            raise ConfigError(
                f"known-tokens file {self.path} holds the tokens of database"
                f" {data.get('database')}, not of {self.location}: refusing it"
            )
        tokens = data.get("tokens")
        if not isinstance(tokens, dict):
            raise ConfigError(f"known-tokens file {self.path} has no tokens table")
        try:
            return [
                entry(str(name), str(v["role"]), str(v["sha256"])) for name, v in tokens.items()
            ]
        except (TypeError, KeyError):
            raise ConfigError(f"known-tokens file {self.path} has a malformed token") from None


class TokenFollower:
    """Keeps `book` equal to the database's active tokens plus the tokens file's; with
    `known`, keeps a copy of the database's for a boot while it is down (`KnownTokens`)."""

    def __init__(
        self,
        book: TokenBook,
        store: TokenStore | None,
        tokens_file: Path | None,
        known: KnownTokens | None = None,
        relay: TokenRelay | None = None,
    ) -> None:
        self.book = book
        self.store = store
        self.tokens_file = tokens_file
        self.known = known
        self.relay = relay  # on a fleet of the NATS change feed (see `_follow_database`)
        self._entries: list[TokenEntry] | None = None
        self._file_mtime: float | None = None

    async def first_load(self) -> None:
        """Load both sources once; a failure is logged and left to the background tasks
        (with the database's tokens as last known meanwhile, when there are any)."""
        self.reload_file()
        if self.store is not None:
            try:
                await self._reload_database()
            except (SourceUnavailable, ConfigError) as exc:
                log.warning("tokens_unavailable", error=str(exc))
                self._load_known()

    def _load_known(self) -> None:
        if self.known is None:
            return
        try:
            entries = self.known.read()
        except ConfigError as exc:
            log.warning("known_tokens_unusable", error=str(exc))
            return
        self.book.replace("database", entries)
        log.warning("tokens_from_known_file", path=str(self.known.path), count=len(entries))

    async def run(self) -> None:
        """Follow both sources until cancelled."""
        async with asyncio.TaskGroup() as group:
            if self.store is not None:
                group.create_task(self._follow_database())
            if self.tokens_file is not None:
                group.create_task(self._watch_file())

    def reload_file(self) -> None:
        if self.tokens_file is None:
            return
        try:
            mtime = self.tokens_file.stat().st_mtime
        except OSError:
            mtime = None
        if mtime == self._file_mtime:
            return
        self._file_mtime = mtime
        try:
            entries = load_tokens_file(self.tokens_file) if mtime is not None else []
        except ConfigError as exc:  # a bad edit changes nothing
            log.error("tokens_file_rejected", error=str(exc))
            return
        if mtime is None:
            log.warning("tokens_file_missing", path=str(self.tokens_file))
        self.book.replace("file", entries)
        log.info("tokens_loaded", source="file", count=len(entries))

    async def _watch_file(self) -> None:
        while True:
            await asyncio.sleep(FILE_CHECK_S)
            self.reload_file()

    async def _follow_database(self) -> None:
        """LISTEN for changes; or on a follower of the NATS change feed, which holds no
        database connection, wait for the publisher's announcement (`TokenRelay`), and as the
        publisher, announce every change. Either way re-read every REFRESH_S too."""
        assert self.store is not None  # only started with a store
        backoff = BACKOFF_MIN_S
        while True:
            relay = self.relay
            following = relay is not None and relay.following
            try:
                source = relay.changes() if relay and following else self.store.changes()
                async with source as changes:
                    await self._reload_database()
                    backoff = BACKOFF_MIN_S
                    while relay is None or relay.following == following:
                        await changes.wait(REFRESH_S)
                        if await self._reload_database() and relay and not following:
                            await relay.announce()
                    continue  # the node's role changed: follow the other way
            except (SourceUnavailable, ConfigError) as exc:
                log.warning("tokens_refresh_failed", error=str(exc), retry_in_s=round(backoff, 2))
            await asyncio.sleep(jitter(backoff))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _reload_database(self) -> bool:
        """Read the database's tokens into the book; True when they changed."""
        assert self.store is not None
        entries = await self.store.active()
        self.book.replace("database", entries)
        log.debug("tokens_loaded", source="database", count=len(entries))
        if entries == self._entries:
            return False
        self._entries = entries
        if self.known is not None:
            await asyncio.to_thread(self.known.write, entries)
        return True
