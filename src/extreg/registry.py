"""The registry: a lock-free cache of extensions and routing policies kept fresh from
PostgreSQL or fixtures.

Reads (`lookup`, `get`, `lookup_by_type`, `all`) dereference the current `Snapshot` and never
lock or wait. Everything that changes the cache runs in the background on the event loop and
ends by swapping in a new snapshot, under `_write_lock` so two writers cannot interleave a
database read and a swap. With the database, three things keep the cache fresh:

- LISTEN/NOTIFY: at commit, a trigger sends each changed extension's record as committed
  with the writing transaction's id (migration 008), applied without a read; a record too
  large for a notification, and a policy (`policy:<id>`), are named by id and re-read.
- the periodic sync, every `sync_interval_seconds`: compares every record's row versions with
  the previous sync's and re-reads those that differ, and drops ids that are gone; the safety
  net for anything a notification missed.
- reconnection: when the database goes away the cache keeps serving (status says stale) and
  the connection is retried with backoff; on return, one full reload catches up.

The database's commit order decides what is current, never a timestamp: `updated_at` is a
transaction's *start* time, so a transaction that starts first and commits last stamps the
newest row with the oldest time. Every read runs under `_write_lock` and is installed in the
order it was made, and a read made later sees every commit an earlier one saw, so the cache
only ever moves forward in commit order. A read record replaces the cached one whenever they
differ. A notification is a record as of its commit: it is applied unless the snapshot of the
read that the cached record came from had already seen its transaction (`core.visibility`);
notifications arrive in commit order, so one applied after another is newer.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import random
import threading
import time
from collections.abc import (
    AsyncIterator,
    Awaitable,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
)
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal

import structlog
import watchfiles

from .adapters.fixtures import read_fixtures
from .adapters.nats_feed import FeedHealth, FeedLink, Publisher, TokenRelay
from .adapters.postgres import LockTaken, Notice, PostgresSource
from .adapters.postgres_policies import PREFIX as POLICY_PREFIX
from .adapters.postgres_policies import key as policy_key
from .adapters.snapshot_file import Origin, read_snapshot, write_snapshot_file
from .core.chance import jitter
from .core.clock import SYSTEM_CLOCK, Clock, utc_now
from .core.feed import SILENCE_S, Position
from .core.feed import Message as FeedMessage
from .core.feed import Snapshot as FeedSnapshot
from .core.model import Extension
from .core.policy import Policy, PolicyLimits
from .core.snapshot import Snapshot
from .core.visibility import TxSnapshot, saw_in_all
from .errors import (
    Conflict,
    ExtensionDisabled,
    ExtensionNotFound,
    FixtureError,
    NatsUnavailable,
    PolicyDisabled,
    PolicyNotFound,
    SnapshotFileError,
    SourceUnavailable,
)
from .settings import Settings

if TYPE_CHECKING:
    from .invoke.health_store import HealthStore

log = structlog.get_logger("extreg.registry")

Served = Literal["database", "fixtures", "snapshot_file", "none"]

BACKOFF_MIN_S, BACKOFF_MAX_S = 0.1, 5.0
SNAPSHOT_RETRY_MAX_S = 30.0
# A node of the change feed that finds no publisher waits up to TAKEOVER_SPREAD_S before it
# tries to become it, and reads PostgreSQL itself at boot after BOOT_WAIT_S without one.
TAKEOVER_SPREAD_S = 1.0
BOOT_WAIT_S = 10.0
FEED_WAIT_S = 2.0  # a follower's refresh after a write waits this long at most for the feed
GAP_PAUSE_S = 0.05  # before the snapshot after a gap, doubling while gaps follow each other
SNAPSHOT_FILE_QUIET_S = 0.5  # a snapshot-file write waits for this much quiet (see below)
SNAPSHOT_FILE_INTERVAL_S = 5.0  # or until this long after the last write


@dataclass(frozen=True, slots=True)
class Status:
    """What the registry serves and how fresh it is; the answer to `extreg status`."""

    mode: str
    source: Served
    fallback_reason: str | None
    generation: int
    count: int
    enabled_count: int
    loaded_at: datetime | None
    stale: bool
    last_error: str | None
    last_sync_at: datetime | None
    database: str | None
    invalid_records: dict[str, str]  # database rows left out: {id: the rules they break}
    policy_count: int
    unusable_policies: dict[str, list[str]]  # {policy id: what it references that is gone}
    change_feed: str  # listen, or the NATS change feed's publisher or follower (`feed_role`)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        for key in ("loaded_at", "last_sync_at"):
            data[key] = data[key].isoformat() if data[key] else None
        return data


@dataclass(frozen=True, slots=True)
class ReloadReport:
    source: Served
    generation: int
    count: int
    added: int
    removed: int
    changed: int
    duration_ms: float

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


class Registry:
    """See the module docstring. Create with `Registry.open(settings)`."""

    def __init__(self, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> None:
        self.settings = settings
        self._clock = clock  # loaded_at, last_sync_at, the pace of sync error reports
        self._snap = Snapshot.empty()
        self._source: Served = "none"
        self._fallback_reason: str | None = None
        self._stale = False
        self._last_error: str | None = None
        self._last_sync_at: datetime | None = None
        self._row_versions: dict[str, str] = {}  # as of the last sync or full load
        self._origin: Origin | None = None  # the database the cache holds, once read
        # The snapshot of the read each cached record came from, and of the last full load's
        # parts (for ids it did not return): which notifications are older (`_apply_notices`).
        self._seen: dict[str, TxSnapshot] = {}
        self._seen_by_all: tuple[TxSnapshot, ...] = ()
        self._file_lock = threading.Lock()  # snapshot-file writers run in threads
        self._file_generation = 0  # the newest generation written to the snapshot file
        self._db: PostgresSource | None = None
        self._feed: FeedLink | None = None  # change_feed=nats: the link to the publisher
        self._publisher: Publisher | None = None  # set while this node is the publisher
        self._feed_health: FeedHealth | None = None
        self._at: Position | None = None  # where the cache stands in the publisher's feed
        self._fed_at = 0.0  # monotonic time of the last snapshot or message of the feed
        self._gaps = 0  # gaps in a row, without a change applied in between
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._snapshot_file_due = asyncio.Event()
        self._swapped = asyncio.Event()  # set at every swap (`_await_feed` waits on it)
        self._listeners: list[Any] = []
        self._sync_listeners: list[Any] = []
        self._snapshot_file_listeners: list[Any] = []
        self._sync_reported_at = float("-inf")  # monotonic time of the last on_sync report

    # -- reads: the router's hot path ---------------------------------------------------------

    def lookup(self, extension_id: str) -> Extension:
        """The enabled extension with this id; `ExtensionNotFound` or `ExtensionDisabled`."""
        ext = self._snap.enabled.get(extension_id)
        if ext is None:
            if extension_id in self._snap.by_id:
                raise ExtensionDisabled(extension_id)
            raise ExtensionNotFound(extension_id)
        return ext

    def get(self, extension_id: str) -> Extension | None:
        """The extension with this id, enabled or not, or None."""
        return self._snap.by_id.get(extension_id)

    def lookup_by_type(self, ext_type: str) -> tuple[Extension, ...]:
        """Enabled extensions of one type, by id."""
        return self._snap.by_type.get(ext_type, ())

    def all(self) -> list[Extension]:
        """Every cached extension, disabled ones too, by id."""
        return sorted(self._snap.by_id.values(), key=lambda e: e.id)

    def policy(self, policy_id: str) -> Policy | None:
        """The policy with this id, enabled or not, or None."""
        return self._snap.policies.get(policy_id)

    def lookup_policy(self, policy_id: str) -> Policy:
        """The enabled policy with this id; `PolicyNotFound` or `PolicyDisabled`."""
        policy = self._snap.policies.get(policy_id)
        if policy is None:
            raise PolicyNotFound(policy_id)
        if not policy.enabled:
            raise PolicyDisabled(policy_id)
        return policy

    def policies(self) -> list[Policy]:
        """Every cached policy, disabled ones too, by id."""
        return sorted(self._snap.policies.values(), key=lambda p: p.policy_id)

    @property
    def snapshot(self) -> Snapshot:
        return self._snap

    @property
    def status(self) -> Status:
        snap = self._snap
        return Status(
            mode=self.settings.source,
            source=self._source,
            fallback_reason=self._fallback_reason,
            generation=snap.generation,
            count=len(snap.by_id),
            enabled_count=len(snap.enabled),
            loaded_at=snap.loaded_at if snap.generation else None,
            stale=self._stale,
            last_error=self._last_error,
            last_sync_at=self._last_sync_at,
            database=self.settings.db_display if self.settings.database_configured else None,
            invalid_records=self.invalid_records,
            policy_count=len(snap.policies),
            unusable_policies=snap.unusable_policies,
            change_feed=self.feed_role,
        )

    @property
    def invalid_records(self) -> dict[str, str]:
        """Rows of the database left out of the cache because they break a record rule."""
        return dict(self._db.invalid) if self._db is not None and self._source == "database" else {}

    @property
    def database(self) -> PostgresSource:
        """The database adapter, for writes; `Conflict` when the registry runs on fixtures."""
        if self._db is None or self._source == "fixtures":
            raise Conflict(
                "the registry is serving fixtures, which are read-only: "
                "change the fixture files, or configure a database"
            )
        if self._source == "snapshot_file":  # booted while the database was down (503)
            raise SourceUnavailable(
                f"database {self.settings.db_display} was unreachable at boot: the registry is"
                " serving its last-known-good snapshot file, read-only until the database is"
                " back; retry the write then"
            )
        return self._db

    def on_change(self, callback: Any) -> None:
        """Call `callback(snapshot)` after every swap (metrics, dashboard)."""
        self._listeners.append(callback)

    def on_sync(self, callback: Any) -> None:
        """Call `callback(duration_s, error)` after every database sync or full reload;
        `error` is None on success, else the reason (metrics)."""
        self._sync_listeners.append(callback)

    def on_snapshot_file_error(self, callback: Any) -> None:
        """Call `callback(error)` after every failed write of the snapshot file (metrics)."""
        self._snapshot_file_listeners.append(callback)

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, settings: Settings, *, clock: Clock = SYSTEM_CLOCK
    ) -> AsyncIterator[Registry]:
        """Load on boot, keep fresh in the background, stop everything on exit."""
        registry = cls(settings, clock=clock)
        try:  # a failed or cancelled start closes what it opened (the pool, say)
            await registry.start()
            yield registry
        finally:
            await registry.close()

    async def refresh(self, ids: Iterable[str], *, policy_ids: Iterable[str] = ()) -> None:
        """Re-read extensions `ids` and policies `policy_ids` now. When it returns, the cache
        holds what the database had committed when it was called, or newer: a writer calls it
        after its commit so that a read right after the write sees it (the notification would
        bring it too, a moment later)."""
        if self._source != "database":
            return
        if self.feed_role == "follower":
            await self._await_feed(set(ids), set(policy_ids))
        else:
            await self._refresh(set(ids) | {policy_key(p) for p in policy_ids}, "write")

    async def _await_feed(self, ids: set[str], policy_ids: set[str]) -> None:
        """`refresh` on a follower of the change feed: wait (up to FEED_WAIT_S) until the
        feed has brought what the database holds now, rather than install a read. A
        follower's cache is the publisher's as of a position; a record read here and deleted
        a moment later by another node could stay forever, since the publisher, which never
        had it, would never publish its deletion."""
        assert self._db is not None
        read = await self._db.read_extensions(sorted(ids)) if ids else None
        records = {e.id: e for e in read.records} if read else {}
        found = {p.policy_id: p for p in await self._db.load_policies(sorted(policy_ids))}

        def arrived() -> bool:
            snap = self._snap
            return all(snap.by_id.get(i) == records.get(i) for i in ids) and all(
                snap.policies.get(p) == found.get(p) for p in policy_ids
            )

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FEED_WAIT_S):
                while True:
                    self._swapped.clear()
                    if arrived():
                        return
                    await self._swapped.wait()

    async def start(self) -> None:
        mode = self.settings.source
        if mode == "fixtures":
            await self._serve_fixtures()
            self._spawn(self._watch_fixtures())
            return
        if not self.settings.database_configured:  # none configured: the embedded one, as
            from .local.embedded import resolve_database  # `extreg serve` and the CLI use it

            try:  # (SPEC.md "Configuration"); imported only when it is the one
                self.settings = await resolve_database(self.settings)
            except SourceUnavailable as exc:
                if mode == "database":
                    raise
                self._fallback_reason = f"no database configured; {exc}"
        if not self.settings.database_configured:
            log.warning("serving_fixtures", reason=self._fallback_reason)
            await self._serve_fixtures()
            self._spawn(self._watch_fixtures())
            return
        follow = await self._open_source()
        loaded: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        follower = asyncio.create_task(follow(loaded))
        self._tasks.append(follower)  # so that close() stops it, even if this start is cancelled
        try:
            await loaded
        except SourceUnavailable as exc:
            self._tasks.remove(follower)
            follower.cancel()
            await asyncio.gather(follower, return_exceptions=True)
            await self._boot_without_database(str(exc))
            self._spawn(follow(None))
            return
        self._spawn(self._keep_snapshot_file())

    async def _open_source(
        self,
    ) -> Callable[[asyncio.Future[None] | None], Coroutine[Any, Any, None]]:
        """The database adapter, and with `change_feed=nats` the feed's NATS link (without
        NATS at boot, the node follows PostgreSQL itself, logged); returns how to follow."""
        if self.settings.change_feed == "nats":
            db = PostgresSource(self.settings, idle=True)
            feed = FeedLink(self.settings, db.location)
            try:
                await feed.open()
            except NatsUnavailable as exc:
                log.warning("change_feed_unavailable", error=str(exc), following="database")
            else:
                self._db, self._feed = db, feed
                self._feed_health = FeedHealth(feed, db)
                await db.open()
                return self._follow_feed
        self._db = PostgresSource(self.settings)
        return self._follow_database

    async def _boot_without_database(self, reason: str) -> None:
        self._stale = True
        self._last_error = reason
        if self.settings.source == "database":
            path = self.settings.snapshot_path
            assert self._db is not None
            try:
                found = read_snapshot(path, self._db.location)
            except SnapshotFileError as exc:
                raise SourceUnavailable(
                    f"{reason}; and no usable last-known-good snapshot: {exc}"
                ) from None
            self._fallback_reason = (
                f"{reason}; serving snapshot file written {found.written_at.isoformat()}"
            )
            log.warning(
                "serving_snapshot_file",
                path=str(path),
                reason=reason,
                count=len(found.extensions),
                policies=len(found.policies),
            )
            self._swap(found.extensions, "snapshot_file", found.policies)
        else:
            self._fallback_reason = reason
            log.warning("serving_fixtures", reason=reason)
            await self._serve_fixtures()
            self._spawn(self._watch_fixtures())
        self._spawn(self._keep_snapshot_file())

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._file_generation < self._snap.generation:  # a short-lived process leaves one too
            error = await self._write_snapshot_file()
            if error is not None:
                log.error("snapshot_file_not_written", error=error)
        if self._db is not None:
            await self._db.close()
        if self._feed is not None:
            await self._feed.close()

    async def reload(self) -> ReloadReport:
        """Read everything again from the source of this mode; keep serving on failure."""
        started = time.perf_counter()
        before = self._snap
        if self.settings.source == "fixtures" or self._db is None:
            await self._serve_fixtures()
        else:
            try:
                feed = self._feed if self.feed_role == "follower" else None
                snapshot = await feed.snapshot() if feed else None
                if snapshot is not None:  # a follower's cache is the publisher's: see refresh
                    await self._take_snapshot(snapshot)
                else:
                    await self._reload_from_database()
            except SourceUnavailable as exc:
                self._mark_stale(str(exc))
                if self.settings.source == "database" or self._source == "database":
                    raise
                await self._serve_fixtures()
        after = self._snap
        return ReloadReport(
            source=self._source,
            generation=after.generation,
            count=len(after),
            added=len(after.by_id.keys() - before.by_id.keys()),
            removed=len(before.by_id.keys() - after.by_id.keys()),
            changed=sum(
                1 for k, v in after.by_id.items() if k in before.by_id and before.by_id[k] != v
            ),
            duration_ms=round((time.perf_counter() - started) * 1000, 3),
        )

    # -- swapping -----------------------------------------------------------------------------

    def _swap(
        self, records: Iterable[Extension], source: Served, policies: Iterable[Policy] = ()
    ) -> None:
        self._install(Snapshot.build(records, self._snap.generation + 1, policies), source)

    def _install(self, snap: Snapshot, source: Served) -> None:
        snap = dataclasses.replace(snap, loaded_at=utc_now(self._clock))
        before = self._snap
        self._snap = snap  # the one assignment readers can observe
        self._swapped.set()
        _log_unusable(before, snap)
        self._source = source
        if source == "database":
            self._snapshot_file_due.set()
        for callback in self._listeners:
            callback(snap)

    async def _serve_fixtures(self) -> None:
        """Read the fixtures folder and serve it; `FixtureError` (and nothing served) if bad."""
        found = await read_fixtures(
            self.settings.fixtures_dir,
            max_timeout_ms=self.settings.extension_max_timeout_ms,
            max_retries=self.settings.extension_max_retries,
            policy_limits=PolicyLimits.from_settings(self.settings),
        )
        self._swap(found.extensions, "fixtures", found.policies)

    # -- fixtures -----------------------------------------------------------------------------

    async def _watch_fixtures(self) -> None:
        """Reload fixtures when their folder changes; a bad edit is logged and changes nothing."""
        async for changes in watchfiles.awatch(self.settings.fixtures_dir, debounce=200, step=20):
            if self._source != "fixtures":
                return
            try:
                before = self._snap
                await self._serve_fixtures()
            except FixtureError as exc:
                log.error("fixtures_rejected", problems=exc.problems)
                continue
            _log_diff(before, self._snap, "fixtures", [str(p) for _, p in changes])

    # -- database -----------------------------------------------------------------------------

    async def _follow_database(self, loaded: asyncio.Future[None] | None) -> None:
        """Follow PostgreSQL (`_track_database`) for good."""
        await self._keep_following(self._track_database, loaded)

    async def _keep_following(
        self,
        attempt: Callable[[asyncio.Future[None]], Awaitable[None]],
        loaded: asyncio.Future[None] | None,
    ) -> None:
        """Run `attempt(ready)` again and again; it sets `ready` once it has loaded. After a
        failure, back off (from the minimum again once an attempt had loaded) and retry. The
        first attempt reports its outcome through `loaded` instead of retrying."""
        backoff = BACKOFF_MIN_S
        while True:
            boot = loaded is not None and not loaded.done()
            ready = loaded if boot and loaded else asyncio.get_running_loop().create_future()
            try:
                await attempt(ready)
            except Exception as exc:
                if boot and not ready.done():
                    ready.set_exception(exc)
                    return
                self._database_failed(exc)
            if ready.done():
                backoff = BACKOFF_MIN_S
            await asyncio.sleep(jitter(backoff))
            backoff = min(backoff * 2, BACKOFF_MAX_S)

    async def _track_database(self, loaded: asyncio.Future[None], *, publish: bool = False) -> None:
        """Listen, load, then apply notifications and sync until something fails. LISTEN
        comes before the load so no change falls between. `publish`: only while holding the
        change feed's lock (else `LockTaken`), and publish every change on NATS meanwhile."""
        assert self._db is not None
        if not self._db.is_open:
            await self._db.open()
        async with self._db.listen(lock=publish) as payloads:
            await self._reload_from_database()
            if not loaded.done():
                loaded.set_result(None)
            work = [self._apply_notifications(payloads), self._sync_forever()]
            if not publish:
                await _first_failure(*work)
                return
            assert self._feed is not None
            self._publisher = Publisher(self._feed)
            log.info("change_feed_publishing", epoch=self._publisher.epoch)
            # Token changes made while nobody published were announced to nobody; and this
            # node's token follower, woken too, starts LISTENing in its new role.
            await self._feed.announce_tokens()
            try:
                async with self._feed.serving(self._feed_snapshot, self._db.update_health):
                    await _first_failure(*work, self._publisher.heartbeats())
            finally:
                self._publisher = None
                log.info("change_feed_publishing_stopped")

    def _database_failed(self, exc: Exception) -> None:
        reason = str(exc) if isinstance(exc, SourceUnavailable) else f"{type(exc).__name__}: {exc}"
        # While the database is away no sync runs, yet each one that falls due has failed:
        # report those (not every retry), so the sync error count grows.
        since = self._clock.monotonic() - self._sync_reported_at
        if since >= self.settings.sync_interval_seconds:
            self._report_sync(0.0, reason)
        self._mark_stale(reason)

    # -- the change feed on NATS (core/feed.py) -----------------------------------------------

    async def _follow_feed(self, loaded: asyncio.Future[None] | None) -> None:
        """Follow the publisher for good (`_feed_round`)."""
        self._fed_at = self._clock.monotonic()
        await self._keep_following(self._feed_round, loaded)

    async def _feed_round(self, ready: asyncio.Future[None]) -> None:
        """Take the publisher's snapshot, then apply its messages until a gap or silence.
        When no publisher answers, try to become it (the lock decides; after a random pause,
        so a fleet does not connect all at once). A node that cannot and has nothing yet
        after BOOT_WAIT_S reads PostgreSQL itself, and so does a node left without a
        publisher, once per sync interval."""
        assert self._feed is not None
        async with self._feed.messages() as queue:
            snapshot = await self._feed.snapshot()
            if snapshot is not None:
                await self._take_snapshot(snapshot)
                if not ready.done():
                    ready.set_result(None)
                await self._apply_feed(queue)
                return
        await asyncio.sleep(random.uniform(0, TAKEOVER_SPREAD_S))
        with contextlib.suppress(LockTaken):
            await self._track_database(ready, publish=True)
        patience = (
            BOOT_WAIT_S if self._snap.generation == 0 else self.settings.sync_interval_seconds
        )
        if self._clock.monotonic() - self._fed_at >= patience:
            await self._reload_from_database()  # nobody publishes: read it ourselves
            self._fed_at = self._clock.monotonic()
            if not ready.done():
                ready.set_result(None)

    async def _take_snapshot(self, snapshot: FeedSnapshot) -> None:
        """Serve the publisher's snapshot (its records as this node's database's)."""
        assert self._db is not None
        async with self._write_lock:
            before = self._snap
            _, name, system_identifier = snapshot.origin
            self._origin = Origin(self._db.location, name, system_identifier)
            self._swap(snapshot.extensions, "database", snapshot.policies)
            self._at = Position(snapshot.epoch, snapshot.seq)
        self._fed_at = self._clock.monotonic()
        self._confirmed()
        self._mark_fresh()
        self._fallback_reason = None
        _log_diff(before, self._snap, "change_feed", None)

    async def _apply_feed(self, queue: asyncio.Queue[FeedMessage | None]) -> None:
        """Apply the publisher's messages in order from the position of the snapshot taken;
        return on a gap or on silence. Messages that queued up while one was applied are
        applied together, in one patch (as notifications are), so a node that falls behind
        catches up instead of falling further behind."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(SILENCE_S) as silence:  # one timer, moved per batch
                while True:
                    batch = [await queue.get()]
                    while not queue.empty():
                        batch.append(queue.get_nowait())
                    if not await self._apply_messages(batch):
                        return
                    silence.reschedule(loop.time() + SILENCE_S)
        except TimeoutError:
            self._mark_stale(f"no message from the change feed's publisher for {SILENCE_S} s")

    async def _apply_messages(self, batch: list[FeedMessage | None]) -> bool:
        """Apply the messages of `batch` that come next, in one patch (under the write lock,
        where a `reload` may move the position too); False on a gap."""
        records: dict[str, Extension | None] = {}
        policies: dict[str, Policy | None] = {}
        gap, confirmed = False, False
        async with self._write_lock:
            at = self._at
            for message in batch:
                verdict = "gap" if message is None or at is None else at.judge(message)
                if verdict == "gap":
                    gap = True
                    log.info("change_feed_gap", at=at and at.seq, got=message and message.seq)
                    break
                assert message is not None and at is not None
                confirmed |= message.kind == "heartbeat"
                if verdict == "apply":
                    records.update((e.id, e) for e in message.extensions)
                    records.update(dict.fromkeys(message.deleted))
                    policies.update((p.policy_id, p) for p in message.policies)
                    policies.update(dict.fromkeys(message.policies_deleted))
                    at = Position(message.epoch, message.seq)
            if at is not self._at:
                await self._patch(records, policies, "change_feed")
                self._at = at
                self._gaps = 0
        if gap:
            # Gap after gap without a change applied (messages this node cannot read, say):
            # ask for snapshots ever less often.
            await asyncio.sleep(jitter(min(GAP_PAUSE_S * 2**self._gaps, BACKOFF_MAX_S)))
            self._gaps += 1
            return False
        if confirmed:
            self._confirmed()  # the publisher says this node is up to date: a sync's worth
        self._fed_at = self._clock.monotonic()
        self._mark_fresh()
        return True

    def _confirmed(self) -> None:
        """Count a snapshot taken, or a heartbeat at this node's position, as a successful
        sync (status, metrics: the alerts on syncs hold for followers of the feed too)."""
        self._last_sync_at = utc_now(self._clock)
        self._report_sync(0.0, None)

    def _feed_snapshot(self) -> FeedSnapshot:
        """The publisher's cache and position, for a node that asks (`FeedLink.serving`)."""
        assert self._publisher is not None and self._origin is not None
        snap = self._snap
        return FeedSnapshot(
            self._publisher.epoch,
            self._publisher.seq,
            list(snap.by_id.values()),
            list(snap.policies.values()),
            (self._origin.location, self._origin.name, self._origin.system_identifier),
        )

    @property
    def feed_role(self) -> Literal["listen", "publisher", "follower"]:
        """How this node hears of changes: LISTEN on PostgreSQL, or the NATS change feed as its
        publisher or as one of its followers."""
        if self._feed is None:
            return "listen"
        return "publisher" if self._publisher is not None else "follower"

    @property
    def health_store(self) -> HealthStore:
        """Where this node's health batches go: the database, or on a follower of the change
        feed, the publisher (over NATS)."""
        if self.feed_role == "follower":
            assert self._feed_health is not None
            return self._feed_health
        return self.database

    @property
    def token_relay(self) -> TokenRelay | None:
        """How API token changes reach this node on a fleet of the change feed, else None."""
        return TokenRelay(self._feed, lambda: self.feed_role) if self._feed else None

    async def _reload_from_database(self) -> None:
        assert self._db is not None
        async with self._write_lock:
            with self._reporting_sync():
                if self._origin is None:
                    self._origin = await self._db.origin()
                versions = await self._db.row_versions()  # before the load: see `sync`
                parts = await self._db.read_all_extensions()
                policies = await self._db.load_all_policies()
            before = self._snap
            self._swap((e for part in parts for e in part.records), "database", policies)
            self._row_versions = versions
            self._seen = {e.id: part.snapshot for part in parts for e in part.records}
            self._seen_by_all = tuple(part.snapshot for part in parts)
            if self._publisher is not None:
                await self._publisher.send("reset")
        self._mark_fresh()
        if self._fallback_reason:
            log.info("database_back", count=len(self._snap))
            self._fallback_reason = None
        _log_diff(before, self._snap, "database", None)

    async def _apply_notifications(self, payloads: AsyncIterator[str]) -> None:
        """Apply queued notifications together: those that carry their record as they are,
        the rest (`policy:<id>`, a record too large to carry) by re-reading what they name."""
        assert self._db is not None
        queue: asyncio.Queue[str] = asyncio.Queue()

        async def pump() -> None:
            async for payload in payloads:
                queue.put_nowait(payload)

        async def apply() -> None:
            assert self._db is not None
            while True:
                notices = [self._db.notice(await queue.get())]
                while not queue.empty():
                    notices.append(self._db.notice(queue.get_nowait()))
                if any(n.key == "*" for n in notices):
                    await self._reload_from_database()
                    continue
                await self._apply_notices(notices)
                await self._refresh({n.key for n in notices if n.xid is None}, "notification")

        await _first_failure(pump(), apply())

    async def _apply_notices(self, notices: list[Notice]) -> None:
        """Install the records that notifications carry, in commit order (the order they
        came in), skipping those whose transaction the last read of the record had seen
        (`core.visibility`): so the cache never moves back."""
        async with self._write_lock:
            records: dict[str, Extension | None] = {}
            for notice in notices:
                if notice.xid is None:
                    continue
                seen = self._seen.get(notice.key)
                if seen.saw(notice.xid) if seen else saw_in_all(self._seen_by_all, notice.xid):
                    continue
                records[notice.key] = notice.record
            await self._patch(records, {}, "notification")

    async def _sync_forever(self) -> None:
        while True:
            await asyncio.sleep(self.settings.sync_interval_seconds)
            await self.sync()

    async def sync(self) -> None:
        """One sync: re-read every record whose row versions changed since the last one.

        The versions are read before the records they guard, so a write that commits in
        between shows up as a difference at the next sync, never as a miss."""
        assert self._db is not None
        started = time.perf_counter()
        with self._reporting_sync():
            versions = await self._db.row_versions()  # policies keyed `policy:<id>`
            changed = {i for i, v in versions.items() if self._row_versions.get(i) != v}
            cached = self._snap.by_id.keys() | {policy_key(p) for p in self._snap.policies}
            gone = cached - versions.keys()
            await self._refresh(changed | gone, "sync")
        self._row_versions = versions
        self._last_sync_at = utc_now(self._clock)
        self._mark_fresh()
        log.debug(
            "synced",
            changed=len(changed),
            deleted=len(gone),
            duration_ms=round((time.perf_counter() - started) * 1000, 2),
        )

    async def _refresh(self, ids: set[str], why: str) -> None:
        """Re-read `ids` (extension ids, and policies as `policy:<id>`) and patch them into a
        new snapshot; ids not found are deleted."""
        if not ids:
            return
        assert self._db is not None
        policy_ids = {i[len(POLICY_PREFIX) :] for i in ids if i.startswith(POLICY_PREFIX)}
        ids = {i for i in ids if not i.startswith(POLICY_PREFIX)}
        async with self._write_lock:
            records: dict[str, Extension | None] = dict.fromkeys(ids)
            if ids:
                read = await self._db.read_extensions(sorted(ids))
                records.update((e.id, e) for e in read.records)
                self._seen.update(dict.fromkeys(ids, read.snapshot))
            policies: dict[str, Policy | None] = dict.fromkeys(policy_ids)
            if policy_ids:
                policies.update(
                    (p.policy_id, p) for p in await self._db.load_policies(sorted(policy_ids))
                )
            await self._patch(records, policies, why)

    async def _patch(
        self,
        records: Mapping[str, Extension | None],
        policies: Mapping[str, Policy | None],
        why: str,
    ) -> None:
        """Install these records and policies (None: deleted) where they differ from the
        cache, log each change, and as the feed's publisher, publish them. The caller holds
        `_write_lock`, so changes are published in the order they are installed."""
        before = self._snap
        upserts = [e for e in records.values() if e is not None and e != before.by_id.get(e.id)]
        deleted = [i for i, e in records.items() if e is None and i in before.by_id]
        policy_upserts = [
            p for p in policies.values() if p is not None and p != before.policies.get(p.policy_id)
        ]
        policies_deleted = [i for i, p in policies.items() if p is None and i in before.policies]
        if not (upserts or deleted or policy_upserts or policies_deleted):
            return
        self._install(
            before.patched(upserts, deleted, policy_upserts, policies_deleted), "database"
        )
        if self._publisher is not None:
            await self._publisher.send(
                "change",
                extensions=upserts,
                deleted=deleted,
                policies=policy_upserts,
                policies_deleted=policies_deleted,
            )
        for ext in upserts:
            log.info(
                "extension_changed",
                extension_id=ext.id,
                enabled=ext.enabled,
                via=why,
                created=ext.id not in before.by_id,
            )
        for ext_id in deleted:
            log.info("extension_deleted", extension_id=ext_id, via=why)
        for policy in policy_upserts:
            log.info(
                "policy_changed",
                policy_id=policy.policy_id,
                enabled=policy.enabled,
                via=why,
                created=policy.policy_id not in before.policies,
            )
        for policy_id in policies_deleted:
            log.info("policy_deleted", policy_id=policy_id, via=why)

    @contextlib.contextmanager
    def _reporting_sync(self) -> Iterator[None]:
        """Time a sync and tell `on_sync` listeners how it went (a cancel is not reported)."""
        started = time.perf_counter()
        try:
            yield
        except SourceUnavailable as exc:
            self._report_sync(time.perf_counter() - started, str(exc))
            raise
        self._report_sync(time.perf_counter() - started, None)

    def _report_sync(self, duration_s: float, error: str | None) -> None:
        self._sync_reported_at = self._clock.monotonic()
        for callback in self._sync_listeners:
            callback(duration_s, error)

    def _mark_stale(self, reason: str) -> None:
        if not self._stale:
            log.warning(
                "database_unavailable", error=reason, serving=self._source, count=len(self._snap)
            )
        self._stale = True
        self._last_error = reason

    def _mark_fresh(self) -> None:
        if self._stale:
            log.info("database_recovered", count=len(self._snap))
        self._stale = False
        self._last_error = None

    async def _keep_snapshot_file(self) -> None:
        """Write the last-known-good file after loads and changes; retry a failed write with
        backoff rather than wait for the next change (one error line per outage, not per
        attempt). Encoding every record holds the GIL and delays every lookup and
        notification meanwhile (tens of ms at 10,000 records), so while changes stream in,
        a write waits until they have been quiet for SNAPSHOT_FILE_QUIET_S, or until
        SNAPSHOT_FILE_INTERVAL_S have passed since the last write, and holds all of them; the
        first write (at boot) and one after a long quiet spell are made at once."""
        backoff = BACKOFF_MIN_S
        failing = False
        written_at = float("-inf")
        while True:
            await self._snapshot_file_due.wait()
            while self._clock.monotonic() - written_at < SNAPSHOT_FILE_INTERVAL_S:
                # (not asyncio.wait_for: on 3.11 it can swallow a cancellation)
                self._snapshot_file_due.clear()
                await asyncio.sleep(SNAPSHOT_FILE_QUIET_S)
                if not self._snapshot_file_due.is_set():
                    break  # quiet
            self._snapshot_file_due.clear()
            error = await self._write_snapshot_file()
            if error is None:
                if failing:
                    log.info("snapshot_file_written", path=str(self.settings.snapshot_path))
                backoff, failing = BACKOFF_MIN_S, False
                written_at = self._clock.monotonic()
                continue
            if not failing:
                log.error("snapshot_file_not_written", error=error)
            failing = True
            self._snapshot_file_due.set()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, SNAPSHOT_RETRY_MAX_S)

    async def _write_snapshot_file(self) -> str | None:
        """Write the current snapshot to the file, in a thread; the reason if it failed."""
        if self._source != "database" or self._origin is None:
            return None
        try:
            await asyncio.to_thread(self._write_file, self._snap, self._origin)
        except SnapshotFileError as exc:
            for callback in self._snapshot_file_listeners:
                callback(str(exc))
            return str(exc)
        return None

    def _write_file(self, snap: Snapshot, origin: Origin) -> None:
        """Never let an older snapshot replace a newer one: a write abandoned by a cancelled
        task may still be running in its thread when the next one starts."""
        with self._file_lock:
            if snap.generation <= self._file_generation:
                return
            write_snapshot_file(
                self.settings.snapshot_path,
                list(snap.by_id.values()),
                origin,
                list(snap.policies.values()),
            )
            self._file_generation = snap.generation

    def _spawn(self, coro: Any) -> None:
        self._tasks.append(asyncio.create_task(coro))


