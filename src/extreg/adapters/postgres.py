"""PostgreSQL adapter: the only module that talks SQL about extensions and routing policies.

Reads ask PostgreSQL to render every record, with its versions and instances, as one JSON
document, which msgspec decodes and validates straight into structs; that keeps a full load of
10,000 extensions to one round trip and no per-row Python work. Writes set the session's
`extreg.actor` so the audit trigger records who made them. Every psycopg error is translated
here into `SourceUnavailable` or `Conflict`, with any password scrubbed from the message.
Policies go through the same write path (`_writing` + `_write_in`) with the table
particulars of `postgres_policies`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, Literal, Self, TypeVar
from urllib.parse import quote, unquote, urlsplit

import msgspec
import psycopg
import psycopg_pool
import structlog
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg.types.json import Jsonb

from ..core.intervals import Buckets
from ..core.model import WRITABLE_FIELDS, Extension, HealthStatus, record_problems, to_plain
from ..core.policy import Policy, PolicyLimits
from ..core.visibility import TxSnapshot
from ..errors import Conflict, SourceUnavailable
from ..settings import Settings, redact_url
from . import postgres_health as health_sql
from . import postgres_policies as policy_sql
from .postgres_health import HealthBatch, HealthRow
from .snapshot_file import Origin

log = structlog.get_logger("extreg.postgres")

CHANNEL = "extreg_changes"
# Advisory locks, every class in one place (two-key locks: class, key): `write` takes
# (0x65787401, bucket) for 256 buckets of ids (_LOCK_IDS), `write_policies` the same in its own
# class, and the change feed's publisher holds (0x65787403, 0) on its LISTEN connection.
WRITE_LOCK_CLASS = 0x65787401
POLICY_LOCK_CLASS = policy_sql.LOCK_CLASS  # 0x65787402
FEED_LOCK = (0x65787403, 0)
# The server's side of the same, for the listener: the publisher's lock is a session lock, and
# the server lets go of it only when it sees the session dead (by default after hours of a
# silent peer), so no other node could publish meanwhile.
SERVER_KEEPALIVES = (
    "-c tcp_keepalives_idle=5 -c tcp_keepalives_interval=2 -c tcp_keepalives_count=2"
    " -c tcp_user_timeout=10000"
)
CONNECT_TIMEOUT_S = 3
# A server that vanishes without closing (a host gone, a partition) is noticed in about 9 s
# instead of the kernel's two hours, on the listener and on pooled connections alike.
KEEPALIVES = {
    "keepalives": 1,
    "keepalives_idle": 5,
    "keepalives_interval": 2,
    "keepalives_count": 2,
}
IDLE_CLOSE_S = 10.0  # an idle pool closes its connections after this (see `idle` below)
# A server built with JIT would compile the load query anew on every load; ours run short
# queries, so JIT is off on our connections (bench/bench_registry.py prints JIT-on rows on a
# server that has JIT). Times are rendered in UTC, as migration 008's notifications render
# them, so a record read and the same record notified encode alike (ETags).
SESSION_OPTIONS = "-c jit=off -c TimeZone=UTC"
LOAD_PARTS = 2  # a power of two: the full load in parts on as many connections at once

# Versions and instances are aggregated once per table and joined, rather than by a
# subquery per row. The read's MVCC snapshot comes with it (`core.visibility`). Migration
# 008's `extreg_record` renders one record in the same shape, for notifications. `{key}` is the id column of each
# table, and `{where}` selects the extensions: a hash partition for a full load, or a list of
# ids (two query texts, so the planner can use the primary key for the latter).
_RECORDS = """
WITH v AS (
    SELECT id, json_agg(json_build_object(
               'version', version, 'subject', subject, 'timeout_ms', timeout_ms, 'retry', retry,
               'config', coalesce(config, '{{}}'), 'metadata', coalesce(metadata, '{{}}'),
               'routing_rules', coalesce(routing_rules, '{{}}'), 'enabled', enabled,
               'created_at', created_at, 'created_by', created_by)
           ORDER BY created_at, version) AS versions
    FROM extension_versions WHERE {v_where} GROUP BY id),
i AS (
    SELECT extension_id AS id, json_agg(json_build_object(
               'instance_id', instance_id, 'subject', subject, 'weight', coalesce(weight, 100),
               'enabled', enabled, 'health_status', coalesce(health_status, 'unknown'))
           ORDER BY instance_id) AS instances
    FROM extension_instances WHERE {i_where} GROUP BY extension_id)
SELECT coalesce(json_agg(r), '[]')::text, pg_current_snapshot()::text FROM (
    SELECT e.id, e.type, e.subject, e.timeout_ms, e.retry, e.enabled, e.version,
           coalesce(e.config, '{{}}') AS config, coalesce(e.metadata, '{{}}') AS metadata,
           coalesce(v.versions, '[]') AS versions, coalesce(i.instances, '[]') AS instances,
           e.created_at, e.updated_at, e.created_by, e.updated_by
    FROM extensions e LEFT JOIN v ON v.id = e.id LEFT JOIN i ON i.id = e.id
    WHERE {e_where}) r
