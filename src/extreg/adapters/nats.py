"""The NATS adapter: one nats-py connection, request-reply, and nats-py errors translated.

Request-reply is done here on nats-py's public API rather than with `Client.request`: one
wildcard subscription on a private inbox receives every reply, each request gets the next
inbox name from a counter, and a timer handle bounds the wait. `Client.request` does the same
with more per-call work (`asyncio.wait_for`, an `os.urandom` call and a done-callback per
request), and that work shows when a router makes tens of thousands of calls a second.

Every nats-py exception is turned here into the error tree (`extreg.errors`), so nothing above
this module knows nats-py's classes:

    no reply within the timeout       -> ExtensionTimeout (the invoker retries these)
    a "503 no responders" status      -> InvocationError  ("no responders on <subject>")
    MaxPayloadError                   -> PayloadTooLarge  (above the server's max_payload)
    not connected, closed, draining,
    outbound buffer full, OSError,
    connection lost while waiting     -> TransportUnavailable (an InvocationError)
    any other nats error              -> InvocationError

`TransportUnavailable` means *our* link to NATS is down, not that the extension failed, so the
invoker neither trips the extension's circuit nor counts it in health. Calls fail fast while
the connection is down (checked before sending; calls waiting when it drops are failed at
once), and nats-py reconnects forever in the background (resubscribing the inbox), so calls
succeed again as soon as NATS is back.

A NATS cluster: `nats_url` may list several servers, comma-separated; `connect` hands them to
nats-py as its server list (`servers_and_credentials`). nats-py picks one at random (which
spreads nodes over the cluster), adds the members the server announces (`connect_urls` in its
INFO), and when its server dies reconnects to another in the pool at once (the dead one is
refused in a millisecond on a live host), waiting `RECONNECT_WAIT_S` only before retrying a
server it tried that recently. A server that hangs instead (or its machine drops off the
network) is noticed by unanswered PINGs only, after 2 to 3 `PING_INTERVAL_S`. Credentials in
the URLs are sent as connect options, to every server: nats-py would send a URL's user part to
that server only, never to the members it discovered, which would answer "Authorization
Violation" on a reconnect.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

import nats
import nats.errors
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from pydantic import SecretStr

from ..errors import (
    ExtensionTimeout,
    InvocationError,
    NatsUnavailable,
    PayloadTooLarge,
    TransportUnavailable,
)
from ..settings import redact_nats_url

log = structlog.get_logger("extreg.invoke.nats")

CONNECT_TIMEOUT_S = 2
CONNECT_ATTEMPTS = 3  # for the first connection; later losses are retried forever
RECONNECT_WAIT_S = 0.25
# A server that hangs, or a machine gone from the network, closes nothing: only unanswered
# PINGs tell. nats-py's default (one every 120 s, stale after two unanswered) leaves calls
# timing out on it for 4 to 6 minutes; this leaves it after 10 to 15 s.
PING_INTERVAL_S = 5
MAX_OUTSTANDING_PINGS = 2
STATUS_HEADER = "Status"
NO_RESPONDERS = "503"


_UNAVAILABLE = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionDrainingError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.OutboundBufferLimitError,
    nats.errors.StaleConnectionError,
    OSError,
)
_LOST = Msg(None, subject="", data=b"")  # type: ignore[arg-type]  # resolves waits on disconnect


Callback = Callable[..., Awaitable[None]]


async def connect(url: str | SecretStr, name: str, **callbacks: Callback) -> Client:
    """A nats-py connection with extreg's options (quick to fail when NATS is absent at
    start), or `NatsUnavailable` naming the redacted URL. `url` may list several servers,
    comma-separated (see the module). `callbacks`: nats-py's `error_cb`, `disconnected_cb`,
    `reconnected_cb`."""
    secret = url.get_secret_value() if isinstance(url, SecretStr) else url
    servers, credentials = servers_and_credentials(secret)
    try:
        return await nats.connect(
            servers,
            name=name,
            connect_timeout=CONNECT_TIMEOUT_S,
            reconnect_time_wait=RECONNECT_WAIT_S,
            max_reconnect_attempts=CONNECT_ATTEMPTS,
            ping_interval=PING_INTERVAL_S,
            max_outstanding_pings=MAX_OUTSTANDING_PINGS,
            **credentials,
            **callbacks,
        )
    except (nats.errors.Error, OSError, TimeoutError) as exc:
        raise NatsUnavailable(
            f"cannot connect to NATS at {redact_nats_url(secret)}: {error_text(exc)}"
        ) from None


def servers_and_credentials(url: str) -> tuple[list[str], dict[str, str]]:
    """A `nats_url` as nats-py's server list, and the credentials its URLs carry as nats-py's
    connect options (`user` and `password`, or `token` for a lone user part).

    Only one set of credentials is lifted out of the URLs (those without any then get it too);
    URLs carrying different ones are left as they are, for nats-py to send each to its own
    server. The user part is taken verbatim, as nats-py takes it (no percent-decoding).
    """
    servers = [part.strip() for part in url.split(",") if part.strip()]
    split = [_split_userinfo(server) for server in servers]
    userinfos = {userinfo for userinfo, _ in split if userinfo is not None}
    if len(userinfos) != 1:
        return servers, {}
    user, colon, password = userinfos.pop().partition(":")
    credentials = {"user": user, "password": password} if colon else {"token": user}
    return [bare for _, bare in split], credentials


def _split_userinfo(url: str) -> tuple[str | None, str]:
    """`nats://user:pass@host:4222` -> (`user:pass`, `nats://host:4222`); (None, url) when
    the URL names no user."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        scheme, rest = "", url
    authority, slash, path = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return None, url
    return userinfo, f"{scheme}{sep}{host}{slash}{path}"