async def _first_failure(*coros: Any) -> None:
    """Run coroutines together; when one ends or fails, cancel the others and re-raise."""
    tasks = [asyncio.create_task(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in done:
            task.result()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _log_unusable(before: Snapshot, after: Snapshot) -> None:
    """Warn once when a policy becomes unusable (an extension it names is gone, disabled or
    retyped), and say when it is usable again."""
    for policy_id in sorted(after.unusable_policies.keys() - before.unusable_policies.keys()):
        log.warning(
            "policy_unusable", policy_id=policy_id, problems=after.unusable_policies[policy_id]
        )
    for policy_id in sorted(before.unusable_policies.keys() - after.unusable_policies.keys()):
        if policy_id in after.policies:
            log.info("policy_usable", policy_id=policy_id)


def _log_diff(before: Snapshot, after: Snapshot, source: str, paths: list[str] | None) -> None:
    added = sorted(after.by_id.keys() - before.by_id.keys())
    removed = sorted(before.by_id.keys() - after.by_id.keys())
    changed = sorted(
        k for k in after.by_id.keys() & before.by_id.keys() if after.by_id[k] != before.by_id[k]
    )
    log.info(
        "reloaded",
        source=source,
        count=len(after),
        policies=len(after.policies),
        generation=after.generation,
        added=_some(added),
        removed=_some(removed),
        changed=_some(changed),
        files=paths,
    )


def _some(ids: list[str], limit: int = 20) -> list[str] | str:
    """Ids for a log line: all of a few, or a count and the first few of many."""
    return ids if len(ids) <= limit else f"{len(ids)} ids: {', '.join(ids[:limit])}, ..."