"""


def _records_where(condition: str) -> str:
    return _RECORDS.format(
        v_where=condition.format(key="id"),
        i_where=condition.format(key="extension_id"),
        e_where=condition.format(key="e.id"),
    )


_RECORDS_BY_PART = _records_where("hashtext({key}) & %(mask)s = %(part)s")
_RECORDS_BY_IDS = _records_where("{key} = ANY(%(ids)s)")
# What a sync compares: per extension, the row version (`xmin`, the writing transaction) of
# its row, its versions and its instances. Any committed write gives a new token, whatever the
# order in which transactions started or committed, so the sync never has to trust a timestamp.
# (A frozen row's xmin reads differently once; that only costs one needless re-read.)
# Policies are keyed `policy:<id>`, which no extension id can be (':' is not allowed in one).
_ROW_VERSIONS = (
    """
SELECT e.id, concat_ws('|', e.xmin::text, v.t, i.t) FROM extensions e
LEFT JOIN (SELECT id, string_agg(version || '=' || xmin::text, ',' ORDER BY version) AS t
           FROM extension_versions GROUP BY id) v ON v.id = e.id
LEFT JOIN (SELECT extension_id, string_agg(instance_id || '=' || xmin::text, ',' ORDER BY instance_id) AS t
           FROM extension_instances GROUP BY extension_id) i ON i.extension_id = e.id
UNION ALL """
    + policy_sql.ROW_VERSIONS
)
# Writers lock ids in one global order (by lock key), so two writers never deadlock. Keys are
# 256 buckets of ids, not one per id: a bulk import of 100,000 records would otherwise
# exhaust PostgreSQL's lock table; two writers of ids in the same bucket merely take turns.
_LOCK_IDS = """
SELECT pg_advisory_xact_lock(%(lock_class)s, k)
FROM (SELECT DISTINCT hashtext(i) & 255 AS k FROM unnest(%(ids)s::text[]) AS i ORDER BY k) AS keys
"""
_LOCK_ROWS = "SELECT 1 FROM extensions WHERE id = ANY(%(ids)s) ORDER BY id FOR UPDATE"
# The `extensions` table's own writable columns: the record's, but the child tables'.
_COLUMNS = tuple(f for f in WRITABLE_FIELDS if f not in ("versions", "instances"))

Limits = tuple[int, int]  # extension_max_timeout_ms, extension_max_retries
Change = Callable[["Extension | None"], "Extension | None"]
Outcome = Literal["created", "updated", "unchanged", "deleted", "absent"]
Written = tuple[Outcome, "Extension | None"]  # what a write did, and the stored record after
PolicyChange = Callable[["Policy | None"], "Policy | None"]
PolicyWritten = tuple[Outcome, "Policy | None"]

R = TypeVar("R", Extension, Policy)


@dataclass(frozen=True, slots=True)
class Read:
    """Records read in one statement, and that statement's snapshot: which commits they
    include (`core.visibility`)."""

    records: list[Extension]
    snapshot: TxSnapshot


@dataclass(frozen=True, slots=True)
class Notice:
    """One change notification. `key` is an extension id, `policy:<id>`, or `*` (reload
    everything). When it carries the record's state (migration 008), `xid` is the writing
    transaction and `record` the record it committed: None when deleted or breaking a rule
    (then left out, as a read leaves it out). Otherwise the record is to be read back."""

    key: str
    xid: int | None = None
    record: Extension | None = None


class _Payload(msgspec.Struct):
    id: str
    xid: str
    record: msgspec.Raw = msgspec.Raw(b"")  # the record's JSON, left for `_decode`
    gone: bool = False


Conn = psycopg.AsyncConnection[Any]


@dataclass(frozen=True, slots=True)
class _Table(Generic[R]):
    """What the one write path needs to know of a kind of record."""

    lock_class: int  # of the advisory lock on the ids' buckets
    lock_rows: str  # locks the rows of %(ids)s, in id order
    read: Callable[[Conn, Sequence[str]], Awaitable[list[R]]]  # records by id, on `conn`
    key: Callable[[R], str]  # a record's id
    apply: Callable[[Conn, str, R | None, R | None], Awaitable[Outcome]]  # store one change


class LockTaken(Exception):
    """`listen(lock=True)`: another session holds the change feed's lock."""


