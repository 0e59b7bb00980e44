"""Connection limits for the admin API's HTTP server: uvicorn's h11 protocol, guarded.

What uvicorn (0.54) gives and what it leaves open, which is why this module exists:

- `timeout_keep_alive` closes a connection idle after a response, but the timer is armed only
  once a response is complete: a connection that never sends a byte is held forever.
- Nothing bounds how long a request may take to arrive: `data_received` cancels the keep-alive
  timer at the first byte, so headers trickled one line every 5 s, or a body that never ends,
  hold the connection for good. (`h11_max_incomplete_event_size`, 16 KiB by default, bounds
  the bytes of the headers, not their time.)
- `limit_concurrency` answers 503 to a request over the limit, but only once the connection is
  accepted and has sent a request: it caps no descriptor.
- When descriptors run out, asyncio's accept loop logs a traceback per failed `accept()`, and
  (CPython 3.11) up to `backlog` of them per wake-up: 61,288 tracebacks in 6 s under a
  256-descriptor limit.

Hypercorn's `read_timeout` is restarted by every read (a trickler passes it) and it has no
connection cap either; granian's `backpressure` bounds requests, not connections. Both would
replace the server for half the answer. So uvicorn stays, with two additions:

- `GuardedH11Protocol`, uvicorn's h11 protocol (its `http=` option takes a protocol class)
  with three rules: a fresh connection is idle (closed after the keep-alive timeout until its
  first byte); a request must be received whole, headers and body, within
  `http_request_timeout_seconds` of its first byte (else 408 and close); and at most
  `max_connections` are open: one more closes the oldest connection that has no request in
  the app, or is refused with 503 when every one is busy.
- `quiet_accept_errors`, a loop exception handler that turns asyncio's accept-failure
  tracebacks into one warning line per `LOG_INTERVAL_S`. asyncio itself stops accepting for a
  second after such a failure and then retries, so the server recovers by itself.

The protocol reaches into uvicorn's `H11Protocol` (its `conn`, `cycle`, `transport` and
keep-alive timer), so pyproject bounds uvicorn below 0.55.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import h11
import structlog
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.server import ServerState

from ..settings import Settings
from .errors import http_error_name

log = structlog.get_logger("extreg.api")

BACKLOG = 128  # the listen queue, and how many asyncio accepts in one go (so part of headroom)
RESERVED_DESCRIPTORS = 64  # files, NATS, logs, the embedded database's pipes, the snapshot
LOG_INTERVAL_S = 10.0
ACCEPT_FAILED = "socket.accept() out of system resource"  # asyncio's message


@dataclass(frozen=True)
class ConnectionLimits:
    keep_alive_s: int
    request_timeout_s: float
    max_connections: int

    @classmethod
    def from_settings(cls, settings: Settings) -> ConnectionLimits:
        """The settings' limits, with the connection cap kept below the descriptor limit."""
        budget = descriptor_budget(settings.db_pool_size)
        wanted = settings.http_max_connections
        cap = max(1, min(wanted, budget))
        explicit = "http_max_connections" in settings.model_fields_set
        if cap < wanted and (explicit or cap < 16):  # the default lowered quietly
            log.warning(
                "http_max_connections_lowered",
                wanted=wanted,
                using=cap,
                reason="the descriptor limit (ulimit -n) leaves room for no more",
            )
        return cls(settings.http_keep_alive_seconds, settings.http_request_timeout_seconds, cap)


