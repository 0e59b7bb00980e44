"""The change feed on NATS (`change_feed=nats`): what the publisher and the other nodes send.

Subjects, under the `change_feed_subject` prefix (default `extreg.feed`):

    <prefix>.changes    the publisher's messages (`core.feed.Message`), JSON, in order
    <prefix>.snapshot   a request; the publisher answers its whole cache (`core.feed.Snapshot`),
                        zlib-compressed JSON in parts that fit the server's max_payload, each
                        with headers `Extreg-Snapshot` (which answer) and `Extreg-Part` (i/n)
    <prefix>.health     a request carrying a node's health batch (`health_wire`); the publisher
                        writes it to PostgreSQL and answers `applied` or `already`
    <prefix>.tokens     an empty message: the API tokens changed (`TokenRelay`); never the
                        tokens themselves, which nodes read from PostgreSQL

Why NATS core and not JetStream: the publisher numbers its messages and a node that misses one
takes a snapshot, so nothing needs to be stored in NATS, and the feed works on any NATS server
the extensions already use.

Every nats-py error is turned into `SourceUnavailable` here (the feed stands in for the
database), naming the redacted URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import uuid
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from datetime import UTC, datetime

import msgspec
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from ..core.feed import HEARTBEAT_S, Kind, Message, Snapshot
from ..core.model import Extension
from ..core.policy import Policy
from ..errors import InvalidRecord, SourceUnavailable
from ..settings import Settings
from .health_wire import decode_batch, encode_batch
from .nats import connect, error_text
from .postgres import PostgresSource
from .postgres_health import HealthBatch, HealthRow

log = structlog.get_logger("extreg.feed")

SNAPSHOT_WAIT_S = 5.0  # for the first part of a snapshot, and then for each next one
HEALTH_WAIT_S = 5.0
PART_SPARE = 4096  # bytes of max_payload left for headers and protocol
TOKEN_SPREAD_S = 2.0
DATABASE_HEADER = "Extreg-Database"
MAX_SNAPSHOT_BYTES = 1 << 30  # decompressed: 10,000 records are about 10 MB
MAX_HEALTH_BYTES = 64 << 20
COMPRESS_LEVEL = 1  # fast: a snapshot of 10,000 records is a few MB of JSON

_encode = msgspec.json.Encoder().encode
_decode_message = msgspec.json.Decoder(Message).decode
_decode_snapshot = msgspec.json.Decoder(Snapshot).decode


class FeedLink:
    """This node's NATS connection for the feed. `await open()`, then the methods of its role.

    Every message, answer and request carries the header `Extreg-Database`: where the
    sender's settings say the database is (`PostgresSource.location`, password-free). A node
    ignores what comes from another database's nodes, so two deployments that share a NATS
    and a subject do not follow each other (each elects its own publisher: the lock is per
    database). Every node of one deployment must therefore name the database alike."""

    def __init__(self, settings: Settings, database: str) -> None:
        self._url = settings.nats_url
        self.display = settings.nats_display
        self.headers = {DATABASE_HEADER: database}  # on everything this node sends
        prefix = settings.change_feed_subject
        self.changes_subject = f"{prefix}.changes"
        self.snapshot_subject = f"{prefix}.snapshot"
        self.health_subject = f"{prefix}.health"
        self.tokens_subject = f"{prefix}.tokens"
        self._nc: Client | None = None
        self._encoded: tuple[str, list[bytes]] = ("", [])  # the last snapshot answered

    async def open(self) -> None:
        """Connect (`NatsUnavailable` when NATS does not answer); reconnects forever after."""
        self._nc = await connect(self._url, "extreg-feed")
        self._nc.options["max_reconnect_attempts"] = -1

    async def close(self) -> None:
        if self._nc is not None:
            with contextlib.suppress(Exception):
                await self._nc.close()

    @property
    def nc(self) -> Client:
        assert self._nc is not None, "FeedLink.open() first"
        return self._nc

    def unavailable(self, what: str, exc: BaseException) -> SourceUnavailable:
        return SourceUnavailable(f"change feed on NATS {self.display}: {what}: {error_text(exc)}")

    def ours(self, msg: Msg) -> bool:
        """Sent by a node of this node's database."""
        return (msg.headers or {}).get(DATABASE_HEADER) == self.headers[DATABASE_HEADER]

    async def subscribe(
        self, subject: str, callback: Callable[[Msg], Awaitable[None]]
    ) -> Subscription:
        try:
            return await self.nc.subscribe(subject, cb=callback)
        except (nats.errors.Error, OSError) as exc:
            raise self.unavailable("cannot subscribe", exc) from None

    # -- a node that follows --------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def messages(self) -> AsyncIterator[asyncio.Queue[Message | None]]:
        """The publisher's messages as they come; None stands for one that could not be read
        (a gap: the node takes a snapshot)."""
        queue: asyncio.Queue[Message | None] = asyncio.Queue()

        async def on_message(msg: Msg) -> None:
            if not self.ours(msg):
                return
            try:
                queue.put_nowait(_decode_message(msg.data))
            except msgspec.DecodeError as exc:
                log.warning("change_feed_message_unreadable", error=str(exc))
                queue.put_nowait(None)

        sub = await self.subscribe(self.changes_subject, on_message)
        try:
            yield queue
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def snapshot(self) -> Snapshot | None:
        """The publisher's whole cache, or None when no publisher answers."""
        parts: dict[int, bytes] = {}
        answer: str | None = None  # the first answer's id: a second publisher's is ignored
        count = 1
        nobody = False
        arrived = asyncio.Event()

        async def on_part(msg: Msg) -> None:
            nonlocal answer, count, nobody
            headers = msg.headers or {}
            if headers.get("Status") == "503":  # no responders: no publisher
                nobody = True
            elif self.ours(msg) and answer in (None, headers.get("Extreg-Snapshot")):
                answer = headers.get("Extreg-Snapshot")
                index, _, of = headers.get("Extreg-Part", "0/1").partition("/")
                parts[int(index)], count = msg.data, int(of)
            arrived.set()

        sub = await self.subscribe(self.nc.new_inbox(), on_part)
        try:
            try:
                await self.nc.publish(self.snapshot_subject, b"", sub.subject, self.headers)
            except (nats.errors.Error, OSError) as exc:
                raise self.unavailable("cannot ask for a snapshot", exc) from None
            while len(parts) < count:
                if nobody:
                    return None
                arrived.clear()
                try:
                    async with asyncio.timeout(SNAPSHOT_WAIT_S):
                        await arrived.wait()
                except TimeoutError:
                    return None
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        try:
            data = _inflate(b"".join(parts[i] for i in sorted(parts)), MAX_SNAPSHOT_BYTES)
            return _decode_snapshot(data)
        except (zlib.error, msgspec.DecodeError) as exc:
            log.warning("change_feed_snapshot_unreadable", error=str(exc))
            return None

    async def send_health(self, data: bytes) -> bool:
        """Have the publisher write a batch (`health_bytes`): True when written now, False
        when it was written before; `SourceUnavailable` when no publisher answered (the
        batch stays queued)."""
        try:
            reply = await self.nc.request(
                self.health_subject, data, HEALTH_WAIT_S, headers=self.headers
            )
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            raise self.unavailable("no publisher took the health batch", exc) from None
        if reply.data not in (b"applied", b"already"):
            raise SourceUnavailable(reply.data.decode("utf-8", "replace"))
        return reply.data == b"applied"

    # -- the publisher --------------------------------------------------------------------------

    async def publish(self, message: Message) -> None:
        data = _encode(message)
        if len(data) > self.nc.max_payload - PART_SPARE:  # a bulk change: take a snapshot
            data = _encode(Message(message.epoch, message.seq, "reset"))
        try:
            await self.nc.publish(self.changes_subject, data, headers=self.headers)
        except (nats.errors.Error, OSError) as exc:
            raise self.unavailable("cannot publish", exc) from None

    async def announce_tokens(self) -> None:
        """Tell every node to re-read the API tokens (`TokenRelay`)."""
        with contextlib.suppress(nats.errors.Error, OSError):  # their timers re-read anyway
            await self.nc.publish(self.tokens_subject, b"", headers=self.headers)

    def _snapshot_parts(self, current: Snapshot) -> tuple[str, list[bytes]]:
        """`current` compressed and cut to fit max_payload; encoded once per position, since
        a reset or a fleet's restart has many nodes ask at the same time."""
        which = f"{current.epoch}:{current.seq}"
        if self._encoded[0] != which:
            data = zlib.compress(_encode(current), COMPRESS_LEVEL)
            size = max(self.nc.max_payload - PART_SPARE, 1024)
            chunks = [data[i : i + size] for i in range(0, len(data), size)] or [b""]
            self._encoded = (which, chunks)
        return self._encoded

    @contextlib.asynccontextmanager
    async def serving(
        self,
        snapshot: Callable[[], Snapshot],
        write_health: Callable[[HealthBatch], Awaitable[bool]],
    ) -> AsyncIterator[None]:
        """Answer snapshot and health requests of this database's nodes while inside."""
        nc = self.nc

        async def on_snapshot(msg: Msg) -> None:
            if not msg.reply or not self.ours(msg):
                return
            which, chunks = self._snapshot_parts(snapshot())
            for index, chunk in enumerate(chunks):
                headers = {
                    **self.headers,
                    "Extreg-Snapshot": which,
                    "Extreg-Part": f"{index}/{len(chunks)}",
                }
                await nc.publish(msg.reply, chunk, headers=headers)

        async def on_health(msg: Msg) -> None:
            if not self.ours(msg):
                await msg.respond(b"health batch refused: it is of another database")
                return
            try:
                batch = decode_batch(_inflate(msg.data, MAX_HEALTH_BYTES))
            except (zlib.error, InvalidRecord) as exc:
                log.warning("health_batch_unreadable", error=str(exc))
                await msg.respond(f"unreadable health batch: {exc}".encode())
                return
            try:
                applied = await write_health(batch)
            except Exception as exc:  # told to the sender, who keeps the batch and retries
                await msg.respond(f"health batch not written: {exc}".encode())
                return
            await msg.respond(b"applied" if applied else b"already")

        async with contextlib.AsyncExitStack() as stack:
            for subject, callback in (
                (self.snapshot_subject, on_snapshot),
                (self.health_subject, on_health),
            ):
                sub = await self.subscribe(subject, callback)
                stack.push_async_callback(_unsubscribe, sub)
            yield