class PostgresSource:
    """A connection pool plus the registry's queries. Open with `await source.open()`.

    `idle=True` is for a node that reads PostgreSQL only now and then (a node of the NATS
    change feed, which writes when an operator asks): its pool keeps no connection open and
    closes one IDLE_CLOSE_S after its last use, and `open` connects nothing."""

    def __init__(self, settings: Settings, *, idle: bool = False) -> None:
        self._idle = idle
        self._conninfo = settings.conninfo
        self._secret = settings.db_password.get_secret_value() or url_password(self._conninfo)
        self.display = settings.db_display
        self.location = location_of(self._conninfo)
        self._limits: Limits = (settings.extension_max_timeout_ms, settings.extension_max_retries)
        self._policy_limits = PolicyLimits.from_settings(settings)
        # Rows left out of what this source served because they break a rule: {id: problem},
        # extensions and policies apart. A full load replaces its part; a load by ids updates
        # those ids.
        self._invalid_extensions: dict[str, str] = {}
        self._invalid_policies: dict[str, str] = {}  # keyed `policy:<id>`
        self._extensions: _Table[Extension] = _Table(
            WRITE_LOCK_CLASS, _LOCK_ROWS, self._read, lambda e: e.id, _apply
        )
        self._policies: _Table[Policy] = _Table(
            POLICY_LOCK_CLASS,
            policy_sql.LOCK_ROWS,
            self._read_policies,
            lambda p: p.policy_id,
            self._apply_policy,
        )
        self._pool = psycopg_pool.AsyncConnectionPool(
            self._conninfo,
            min_size=0 if idle else min(LOAD_PARTS, settings.db_pool_size),
            max_size=settings.db_pool_size,
            max_idle=IDLE_CLOSE_S if idle else 600.0,
            open=False,
            timeout=CONNECT_TIMEOUT_S * 2,
            kwargs={
                "autocommit": True,
                "connect_timeout": CONNECT_TIMEOUT_S,
                "options": SESSION_OPTIONS,
                **KEEPALIVES,
            },
            check=psycopg_pool.AsyncConnectionPool.check_connection,
            # A connection lost with its server is re-made with exponential backoff from 1 s,
            # doubling until `reconnect_timeout` (300 s by default), so after a longer outage
            # or a failover the next attempt could be a minute away. Giving up soon instead
            # frees the slot, and the next caller that needs a connection grows the pool with
            # an immediate attempt (issue 15: writes resume right after a promotion).
            reconnect_timeout=CONNECT_TIMEOUT_S,
            name="extreg",
        )

    async def open(self) -> None:
        """Check the database answers, then open the pool; `SourceUnavailable` if it does not.
        An idle source opens its pool empty, without a check."""
        if self._idle:
            await self._pool.open(wait=False)
            return
        await self.test_connection(raise_error=True)
        with self._translate():
            await self._pool.open(wait=True, timeout=CONNECT_TIMEOUT_S * 2)

    @property
    def is_open(self) -> bool:
        return not self._pool.closed

    async def close(self) -> None:
        await self._pool.close()

    @property
    def invalid(self) -> dict[str, str]:
        """Rows left out of what this source served because they break a rule: {id: problem}
        for extensions, {`policy:<id>`: problem} for policies."""
        return self._invalid_extensions | self._invalid_policies

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # -- the seed's functions -------------------------------------------------------------

    async def test_connection(self, raise_error: bool = False) -> bool:
        """True when a fresh connection can run a query."""
        try:
            with self._translate():
                async with await self._connect() as conn:
                    await conn.execute("SELECT 1")
        except SourceUnavailable:
            if raise_error:
                raise
            return False
        return True

    async def load_all_extensions(self) -> list[Extension]:
        """Every extension, enabled or not, with versions and instances."""
        return [ext for part in await self.read_all_extensions() for ext in part.records]

    async def read_all_extensions(self) -> list[Read]:
        """Every extension, as LOAD_PARTS reads (each with its snapshot).

        The parts are hash partitions read on separate connections at once, so PostgreSQL
        renders one part while we decode another (two parts against one: docs/performance.md,
        "Full load"). Each id lives in exactly one part; a change made between the parts'
        reads arrives by notification like any other.
        """
        mask = LOAD_PARTS - 1
        parts = await asyncio.gather(
            *(
                self._load(_RECORDS_BY_PART, {"part": part, "mask": mask})
                for part in range(LOAD_PARTS)
            )
        )
        self._invalid_extensions = {i: p for _, invalid in parts for i, p in invalid.items()}
        return [read for read, _ in parts]

    async def load_extension(self, extension_id: str) -> Extension | None:
        found = await self.load_extensions([extension_id])
        return found[0] if found else None

    async def load_extensions(self, ids: Sequence[str]) -> list[Extension]:
        return (await self.read_extensions(ids)).records

    async def read_extensions(self, ids: Sequence[str]) -> Read:
        """The extensions with these ids that exist (and are valid), with the read's snapshot."""
        read, invalid = await self._load(_RECORDS_BY_IDS, {"ids": list(ids)})
        self._note_invalid(ids, invalid)
        return read

    def notice(self, payload: str) -> Notice:
        """Parse a change notification: a bare key (an id, `policy:<id>`, `*`), or migration
        008's JSON, whose record goes through the same rules as every read (`_decode`)."""
        if not payload.startswith("{"):
            return Notice(payload)
        try:
            data = msgspec.json.decode(payload, type=_Payload)
            xid = int(data.xid)
        except (msgspec.DecodeError, ValueError):
            log.warning("notification_unreadable", payload=payload[:200])
            return Notice("*")  # whatever it was meant to say, a full reload covers it
        if not data.record:
            if not data.gone:
                return Notice(data.id)  # too large to carry: read it back
            self._note_invalid([data.id], {})
            return Notice(data.id, xid)
        records, invalid = _decode(b"[" + bytes(data.record) + b"]", self._limits)
        self._note_invalid([data.id], invalid)
        return Notice(data.id, xid, records[0] if records else None)

    def _note_invalid(self, ids: Sequence[str], invalid: dict[str, str]) -> None:
        """Make `invalid` the problems of `ids`, as just read."""
        asked = set(ids)
        self._invalid_extensions = {
            i: p for i, p in self._invalid_extensions.items() if i not in asked
        } | invalid

    async def load_all_policies(self) -> list[Policy]:
        """Every routing policy, enabled or not; rows that break a rule are left out and
        reported in `invalid`."""
        with self._translate():
            async with self._pool.connection() as conn:
                policies, invalid = await policy_sql.read(conn, None, self._policy_limits)
        self._invalid_policies = invalid
        return policies

    async def load_policies(self, ids: Sequence[str]) -> list[Policy]:
        """The policies with these ids that exist (and are valid)."""
        with self._translate():
            async with self._pool.connection() as conn:
                policies, invalid = await policy_sql.read(conn, ids, self._policy_limits)
        asked = {policy_sql.key(i) for i in ids}
        self._invalid_policies = {
            i: p for i, p in self._invalid_policies.items() if i not in asked
        } | invalid
        return policies

    async def load_policy(self, policy_id: str) -> Policy | None:
        found = await self.load_policies([policy_id])
        return found[0] if found else None

    async def log_audit(
        self, extension_id: str, action: str, old: Any, new: Any, actor: str
    ) -> None:
        """Write an audit row by hand, for events the triggers cannot see."""
        with self._translate():
            async with self._pool.connection() as conn:
                await conn.execute(
                    "INSERT INTO extension_audit_log"
                    " (extension_id, action, old_values, new_values, changed_by)"
                    " VALUES (%s, %s, %s, %s, %s)",
                    (extension_id, action, Jsonb(old), Jsonb(new), actor),
                )

    # -- change tracking --------------------------------------------------------------------

    async def origin(self) -> Origin:
        """Which database this is, for the snapshot file."""
        with self._translate():
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT current_database(), system_identifier::text FROM pg_control_system()"
                )
                row = await cur.fetchone()
        assert row is not None
        return Origin(self.location, row[0], row[1])

    async def ids(self) -> set[str]:
        """Every stored extension id."""
        with self._translate():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute("SELECT id FROM extensions")).fetchall()
        return {r[0] for r in rows}

    async def row_versions(self) -> dict[str, str]:
        """{id: token that changes with every committed write of the record}: what a sync
        compares to find what changed, without trusting timestamps. Policies are keyed
        `policy:<id>`."""
        with self._translate():
            async with self._pool.connection() as conn:
                rows = await (await conn.execute(_ROW_VERSIONS)).fetchall()
        return {r[0]: r[1] for r in rows}

    @contextlib.asynccontextmanager
    async def listen(self, *, lock: bool = False) -> AsyncIterator[AsyncIterator[str]]:
        """A dedicated connection listening for change notifications; yields their payloads.

        `lock`: also take the change feed's advisory lock on it (`LockTaken` when another
        session holds it), so the lock is let go when this connection ends, however it ends."""
        with self._translate():
            conn = await self._connect(
                **KEEPALIVES, options=f"{SESSION_OPTIONS} {SERVER_KEEPALIVES}"
            )
        try:
            with self._translate():
                if lock:
                    cur = await conn.execute("SELECT pg_try_advisory_lock(%s, %s)", FEED_LOCK)
                    if not (await cur.fetchone() or (False,))[0]:
                        raise LockTaken()
                await conn.execute(f"LISTEN {CHANNEL}")

            async def payloads() -> AsyncIterator[str]:
                with self._translate():
                    async for notify in conn.notifies():
                        yield notify.payload
                raise SourceUnavailable("database closed the notification connection")

            yield payloads()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    # -- writes: one path for every writer --------------------------------------------------

    async def write(
        self, changes: Mapping[str, Change], actor: str, *, dry_run: bool = False
    ) -> dict[str, Written]:
        """The one write path: read, change and write records in one transaction.

        Every writer (API, CLI, automation, import) comes here, so every write of an id is
        serialized by the same locks: an advisory lock on the id's bucket (which also covers ids
        that do not exist yet) and the row lock (which plain-SQL writers take too). `change(current)`
        runs after both are held, on the record as committed at that moment, so a check it
        makes (an `If-Match`, existence, "disabled by whom") still holds at the write. It
        returns the record to store, or None to delete; it may raise to abort everything.
        Unchanged records are not written (no audit noise, no notification). `dry_run` rolls
        back. Returns {id: (created | updated | unchanged | deleted | absent, record after)}.
        """
        async with self._writing(actor, dry_run) as conn:
            return await _write_in(conn, self._extensions, changes)

    async def write_policies(
        self, changes: Mapping[str, PolicyChange], actor: str, *, dry_run: bool = False
    ) -> dict[str, PolicyWritten]:
        """`write` for routing policies, by policy id: the same transaction, locks (another
        lock class), `change(current)` under them, and outcomes. A policy `change` returns is
        checked there as every way in checks one (`parse_policy`), and every extension id it
        adds must name an extension of its stage's type as committed: else `InvalidRecord`
        (kind "policy", naming field and item) and nothing is written."""
        async with self._writing(actor, dry_run) as conn:
            return await _write_in(conn, self._policies, changes)

    @contextlib.asynccontextmanager
    async def _writing(self, actor: str, dry_run: bool) -> AsyncIterator[Conn]:
        """The one write path's transaction, acting as `actor`; `dry_run` rolls it back."""
        with self._translate():
            async with self._pool.connection() as conn, conn.transaction(force_rollback=dry_run):
                await _act_as(conn, actor)
                yield conn

    async def write_extension(self, extension_id: str, change: Change, actor: str) -> Written:
        """`write` for one id."""
        return (await self.write({extension_id: change}, actor))[extension_id]

    async def import_extensions(
        self, records: Sequence[Extension], actor: str, *, dry_run: bool = False
    ) -> dict[str, str]:
        """Upsert records with their versions and instances, all or nothing.

        Returns {id: "created" | "updated" | "unchanged"}; importing the same folder twice
        writes nothing the second time."""
        return (await self.import_records(records, (), actor, dry_run=dry_run))[0]

    async def import_policies(
        self, policies: Sequence[Policy], actor: str, *, dry_run: bool = False
    ) -> dict[str, str]:
        """Upsert policies, all or nothing; {policy id: created | updated | unchanged}."""
        return (await self.import_records((), policies, actor, dry_run=dry_run))[1]

    async def import_records(
        self,
        extensions: Sequence[Extension],
        policies: Sequence[Policy],
        actor: str,
        *,
        dry_run: bool = False,
    ) -> tuple[dict[str, str], dict[str, str]]:
        """Upsert extensions, then policies, in ONE transaction (a fixtures folder is all or
        nothing): the policies' references are checked against the extensions as this
        transaction leaves them, so a dry run reports what a real import would do.
        Extension locks are taken before policy locks, the order every writer keeps."""
        async with self._writing(actor, dry_run) as conn:
            done = await _write_in(conn, self._extensions, {e.id: _store(e) for e in extensions})
            done_policies = await _write_in(
                conn, self._policies, {p.policy_id: _store_policy(p) for p in policies}
            )
        return _outcomes(done), _outcomes(done_policies)

    async def upsert_extension(self, ext: Extension, actor: str) -> str:
        """Create or update one record; returns "created", "updated" or "unchanged"."""
        return (await self.write_extension(ext.id, _store(ext), actor))[0]

    async def set_enabled(self, extension_id: str, enabled: bool, actor: str) -> Written:
        """Enable or disable (audited as enable/disable); "absent" when no such extension."""

        def change(cur: Extension | None) -> Extension | None:
            return None if cur is None else msgspec.structs.replace(cur, enabled=enabled)

        return await self.write_extension(extension_id, change, actor)

    async def enable_if_disabled_by(self, extension_id: str, by: str, actor: str) -> bool:
        """Enable only if disabled and last changed by `by` (undo an automatic disable)."""

        def change(cur: Extension | None) -> Extension | None:
            if cur is not None and not cur.enabled and cur.updated_by == by:
                return msgspec.structs.replace(cur, enabled=True)
            return cur

        return (await self.write_extension(extension_id, change, actor))[0] == "updated"

    async def set_version_enabled(
        self, extension_id: str, version: str, enabled: bool, actor: str
    ) -> bool:
        """Enable or disable one of the record's `versions` (audited as an update of its
        versions); False when the extension or the version is gone, or it is so already."""

        def change(cur: Extension | None) -> Extension | None:
            if cur is None:
                return None
            versions = [
                msgspec.structs.replace(v, enabled=enabled) if v.version == version else v
                for v in cur.versions
            ]
            return msgspec.structs.replace(cur, versions=versions)

        return (await self.write_extension(extension_id, change, actor))[0] == "updated"

    async def set_instance_health(
        self, extension_id: str, instance_id: str, status: HealthStatus, actor: str
    ) -> bool:
        """Set one instance's `health_status` (outlier ejection: `unhealthy`, then `healthy`)
        through the write path; operational, so not audited (migration 005). False when the
        extension or the instance is gone, or it is so already."""

        def change(cur: Extension | None) -> Extension | None:
            if cur is None:
                return None
            instances = [
                msgspec.structs.replace(i, health_status=status)
                if i.instance_id == instance_id
                else i
                for i in cur.instances
            ]
            return msgspec.structs.replace(cur, instances=instances)

        return (await self.write_extension(extension_id, change, actor))[0] == "updated"

    async def delete_extension(self, extension_id: str, actor: str) -> bool:
        return (await self.write_extension(extension_id, lambda _: None, actor))[0] == "deleted"

    async def update_health(self, batch: HealthBatch) -> bool:
        """The seed's name: add one node's health batch; False if it was applied before.

        Additive and idempotent; see `extreg.adapters.postgres_health` for the transaction."""
        with self._translate():
            async with self._pool.connection() as conn:
                return await health_sql.write_batch(conn, batch)

    async def read_health(
        self,
        since: datetime | None = None,
        ids: list[str] | None = None,
        *,
        recent_since: float,
    ) -> tuple[datetime, list[HealthRow]]:
        """(database time, cluster-wide health rows updated after `since`, of `ids` or all),
        with their intervals from `recent_since` (epoch seconds) on."""
        with self._translate():
            async with self._pool.connection() as conn:
                return await health_sql.read_rows(conn, since, ids, recent_since)

    async def health_intervals(self, since: float, ids: list[str] | None) -> dict[str, Buckets]:
        """Every node's calls per interval from `since` (epoch seconds) on, of `ids` or all."""
        with self._translate():
            async with self._pool.connection() as conn:
                return await health_sql.read_intervals(conn, since, ids)

    async def health_events(
        self, since: float, extension_id: str | None
    ) -> list[tuple[float, str, str, str | None, str | None]]:
        """Circuit transitions, enables and disables from `since` on (see `read_events`)."""
        with self._translate():
            async with self._pool.connection() as conn:
                return await health_sql.read_events(conn, since, extension_id)

    async def prune_health(self, before: float) -> None:
        """Forget intervals and circuit transitions older than `before` (epoch seconds)."""
        with self._translate():
            async with self._pool.connection() as conn:
                await health_sql.prune(conn, before)

    async def audit_trail(
        self, extension_id: str | None = None, limit: int = 100, *, policy_id: str | None = None
    ) -> list[dict[str, Any]]:
        """Newest first: the audit rows of one extension, of one policy, or of all (both kinds).

        A policy's rows share the table, its id in `extension_id` and its actions `policy_*`
        (migration 006), and an extension and a policy may share an id: so each filter also
        goes by the action, and the trail of one never shows the other's rows."""
        where = []
        if extension_id:
            where.append("extension_id = %(ext)s AND NOT starts_with(action, 'policy_')")
        if policy_id:
            where.append("extension_id = %(policy)s AND starts_with(action, 'policy_')")
        condition = f"WHERE {' AND '.join(where)}" if where else ""
        with self._translate():
            async with self._pool.connection() as conn, conn.cursor(row_factory=dict_row) as cur:
                await cur.execute(
                    "SELECT id::text, extension_id, action, old_values, new_values, changed_by,"
                    f" changed_at FROM extension_audit_log {condition}"
                    " ORDER BY changed_at DESC, id LIMIT %(limit)s",
                    {"ext": extension_id, "policy": policy_id, "limit": limit},
                )
                return await cur.fetchall()

    # -- plumbing -----------------------------------------------------------------------------

    async def _connect(self, **kwargs: Any) -> psycopg.AsyncConnection[Any]:
        return await psycopg.AsyncConnection.connect(
            self._conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT_S, **kwargs
        )

    async def _load(self, query: str, params: dict[str, Any]) -> tuple[Read, dict[str, str]]:
        with self._translate():
            async with self._pool.connection() as conn:
                cur = await conn.execute(query, params)
                row = await cur.fetchone()
        assert row is not None  # an aggregate always answers one row
        records, invalid = _decode(row[0], self._limits)
        return Read(records, TxSnapshot.parse(row[1])), invalid

    async def _read(
        self, conn: psycopg.AsyncConnection[Any], ids: Sequence[str]
    ) -> list[Extension]:
        """Records by id on a connection of a write's transaction."""
        row = await (await conn.execute(_RECORDS_BY_IDS, {"ids": list(ids)})).fetchone()
        return _decode(row[0] if row else "[]", self._limits)[0]

    async def _read_policies(self, conn: Conn, ids: Sequence[str]) -> list[Policy]:
        """Policies by id on a connection of a write's transaction."""
        return (await policy_sql.read(conn, ids, self._policy_limits))[0]

    async def _apply_policy(
        self, conn: Conn, policy_id: str, old: Policy | None, new: Policy | None
    ) -> Outcome:
        return await policy_sql.apply(conn, policy_id, old, new, self._policy_limits)

    def _translate(self) -> contextlib.AbstractContextManager[None]:
        return translate(self.display, self._secret)

    def _scrub(self, exc: BaseException) -> str:
        return scrub(exc, self._secret)

    async def request_reload(self) -> None:
        """Ask every registry following this database for a full reload."""
        with self._translate():
            async with self._pool.connection() as conn:
                await conn.execute("SELECT pg_notify(%s, '*')", (CHANNEL,))