class NatsTransport:
    """A nats-py client for request-reply. `await connect()`, then `request(...)`, `close()`.

    The URL may carry a password or a token: it is kept as a `SecretStr`, and logs and errors
    show `display`, its redacted form, only.
    """

    def __init__(self, url: str | SecretStr, *, name: str = "extreg-invoker") -> None:
        self._url = url if isinstance(url, SecretStr) else SecretStr(url)
        self.display = redact_nats_url(self._url.get_secret_value())
        self.name = name
        self._nc: Client | None = None
        self._sub: Subscription | None = None
        self._closing = False
        self._prefix = ""
        self._next = itertools.count(1).__next__
        self._waiting: dict[str, asyncio.Future[Msg | None]] = {}

    async def connect(self) -> None:
        """Connect and subscribe the reply inbox, or raise `NatsUnavailable`."""

        async def on_error(exc: Exception) -> None:
            log.warning("nats_error", error=error_text(exc))

        async def on_disconnected() -> None:
            self._fail_waiting()
            if not self._closing:
                log.warning("nats_disconnected", nats_url=self.display)

        async def on_reconnected() -> None:
            log.info("nats_reconnected", nats_url=self.display)

        nc = await connect(
            self._url,
            self.name,
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
        try:
            self._prefix = nc.new_inbox() + "."
            self._sub = await nc.subscribe(self._prefix + "*", cb=self._on_reply)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            await nc.close()
            raise NatsUnavailable(
                f"cannot connect to NATS at {self.display}: {error_text(exc)}"
            ) from None
        # nats-py has one limit for the first connection and for reconnects: fail fast when
        # NATS is absent at start, but never give up on a connection once made.
        nc.options["max_reconnect_attempts"] = -1
        self._nc = nc

    @property
    def connected(self) -> bool:
        nc = self._nc
        return nc is not None and nc.is_connected

    async def _on_reply(self, msg: Msg) -> None:
        future = self._waiting.pop(msg.subject, None)
        if future is not None and not future.done():
            future.set_result(msg)

    def _fail_waiting(self) -> None:
        """The connection dropped: no reply can arrive for the requests waiting now."""
        waiting, self._waiting = self._waiting, {}
        for future in waiting.values():
            if not future.done():
                future.set_result(_LOST)

    async def request(
        self,
        extension_id: str,
        subject: str,
        data: bytes,
        timeout_s: float,
        headers: dict[str, str] | None,
    ) -> bytes:
        """One request-reply; the reply's bytes, or an `ExtensionError` (see the module)."""
        nc = self._nc
        if nc is None or not nc.is_connected:
            raise TransportUnavailable(extension_id)
        inbox = self._prefix + str(self._next())
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Msg | None] = loop.create_future()
        waiting = self._waiting
        waiting[inbox] = future
        timer = loop.call_later(timeout_s, _expire, future)
        try:
            await nc.publish(subject, data, inbox, headers)
            msg = await future
        except nats.errors.MaxPayloadError:
            raise PayloadTooLarge(
                extension_id, f"request is larger than NATS's max_payload ({nc.max_payload})"
            ) from None
        except _UNAVAILABLE as exc:
            raise TransportUnavailable(
                extension_id, f"NATS is not connected: {error_text(exc)}"
            ) from None
        except nats.errors.Error as exc:
            raise InvocationError(extension_id, f"NATS error: {error_text(exc)}") from None
        finally:
            timer.cancel()
            waiting.pop(inbox, None)
        if msg is None:
            raise ExtensionTimeout(
                extension_id, f"no reply on {subject} within {timeout_s * 1000:g} ms"
            )
        if msg is _LOST:
            raise TransportUnavailable(extension_id, "NATS connection lost while waiting")
        if msg.headers and not msg.data and msg.headers.get(STATUS_HEADER) == NO_RESPONDERS:
            raise InvocationError(extension_id, f"no responders on {subject}")
        return msg.data

    async def close(self) -> None:
        """Close the connection; requests still waiting fail with `TransportUnavailable`."""
        self._closing = True
        nc, self._nc = self._nc, None
        self._fail_waiting()
        if nc is not None and not nc.is_closed:
            await nc.close()


def _expire(future: asyncio.Future[Msg | None]) -> None:
    if not future.done():
        future.set_result(None)


def error_text(exc: BaseException) -> str:
    """A nats-py error in words: its message, else its class (some carry no message)."""
    return str(exc) or type(exc).__name__


async def subscriptions_active(nc: Client) -> None:
    """Return once the server has every subscription `nc` made so far.

    One `flush()` is not enough with nats-py 2.x: `subscribe` queues its SUB for the flusher
    task, while `flush` writes its PING straight to the socket, so the PONG can come back
    before the SUB has even been sent (about 1 request in 100 then met "no responders" in our
    tests). The first flush kicks the flusher, which sends the SUB; the second PING follows
    it on the socket, so its PONG proves the server has the subscription.
    """
    await nc.flush()
    await nc.flush()
