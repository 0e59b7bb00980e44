"""Serve the sample extensions over NATS: one connection, one NATS micro service.

Why: the registry, the invoker, the demo and the benchmarks all need real extensions at
the other end of NATS. `SampleRunner` serves the chosen samples (all by default) on a
single nats-py connection, answers each request on the hot path without extra tasks or
copies (each sample but `echo`, kept bare for benchmarks, continues the caller's trace when an
OpenTelemetry SDK is set up: `tracing.serving`), and stops cleanly (drains, then closes). `main()` is the blocking entry point
behind `extreg sample-extensions`.

The samples are one service of NATS's service API (`nats.micro`), `extreg-samples`, an
endpoint per sample named by its id, on its subject and queue group, so `extreg discover`
(and `nats micro ls`) list them with their request counts: one process is one service
instance, read as one group of rows in `discover`, where a service per sample would list five
one-endpoint services per process. `echo` stays a plain subscription: a micro endpoint wraps every request (a `Request`
object, two clock reads, the stats), about 0.45 µs on top of echo's 0.2 µs callback, and echo
is what the invocation benchmarks measure against; discovery therefore flags its record, the
case of a plain subscriber it cannot see.

    async with SampleRunner(server.url) as runner:     # or: runner = await run_samples(url)
        ...                                             # requests are being answered
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable, Iterable
from types import TracebackType
from typing import Any, Self

import msgspec
import nats
import nats.micro
import structlog
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.micro.request import Handler as EndpointHandler
from nats.micro.request import Request
from nats.micro.service import Service
from pydantic import SecretStr

from ... import tracing
from ...adapters.nats import connect, subscriptions_active
from ...errors import ConfigError, NatsUnavailable, SampleRunnerError
from ...settings import redact_nats_url
from .extensions import FLAKY_CONTROL_SUBJECT, HANDLERS, SAMPLE_EXTENSIONS, SAMPLES_BY_ID, Handler
from .flaky import INVALID_REPLY, Flaky

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
QUEUE_GROUP = "extreg-samples"
"""Queue group of the sample subscriptions: several sample processes share the load."""
SERVICE_NAME = "extreg-samples"
"""The samples' name in NATS's service API (`extreg discover`)."""
SERVICE_VERSION = "1.0.0"
"""The service's semantic version: the samples' wire contract (their subjects end in .v1)."""
PLAIN = frozenset({"echo"})
"""Samples kept plain subscriptions, outside the service: the benchmarks' bare echo."""
DRAIN_TIMEOUT = 2.0

Callback = Callable[[Msg], Awaitable[None]]

log = structlog.get_logger("extreg.local.samples")


