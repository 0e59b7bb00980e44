"""Discovery over NATS's service API: which micro services answer, their endpoints and stats.

NATS services built on a micro library (`nats.micro` in nats-py, `micro` in nats.go, ...)
answer `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` with typed JSON (`io.nats.micro.v1.*`). A
request on those subjects gets one reply per service instance, and nats-py has no "request
many", so `discover` publishes the three with reply subjects under one private inbox and
collects every reply for a fixed `wait_s`: bounded, and long enough on a LAN for every
instance to answer. A plain subscriber outside the service API cannot be seen this way
(only by sending it a message), so it is not probed: its records read `served: false`.

A reply that is not the schema's JSON (a foreign responder on `$SRV.*`, a broken library) is
skipped and described in `Discovery.skipped`, never raised. nats-py's errors become the error
tree here: NATS out of reach, or lost during the collection, is `NatsUnavailable`, its
message naming the server by its password-free form only.

    found = await discover(settings.nats_url, wait_s=1.0)
    rows = records_served(registry.all(), found.services)
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any

import msgspec
import nats
import nats.errors
import structlog
from nats.aio.msg import Msg
from pydantic import SecretStr

from ..core.model import Extension
from ..errors import NatsUnavailable
from ..settings import redact_nats_url
from .nats import NO_RESPONDERS, STATUS_HEADER, connect, error_text

log = structlog.get_logger("extreg.discover")

DEFAULT_WAIT_S = 1.0
PREFIX = "$SRV"
SERVICE_TYPES = {
    "PING": "io.nats.micro.v1.ping_response",
    "INFO": "io.nats.micro.v1.info_response",
    "STATS": "io.nats.micro.v1.stats_response",
}
"""The verbs asked, and the `type` each answer carries (nats.micro's schema)."""
NOTE_LIMIT = 200
"""A skipped reply's note holds at most this many characters of the decoder's complaint."""


# ---- what discovery answers ----------------------------------------------------------------


class DiscoveredEndpoint(msgspec.Struct):
    """One endpoint of a service instance. Its stats are None when that instance's
    `$SRV.STATS` answer is missing or was skipped; `average_processing_time` is in
    nanoseconds, as the service API gives it."""

    name: str
    subject: str
    num_requests: int | None
    num_errors: int | None
    average_processing_time: int | None


class DiscoveredService(msgspec.Struct):
    """One service instance (`id` is per instance; instances of a service share `name`)."""

    name: str
    id: str
    version: str
    endpoints: list[DiscoveredEndpoint]


class Discovery(msgspec.Struct):
    """The services that answered, by name then id; and a note per reply left out."""

    services: list[DiscoveredService]
    skipped: list[str]


class RecordServed(msgspec.Struct):
    """A registry record beside discovery: whether an endpoint serves its subject, and the
    names of the services whose endpoints do."""

    id: str
    subject: str
    served: bool
    services: list[str]


# ---- the service API's replies (only the fields used; unknown ones are ignored) ----------


class _Identity(msgspec.Struct, tag_field="type"):
    name: str
    id: str
    version: str


class _Ping(_Identity, tag=SERVICE_TYPES["PING"]):
    pass


class _EndpointInfo(msgspec.Struct):
    name: str
    subject: str


class _Info(_Identity, tag=SERVICE_TYPES["INFO"]):
    endpoints: list[_EndpointInfo] = []


class _EndpointStats(msgspec.Struct):
    name: str
    subject: str
    num_requests: int
    num_errors: int
    average_processing_time: int


class _Stats(_Identity, tag=SERVICE_TYPES["STATS"]):
    endpoints: list[_EndpointStats] = []


_decode = msgspec.json.Decoder(_Ping | _Info | _Stats).decode


# ---- asking ---------------------------------------------------------------------------------


async def discover(url: str | SecretStr, *, wait_s: float = DEFAULT_WAIT_S) -> Discovery:
    """Ask `$SRV.PING`, `$SRV.INFO` and `$SRV.STATS` on the NATS at `url`, collect replies
    for `wait_s` seconds, and merge them per service instance; or raise `NatsUnavailable`."""
    secret = url.get_secret_value() if isinstance(url, SecretStr) else url
    display = redact_nats_url(secret)
    replies: list[tuple[str, Msg]] = []
    lost = False

    async def on_error(exc: Exception) -> None:  # the NatsUnavailable raised below says it
        log.debug("nats_error", error=error_text(exc))

    async def on_disconnected() -> None:
        nonlocal lost
        lost = True

    nc = await connect(url, "extreg-discover", error_cb=on_error, disconnected_cb=on_disconnected)
    try:
        inbox = nc.new_inbox()

        async def on_reply(msg: Msg) -> None:
            replies.append((msg.subject.rpartition(".")[2], msg))

        await nc.subscribe(inbox + ".*", cb=on_reply)
        for verb in SERVICE_TYPES:  # after the SUB on the same connection: ordered
            await nc.publish(f"{PREFIX}.{verb}", b"", reply=f"{inbox}.{verb}")
        await nc.flush()
        await asyncio.sleep(wait_s)
        if lost:  # replies sent meanwhile may be gone: no partial answer passed off as whole
            raise NatsUnavailable(f"the connection to NATS at {display} dropped during discovery")
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise NatsUnavailable(
            f"NATS at {display} failed during discovery: {error_text(exc)}"
        ) from None
    finally:
        await nc.close()
    return merge(replies)


def merge(replies: Iterable[tuple[str, Msg]]) -> Discovery:
    """The replies (verb, message) as services: identity from any of an instance's answers,
    endpoints from INFO and STATS (matched by name and subject), stats from STATS."""
    services: dict[str, DiscoveredService] = {}
    endpoints: dict[str, dict[tuple[str, str], DiscoveredEndpoint]] = {}
    skipped: list[str] = []
    for _, answer in sorted(_decoded(replies, skipped), key=_info_first):
        service = services.setdefault(
            answer.id, DiscoveredService(answer.name, answer.id, answer.version, [])
        )
        found = endpoints.setdefault(answer.id, {})
        if isinstance(answer, _Ping):
            continue
        for e in answer.endpoints:
            known = found.get((e.name, e.subject))
            if known is None:
                known = found[e.name, e.subject] = DiscoveredEndpoint(
                    e.name, e.subject, None, None, None
                )
                service.endpoints.append(known)
            if isinstance(e, _EndpointStats):
                known.num_requests, known.num_errors = e.num_requests, e.num_errors
                known.average_processing_time = e.average_processing_time
    return Discovery(sorted(services.values(), key=lambda s: (s.name, s.id)), skipped)


def _decoded(
    replies: Iterable[tuple[str, Msg]], skipped: list[str]
) -> Iterable[tuple[str, _Ping | _Info | _Stats]]:
    """Each reply decoded; a malformed one noted in `skipped` instead. NATS's own "no
    responders" status (no service at all) is no reply."""
    for verb, msg in replies:
        if not msg.data and (msg.headers or {}).get(STATUS_HEADER) == NO_RESPONDERS:
            continue
        try:
            yield verb, _decode(msg.data)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            skipped.append(f"a reply to {PREFIX}.{verb}: {str(exc)[:NOTE_LIMIT]}")


def _info_first(item: tuple[str, Any]) -> int:
    """INFO before STATS, so endpoints are listed in the order a service declares them."""
    return list(SERVICE_TYPES).index(item[0])


# ---- beside the registry --------------------------------------------------------------------


def records_served(
    records: Iterable[Extension], services: Iterable[DiscoveredService]
) -> list[RecordServed]:
    """Each record with the services (names, once each, sorted) that have an endpoint whose
    subject NATS would route the record's subject to."""
    subjects = [(s.name, e.subject) for s in services for e in s.endpoints]
    rows = []
    for record in records:
        names = sorted(
            {name for name, pattern in subjects if subject_matches(pattern, record.subject)}
        )
        rows.append(RecordServed(record.id, record.subject, bool(names), names))
    return rows


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS's routing: `*` matches one token, a final `>` one or more."""
    want, have = pattern.split("."), subject.split(".")
    for i, token in enumerate(want):
        if token == ">" and i == len(want) - 1:
            return len(have) > i
        if i >= len(have) or token not in ("*", have[i]):
            return False
    return len(want) == len(have)