async def _write_in(
    conn: Conn, table: _Table[R], changes: Mapping[str, Callable[[R | None], R | None]]
) -> dict[str, tuple[Outcome, R | None]]:
    """Lock, read, change and write records of one table inside a write transaction (see
    `PostgresSource.write`)."""
    if not changes:
        return {}
    ids = sorted(changes)
    await conn.execute(_LOCK_IDS, {"ids": ids, "lock_class": table.lock_class})
    await conn.execute(table.lock_rows, {"ids": ids})
    current = {table.key(r): r for r in await table.read(conn, ids)}
    outcomes = {
        i: await table.apply(conn, i, current.get(i), changes[i](current.get(i))) for i in ids
    }
    written = [i for i, o in outcomes.items() if o in ("created", "updated")]
    after = {table.key(r): r for r in await table.read(conn, written)} if written else {}
    return {
        i: (o, current.get(i) if o == "unchanged" else after.get(i)) for i, o in outcomes.items()
    }


def _outcomes(report: Mapping[str, tuple[Outcome, object]]) -> dict[str, str]:
    return {i: outcome for i, (outcome, _) in report.items()}


@contextlib.contextmanager
def translate(display: str, secret: str) -> Iterator[None]:
    """Turn psycopg's errors into ours, without the password: the one translator of every
    statement we send (records, health, tokens, migrations), so one failure reads and exits
    alike whichever command met it. `display` names the database (password masked)."""
    try:
        yield
    except psycopg.errors.UndefinedTable:
        raise SourceUnavailable(
            f"database {display} has no extreg tables: run `extreg migrate`"
        ) from None
    except (psycopg.errors.IntegrityError, psycopg.errors.DataError) as exc:
        raise Conflict(scrub(exc, secret)) from None
    except (
        psycopg.OperationalError,
        psycopg.InterfaceError,
        psycopg_pool.PoolTimeout,
        psycopg_pool.PoolClosed,
        OSError,
    ) as exc:
        raise SourceUnavailable(f"database {display} unavailable: {scrub(exc, secret)}") from None
    except psycopg.Error as exc:  # refused otherwise (a permission, say): unusable all the same
        raise SourceUnavailable(f"database {display} refused: {scrub(exc, secret)}") from None