class SampleRunner:
    """The sample extensions, live on one NATS connection.

    `names` picks samples by id (default: all of `SAMPLE_EXTENSIONS`); an unknown id is a
    `ConfigError`. Pass `connection` to reuse an open nats-py client (it is then left open
    on `stop()`); otherwise the runner connects to `nats_url` itself, reconnecting forever
    so a NATS restart does not end it. The URL may carry a password or a token: logs and
    errors show `display`, its redacted form, only.
    """

    def __init__(
        self,
        nats_url: str | SecretStr = DEFAULT_NATS_URL,
        *,
        names: Iterable[str] | None = None,
        connection: Client | None = None,
        queue: str = QUEUE_GROUP,
        flaky: Flaky | None = None,
    ) -> None:
        self._nats_url = nats_url if isinstance(nats_url, SecretStr) else SecretStr(nats_url)
        self.display = redact_nats_url(self._nats_url.get_secret_value())
        self.names: tuple[str, ...] = _check_names(names)
        self.flaky = flaky or Flaky()
        self.calls: dict[str, int] = dict.fromkeys(self.names, 0)
        self._queue = queue
        self._nc = connection
        self._owns_connection = connection is None
        self._subs: list[Subscription] = []
        self._service: Service | None = None
        self._stopping = False
        self._tasks: set[asyncio.Task[None]] = set()
        self._encode = msgspec.json.Encoder().encode
        self._decode = msgspec.json.Decoder().decode

    @property
    def subjects(self) -> dict[str, str]:
        """Sample id → NATS subject, for the samples this runner serves."""
        return {name: SAMPLES_BY_ID[name].subject for name in self.names}

    @property
    def connection(self) -> Client:
        """The nats-py client in use (after `start()`)."""
        if self._nc is None:
            raise SampleRunnerError("sample runner is not started")
        return self._nc

    @property
    def running(self) -> bool:
        """True between `start()` and `stop()`."""
        return bool(self._subs) or self._service is not None

    async def start(self) -> Self:
        """Connect (unless given a connection), subscribe every sample and flush."""
        if self.running:
            return self
        if self._nc is None:
            self._nc = await _connect(self._nats_url, lambda: self._stopping)
        self._stopping = False
        nc = self._nc
        try:
            for name in self.names:
                if name in PLAIN:
                    cb = self._callback(name)
                    self._subs.append(await nc.subscribe(self.subjects[name], self._queue, cb))
            await self._start_service(nc)
            if "flaky" in self.names:
                # No queue group: every flaky instance takes the new settings.
                self._subs.append(await nc.subscribe(FLAKY_CONTROL_SUBJECT, cb=self._on_control))
            await subscriptions_active(nc)
        except (nats.errors.Error, OSError, TimeoutError, ValueError) as exc:
            await self.stop()
            raise SampleRunnerError(f"cannot subscribe the sample extensions: {exc}") from exc
        log.info("sample extensions serving", nats_url=self.display, subjects=self.subjects)
        return self

    async def stop(self) -> None:
        """Stop answering: cancel delayed replies, drain or unsubscribe, close our connection."""
        self._stopping = True
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        subs, self._subs = self._subs, []
        service, self._service = self._service, None
        nc = self._nc
        if nc is None:
            return
        if not self._owns_connection:
            if service is not None:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await service.stop()
            for sub in subs:
                with contextlib.suppress(nats.errors.Error, OSError):
                    await sub.unsubscribe()
            return
        self._nc = None
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), DRAIN_TIMEOUT)
            except (nats.errors.Error, OSError, TimeoutError):
                await nc.close()
        log.info("sample extensions stopped")

    async def __aenter__(self) -> Self:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def _start_service(self, nc: Client) -> None:
        """Register every chosen sample but the `PLAIN` ones as an endpoint of one micro
        service (no service when all of them are plain). Its `$SRV` subscriptions go with the connection;
        on a connection we were given, `stop()` stops the service."""
        endpoints = [name for name in self.names if name not in PLAIN]
        if not endpoints:
            return
        service = await nats.micro.add_service(
            nc,
            name=SERVICE_NAME,
            version=SERVICE_VERSION,
            description="extreg's sample extensions",
            queue_group=self._queue,
        )
        self._service = service
        for name in endpoints:
            handler = _endpoint(self._callback(name))
            await service.add_endpoint(name=name, subject=self.subjects[name], handler=handler)

    # ---- per-message work --------------------------------------------------------------

    def _callback(self, name: str) -> Callback:
        """The subscription callback for one sample, with its lookups bound once."""
        if name == "echo":
            return self._on_echo
        if name == "flaky":
            return self._on_flaky
        return self._handler_callback(name, HANDLERS[name])

    def _handler_callback(self, name: str, handler: Handler) -> Callback:
        """Decode, call the pure handler, encode, answer; bad input gets an error reply."""
        decode, encode, calls = self._decode, self._encode, self.calls
        is_validator = SAMPLES_BY_ID[name].type == "validator"

        async def on_message(msg: Msg) -> None:
            if not msg.reply:
                return
            calls[name] += 1
            with tracing.serving(name, msg.subject, msg.headers):
                try:
                    request = decode(msg.data)
                except msgspec.DecodeError as exc:
                    request = exc
                try:
                    if isinstance(request, dict):
                        reply = handler(request)
                    else:
                        reply = _bad_request(_not_an_object(request), is_validator)
                except Exception as exc:  # a sample bug must answer, not look like a timeout
                    log.exception("sample extension failed", extension_id=name)
                    reply = _bad_request(f"internal error: {type(exc).__name__}", is_validator)
                await self.connection.publish(msg.reply, encode(reply))

        return on_message

    async def _on_echo(self, msg: Msg) -> None:
        """Echo: the request bytes go back untouched (no decoding, for benchmarks)."""
        if msg.reply:
            self.calls["echo"] += 1
            await self.connection.publish(msg.reply, msg.data)

    async def _on_flaky(self, msg: Msg) -> None:
        """Flaky: answer, fail or delay as its dial says; delays never block other calls."""
        if not msg.reply:
            return
        self.calls["flaky"] += 1
        delay_ms = self.flaky.settings.delay_ms
        if delay_ms <= 0:
            with tracing.serving("flaky", msg.subject, msg.headers):
                await self._flaky_answer(msg, self.flaky.should_fail())
            return
        task = asyncio.create_task(self._flaky_later(msg, delay_ms / 1000))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _flaky_later(self, msg: Msg, delay: float) -> None:
        """A delayed flaky call, run as its own task (its span covers the delay)."""
        with tracing.serving("flaky", msg.subject, msg.headers):
            await asyncio.sleep(delay)
            with contextlib.suppress(nats.errors.Error, OSError):
                await self._flaky_answer(msg, self.flaky.should_fail())

    async def _flaky_answer(self, msg: Msg, fail: bool) -> None:
        """Send the flaky reply: the payload unchanged, nothing, or an invalid body."""
        reply_to = msg.reply
        if fail:
            if self.flaky.settings.failure_mode == "invalid":
                await self.connection.publish(reply_to, INVALID_REPLY)
            return
        try:
            request = self._decode(msg.data)
        except msgspec.DecodeError as exc:
            await self.connection.publish(reply_to, self._encode(_bad_request(str(exc), False)))
            return
        payload = request.get("payload") if isinstance(request, dict) else None
        await self.connection.publish(reply_to, self._encode({"payload": payload}))

    async def _on_control(self, msg: Msg) -> None:
        """Change (or read) the flaky dial; see `extreg.local.samples.flaky`."""
        try:
            request: Any = self._decode(msg.data) if msg.data.strip() else {}
        except msgspec.DecodeError as exc:
            reply: dict[str, Any] = {"ok": False, "error": f"invalid JSON: {exc}"}
        else:
            reply = self.flaky.control(request)
            if reply["ok"]:
                log.info("flaky settings changed", **reply["settings"])
        if msg.reply:
            await self.connection.publish(msg.reply, self._encode(reply))