async def _unsubscribe(sub: Subscription) -> None:
    with contextlib.suppress(Exception):
        await sub.unsubscribe()


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib-decompress at most `limit` bytes (`zlib.error` beyond): what comes over NATS is
    not trusted to be small."""
    inflater = zlib.decompressobj()
    out = inflater.decompress(data, limit)
    if inflater.unconsumed_tail:
        raise zlib.error(f"decompresses to more than {limit:,} bytes")
    return out


class Publisher:
    """The publisher's side of the feed: a fresh epoch, and messages numbered without gaps.

    `send` numbers a message before its first await and nats-py queues it before its own, so
    messages leave in the order `send` was called (the registry calls it under its write
    lock, in the order it installs changes)."""

    def __init__(self, link: FeedLink) -> None:
        self._link = link
        self.epoch = uuid.uuid4().hex
        self.seq = 0

    async def send(
        self,
        kind: Kind,
        *,
        extensions: Sequence[Extension] = (),
        deleted: Sequence[str] = (),
        policies: Sequence[Policy] = (),
        policies_deleted: Sequence[str] = (),
    ) -> None:
        self.seq += 1
        message = Message(
            self.epoch,
            self.seq,
            kind,
            list(extensions),
            list(deleted),
            list(policies),
            list(policies_deleted),
        )
        await self._link.publish(message)

    async def heartbeats(self) -> None:
        """Repeat the position every HEARTBEAT_S, until cancelled."""
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            await self._link.publish(Message(self.epoch, self.seq, "heartbeat"))


class TokenRelay:
    """API token changes on a fleet of the change feed (`tokens.TokenFollower`): the publisher
    LISTENs on PostgreSQL and announces each change; the other nodes, which hold no database
    connection, re-read the tokens when told, after a random pause of up to TOKEN_SPREAD_S (so
    a fleet does not connect all at once), and every `timeout` anyway. Only the fact of a
    change travels: tokens are read from the database, so nobody on NATS can add one."""

    def __init__(self, link: FeedLink, role: Callable[[], str]) -> None:
        self._link = link
        self._role = role

    @property
    def following(self) -> bool:
        return self._role() == "follower"

    async def announce(self) -> None:
        await self._link.announce_tokens()

    @contextlib.asynccontextmanager
    async def changes(self) -> AsyncIterator[Announcements]:
        told = asyncio.Event()

        async def on_tokens(msg: Msg) -> None:
            if self._link.ours(msg):
                told.set()

        sub = await self._link.subscribe(self._link.tokens_subject, on_tokens)
        try:
            yield Announcements(told)
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()


class Announcements:
    def __init__(self, told: asyncio.Event) -> None:
        self._told = told

    async def wait(self, timeout: float) -> None:
        """Return a moment after the next announcement, or after `timeout` without one."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._told.wait()
            await asyncio.sleep(random.uniform(0, TOKEN_SPREAD_S))
        self._told.clear()


class FeedHealth:
    """The health store of a node without a database connection: batches go through the
    publisher, which writes them (exactly once: see `health_store`). Cluster-wide totals are
    not read back; this node shows its own calls."""

    def __init__(self, link: FeedLink, db: PostgresSource) -> None:
        self._link = link
        self._db = db

    async def update_health(self, batch: HealthBatch) -> bool:
        """Through the publisher; a batch too large for one NATS message (after a long
        outage of the publisher) is written by this node itself, exactly once all the same."""
        data = zlib.compress(encode_batch(batch), COMPRESS_LEVEL)
        if len(data) > self._link.nc.max_payload - PART_SPARE:
            return await self._db.update_health(batch)
        return await self._link.send_health(data)

    async def read_health(
        self, since: datetime | None = None, ids: list[str] | None = None, *, recent_since: float
    ) -> tuple[datetime, list[HealthRow]]:
        return datetime.now(UTC), []

    async def prune_health(self, before: float) -> None:
        """The publisher prunes."""