def descriptor_budget(db_pool_size: int) -> int:
    """How many connections fit under RLIMIT_NOFILE, leaving room for the database pool, one
    accept batch and everything else the process opens."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return sys.maxsize
    return soft - RESERVED_DESCRIPTORS - db_pool_size - BACKLOG


class Throttled:
    """A warning written at most once per `LOG_INTERVAL_S`, with the number of occurrences it
    stands for: an attack on the connections must not turn into an attack on the logs."""

    def __init__(self, event: str) -> None:
        self.event = event
        self.count = 0
        self.last = -LOG_INTERVAL_S

    def note(self, **fields: Any) -> None:
        self.count += 1
        now = time.monotonic()
        if now - self.last >= LOG_INTERVAL_S:
            self._write(**fields)
            self.last = now

    def flush(self) -> None:
        """Write the occurrences not yet reported (at shutdown)."""
        if self.count:
            self._write()

    def _write(self, **fields: Any) -> None:
        log.warning(self.event, occurrences=self.count, interval_s=LOG_INTERVAL_S, **fields)
        self.count = 0


class GuardedConfig(uvicorn.Config):
    """uvicorn's Config with the limits and this server's open connections, oldest first."""

    def __init__(self, app: Callable[..., Any], limits: ConnectionLimits, **options: Any) -> None:
        super().__init__(
            app,
            http=GuardedH11Protocol,
            ws="none",
            backlog=BACKLOG,
            timeout_keep_alive=limits.keep_alive_s,
            **options,
        )
        self.limits = limits
        self.open: dict[GuardedH11Protocol, None] = {}
        self.evicted = Throttled("http_connection_limit")
        self.timed_out = Throttled("http_request_timeout")

    def flush_logs(self) -> None:
        self.evicted.flush()
        self.timed_out.flush()


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with an idle first wait, a request deadline and a connection
    cap (see the module docstring)."""

    def __init__(
        self,
        config: uvicorn.Config,
        server_state: ServerState,
        app_state: dict[str, Any],
        _loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        super().__init__(config, server_state, app_state, _loop)
        if not isinstance(config, GuardedConfig):
            raise TypeError("GuardedH11Protocol needs a GuardedConfig")
        self.guard = config
        self.request_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.guard.open[self] = None
        if len(self.guard.open) > self.guard.limits.max_connections and not self._make_room():
            self.guard.evicted.note(
                max_connections=self.guard.limits.max_connections,
                action="refused a new connection (503): all are busy",
            )
            self._answer_and_close(503, "the server is at its connection limit; retry shortly")
            return
        # Idle until its first byte, like a kept-alive connection (uvicorn waits for ever).
        self.timeout_keep_alive_task = self.loop.call_later(
            self.timeout_keep_alive, self.timeout_keep_alive_handler
        )

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._disarm()
        self.guard.open.pop(self, None)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        state = self.conn.their_state
        self._watch(state is h11.IDLE or state is h11.SEND_BODY)

    def on_response_complete(self) -> None:
        super().on_response_complete()  # may start a pipelined request already buffered
        state = self.conn.their_state
        self._watch(
            state is h11.SEND_BODY or (state is h11.IDLE and bool(self.conn.trailing_data[0]))
        )

    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a malformed request, as JSON with `error` and `detail`."""
        self._answer_and_close(400, f"malformed HTTP request: {msg}")

    @property
    def idle(self) -> bool:
        """No request of this connection is in the app (it may be receiving headers)."""
        return not self.transport.is_closing() and (
            self.cycle is None or self.cycle.response_complete
        )

    def _make_room(self) -> bool:
        """Close the oldest idle connection; False when every other one is busy."""
        for other in self.guard.open:
            if other is not self and other.idle:
                self.guard.evicted.note(
                    max_connections=self.guard.limits.max_connections,
                    action="closed the oldest idle connection",
                )
                other.transport.close()
                return True
        return False

    def _watch(self, receiving: bool) -> None:
        """Arm the request deadline at a request's first byte; disarm once it is all in."""
        if not receiving or self.transport.is_closing():
            self._disarm()
        elif self.request_deadline is None:
            self.request_deadline = self.loop.call_later(
                self.guard.limits.request_timeout_s, self._request_timed_out
            )

    def _disarm(self) -> None:
        if self.request_deadline is not None:
            self.request_deadline.cancel()
            self.request_deadline = None

    def _request_timed_out(self) -> None:
        self.request_deadline = None
        if self.transport.is_closing():
            return
        limit = self.guard.limits.request_timeout_s
        self.guard.timed_out.note(timeout_s=limit, action="closed the connection (408)")
        answering = self.cycle is not None and not self.cycle.response_complete
        if answering and self.cycle.response_started:
            self.transport.close()  # a response is on its way: it cannot become a 408
            return
        self._answer_and_close(408, f"the request did not arrive within {limit:g} s")

    def _answer_and_close(self, status: int, detail: str) -> None:
        """Write a JSON error answer by hand (outside h11's state machine) and close."""
        body = json.dumps({"detail": detail, "error": http_error_name(status)}).encode()
        head = (
            f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n"
        ).encode()
        self.transport.write(head + body)
        self.transport.close()


@contextlib.contextmanager
def quiet_accept_errors(loop: asyncio.AbstractEventLoop) -> Iterator[None]:
    """While inside, asyncio's accept failures (descriptors exhausted) log one line per
    interval instead of a traceback each; every other loop error is handled as before."""
    previous = loop.get_exception_handler()
    throttled = Throttled("http_accept_failed")

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if context.get("message") == ACCEPT_FAILED and isinstance(exc, OSError):
            throttled.note(
                error=exc.strerror or str(exc), action="accepting paused for 1 s, then retried"
            )
        elif previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    try:
        yield
    finally:
        loop.set_exception_handler(previous)
        throttled.flush()