async def run_samples(
    nats_url: str | SecretStr = DEFAULT_NATS_URL,
    *,
    names: Iterable[str] | None = None,
    connection: Client | None = None,
) -> SampleRunner:
    """Start the sample extensions and return the running `SampleRunner`; `await
    runner.stop()` (or `async with`) ends them."""
    return await SampleRunner(nats_url, names=names, connection=connection).start()


async def serve_forever(
    nats_url: str | SecretStr = DEFAULT_NATS_URL, *, names: Iterable[str] | None = None
) -> None:
    """Serve the samples until SIGINT or SIGTERM, then stop cleanly."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
            loop.add_signal_handler(sig, stop.set)
    async with SampleRunner(nats_url, names=names):
        await stop.wait()


def main(
    nats_url: str | SecretStr = DEFAULT_NATS_URL, *, names: Iterable[str] | None = None
) -> None:
    """Blocking entry point of `extreg sample-extensions`: serve until interrupted. With
    `OTEL_EXPORTER_OTLP_ENDPOINT` set, their spans are exported as `extreg-samples`."""
    stop_tracing = tracing.export_from_env(service_name="extreg-samples")
    try:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(serve_forever(nats_url, names=names))
    finally:
        if stop_tracing is not None:
            stop_tracing()


# ---- helpers ----------------------------------------------------------------------------


def _check_names(names: Iterable[str] | None) -> tuple[str, ...]:
    """The chosen sample ids, in catalogue order; an unknown id is a ConfigError."""
    if names is None:
        return tuple(s.id for s in SAMPLE_EXTENSIONS)
    wanted = list(dict.fromkeys(names))
    if not wanted:
        raise ConfigError("no sample extension chosen")
    unknown = [n for n in wanted if n not in SAMPLES_BY_ID]
    if unknown:
        known = ", ".join(SAMPLES_BY_ID)
        raise ConfigError(f"unknown sample extension(s): {', '.join(unknown)} (known: {known})")
    return tuple(s.id for s in SAMPLE_EXTENSIONS if s.id in wanted)


def _endpoint(callback: Callback) -> EndpointHandler:
    """A sample's message callback as a micro endpoint's handler. The callbacks take the
    message itself: `Request` hides its reply subject, which they check (a message published
    without one is left unanswered, as on a plain subscription, where `Request.respond` would
    raise and the service would count an error)."""

    async def handle(request: Request) -> None:
        await callback(request._msg)

    return handle


def _not_an_object(request: object) -> str:
    """Why a decoded request cannot be served."""
    if isinstance(request, msgspec.DecodeError):
        return f"invalid JSON: {request}"
    return "request is not a JSON object"


def _bad_request(message: str, is_validator: bool) -> dict[str, Any]:
    """The reply to a request that is not a JSON object; a validator fails closed."""
    if is_validator:
        return {"status": "reject", "reason": "bad_request", "details": {"error": message}}
    return {"error": {"code": "bad_request", "message": message}}


async def _connect(nats_url: SecretStr, stopping: Callable[[], bool]) -> Client:
    """Connect with endless reconnects and quiet, structured logging of connection events.
    The connection is the adapter's (`adapters.nats.connect`): the same options, and `nats_url`
    may list the servers of a NATS cluster, comma-separated.

    `stopping` tells our own shutdown apart from a lost server, which alone is a warning.
    """
    display = redact_nats_url(nats_url.get_secret_value())

    async def on_error(exc: Exception) -> None:
        log.warning("nats error", error=str(exc) or type(exc).__name__)

    async def on_disconnected() -> None:
        if not stopping():
            log.warning("nats disconnected", nats_url=display)

    async def on_reconnected() -> None:
        log.info("nats reconnected", nats_url=display)

    try:
        nc = await connect(
            nats_url,
            "extreg-sample-extensions",
            error_cb=on_error,
            disconnected_cb=on_disconnected,
            reconnected_cb=on_reconnected,
        )
    except NatsUnavailable as exc:
        raise SampleRunnerError(str(exc)) from None
    # nats-py uses one limit for the first connect and for reconnects; we want a quick,
    # clear failure when NATS is absent at start, but never to give up once connected.
    nc.options["max_reconnect_attempts"] = -1
    return nc