def translate_for(conninfo: str) -> contextlib.AbstractContextManager[None]:
    """`translate` for a connection string (the password taken from it)."""
    return translate(redact_url(conninfo), url_password(conninfo))


def scrub(exc: BaseException, secret: str) -> str:
    """The first line of an error's message, with `secret` (a password) masked, raw and as it
    appears inside a URL (percent-encoded)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    for form in sorted(
        {secret, quote(secret, safe=""), unquote(secret)} - {""}, key=len, reverse=True
    ):
        text = text.replace(form, "********")
    return text


def _decode(text: str | bytes, limits: Limits) -> tuple[list[Extension], dict[str, str]]:
    """(records, {id: problem} of rows left out) from the database's JSON.

    Rows go through the same rules as every other way in (`record_problems`): a row written
    with plain SQL can break rules that the schema does not enforce (a wildcard subject, a bad
    override in `metadata`), and serving the rest beats refusing the whole load.
    """
    try:
        decoded = msgspec.json.decode(text, type=list[Extension])
    except msgspec.ValidationError:
        decoded = []
        invalid = {}
        for item in msgspec.json.decode(text):
            try:
                decoded.append(msgspec.convert(item, type=Extension))
            except msgspec.ValidationError as exc:
                invalid[str(item.get("id"))] = str(exc)
    else:
        invalid = {}
    good = []
    for ext in decoded:
        problems = record_problems(ext, max_timeout_ms=limits[0], max_retries=limits[1])
        if problems:
            invalid[ext.id] = "; ".join(f"{field}: {message}" for field, message in problems)
        else:
            good.append(ext)
    for ext_id, problem in invalid.items():
        log.error("invalid_record_skipped", extension_id=ext_id, error=problem)
    return good, invalid


def _store(ext: Extension) -> Change:
    """A change that stores `ext` whatever is there."""
    return lambda _current: ext


def _store_policy(policy: Policy) -> PolicyChange:
    """A change that stores `policy` whatever is there."""
    return lambda _current: policy


async def _apply(
    conn: psycopg.AsyncConnection[Any], ext_id: str, old: Extension | None, new: Extension | None
) -> Outcome:
    """Make the stored record `new` (None: delete); write only the tables that differ."""
    if new is None:
        if old is None:
            return "absent"
        await conn.execute("DELETE FROM extensions WHERE id = %s", (ext_id,))
        return "deleted"
    if new.id != ext_id:
        raise ValueError(f"a change of {ext_id!r} returned a record of {new.id!r}")
    wanted = _comparable(to_plain(new, writable_only=True))
    stored = _comparable(to_plain(old, writable_only=True)) if old is not None else None
    if wanted == stored:
        return "unchanged"
    if stored is None or {c: stored[c] for c in _COLUMNS} != {c: wanted[c] for c in _COLUMNS}:
        await conn.execute(
            f"INSERT INTO extensions ({', '.join(_COLUMNS)})"
            f" VALUES ({', '.join(['%s'] * len(_COLUMNS))})"
            " ON CONFLICT (id) DO UPDATE SET "
            + ", ".join(f"{c} = excluded.{c}" for c in _COLUMNS[1:]),
            [Jsonb(wanted[c]) if c in ("config", "metadata") else wanted[c] for c in _COLUMNS],
        )
    if stored is None or (stored["versions"], stored["instances"]) != (
        wanted["versions"],
        wanted["instances"],
    ):
        await _replace_children(conn, new)
    return "created" if old is None else "updated"


def _comparable(plain: dict[str, Any]) -> dict[str, Any]:
    """A record with its versions and instances in a canonical order, for change detection."""
    return {
        **plain,
        "versions": sorted(plain["versions"], key=lambda v: v["version"]),
        "instances": sorted(plain["instances"], key=lambda i: i["instance_id"]),
    }


async def _act_as(conn: psycopg.AsyncConnection[Any], actor: str) -> None:
    await conn.execute("SELECT set_config('extreg.actor', %s, true)", (actor,))


async def _replace_children(conn: psycopg.AsyncConnection[Any], ext: Extension) -> None:
    """Make the versions and instances of `ext` exactly what the record says."""
    await conn.execute(
        "DELETE FROM extension_versions WHERE id = %s AND NOT (version = ANY(%s))",
        (ext.id, [v.version for v in ext.versions]),
    )
    for v in ext.versions:
        await conn.execute(
            "INSERT INTO extension_versions (id, version, subject, timeout_ms, retry, config,"
            " metadata, routing_rules, enabled) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (id, version) DO UPDATE SET subject = excluded.subject,"
            " timeout_ms = excluded.timeout_ms, retry = excluded.retry, config = excluded.config,"
            " metadata = excluded.metadata, routing_rules = excluded.routing_rules,"
            " enabled = excluded.enabled",
            (
                ext.id,
                v.version,
                v.subject,
                v.timeout_ms,
                v.retry,
                Jsonb(v.config),
                Jsonb(v.metadata),
                Jsonb(v.routing_rules),
                v.enabled,
            ),
        )
    await conn.execute(
        "DELETE FROM extension_instances WHERE extension_id = %s AND NOT (instance_id = ANY(%s))",
        (ext.id, [i.instance_id for i in ext.instances]),
    )
    for i in ext.instances:
        await conn.execute(
            "INSERT INTO extension_instances (extension_id, instance_id, subject, weight, enabled,"
            " health_status) VALUES (%s, %s, %s, %s, %s, %s)"
            " ON CONFLICT (extension_id, instance_id) DO UPDATE SET subject = excluded.subject,"
            " weight = excluded.weight, enabled = excluded.enabled,"
            " health_status = excluded.health_status",
            (ext.id, i.instance_id, i.subject, i.weight, i.enabled, i.health_status),
        )


def location_of(conninfo: str) -> str:
    """Where a connection string points, password-free: `host:port/database`, or
    `h1:p1,h2:p2/database` for a multi-host URL (a failover keeps it: it is the URL's, not
    the server's), so two spellings of one URL compare equal and a URL of another server or
    database does not."""
    try:
        parts = conninfo_to_dict(conninfo)
    except psycopg.ProgrammingError:
        return redact_url(conninfo)
    hosts = str(parts.get("host") or parts.get("hostaddr") or "local socket").split(",")
    ports = str(parts.get("port") or "").split(",")
    if len(ports) != len(hosts):  # libpq: one port for every host, or one per host
        ports = ports[:1] * len(hosts)
    where = ",".join(f"{host}:{port or 5432}" for host, port in zip(hosts, ports, strict=True))
    return f"{where}/{parts.get('dbname') or parts.get('user') or ''}"


def url_password(conninfo: str) -> str:
    try:
        return urlsplit(conninfo).password or ""
    except ValueError:
        return ""
