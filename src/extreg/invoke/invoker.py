"""The invoker: call one extension over NATS, protected by its circuit breaker, measured.

    async with Invoker.open(registry, settings) as inv:
        reply = await inv.invoke("normalize_text", {"payload": {...}, "metadata": {...}},
                                 {"trace_id": "t-1", "tenant_id": "acme"})

One call, in order: registry lookup (`ExtensionNotFound` / `ExtensionDisabled`, before any
network work); the extension's `Route` (cached per record, see `routing`) picks the version and
instance; the envelope is encoded (a provider's with the original's provider fields:
`provider_id`, `prompt`, `parameters`, `context`; see `envelope`) and its payload and
metadata checked against the limits (`PayloadTooLarge`); `dry_run` in the context stops here
and returns `{}`; NATS must be connected (`TransportUnavailable`, fast); health-based routing
and the circuit breaker may refuse (`HealthRefused`, `CircuitOpen`); then the request, with
`trace_id` and `tenant_id` also as NATS headers, each attempt bounded by the capped
`timeout_ms`, and `retry` extra attempts after a timeout only, with a short jittered backoff
(`ExtensionTimeout` with no retries, `MaxRetriesExceeded` after them); the reply must be a
JSON object (`InvalidResponse`). Every error carries `extension_id`, `reason` and `attempts`.
With tracing active, the call is a CLIENT span whose W3C trace context rides in the NATS headers
too, with an event per attempt (`extreg.tracing`).

The outcome goes to the breaker (`record_success` / `record_failure`) and to the health monitor,
both in memory. A caller's mistake (too large) and a NATS outage are not the extension's fault
and are recorded nowhere. No database statement is issued on this path: health reaches the
database through `HealthFlusher` in the background, breaker overrides follow the registry
through `Registry.on_change`, and automatic enable/disable and the instance health of outlier
ejection (`ejections`) are written by their own tasks.

Overload and versions: a bulkhead per limited extension refuses at once with `Overloaded`
(`core.concurrency`); a version routed to by its rules has its own circuit (`Target.circuit`),
so a failing canary opens alone; an instance that keeps failing is ejected (`ejections`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from time import perf_counter
from typing import TYPE_CHECKING, Any

import msgspec
import structlog

from .. import logs, tracing
from ..adapters.nats import NatsTransport
from ..core.breaker import CircuitBreakers, split_circuit, version_circuit
from ..core.chance import jitter
from ..core.clock import SYSTEM_CLOCK, Clock
from ..core.concurrency import MAX_LIMIT, AdaptiveLimit, Bulkhead
from ..core.envelope import encode_envelope, headers
from ..core.health import HealthMonitor
from ..core.intervals import SERIES_KEEP_S
from ..core.model import Extension
from ..core.routing import Limits, Route, Target
from ..core.snapshot import Snapshot
from ..errors import (
    CircuitOpen,
    ExtensionDisabled,
    ExtensionError,
    ExtensionTimeout,
    InvalidRecord,
    InvalidResponse,
    MaxRetriesExceeded,
    Overloaded,
    PayloadTooLarge,
    TransportUnavailable,
)
from ..registry import Registry
from ..settings import Settings
from .automation import AutoManager, HealthGate
from .ejections import Ejections
from .health_store import HealthFlusher
from .pipeline import PipelineRunner, PolicyResult, ProviderHook

if TYPE_CHECKING:
    from opentelemetry.trace import Span

log = structlog.get_logger("extreg.invoke")

BACKOFF_BASE_S = 0.01  # first pause between attempts; doubles, capped, jittered x0.5..1.5
BACKOFF_CAP_S = 0.2
AUTO_IDLE_WAIT_S = 2.0
START_REFRESH_TIMEOUT_S = 1.0  # cluster-wide health read at start; later flushes catch up
Send = Callable[[str, str, bytes, float, dict[str, str] | None], Awaitable[bytes]]
"""`await send(extension_id, subject, data, timeout_s, headers)`: one request, its reply body
(`NatsTransport.request`)."""
Observer = Callable[[str, str, str, str, float], None]
"""`observer(extension_id, extension_type, version, outcome, seconds)` after every call
(metrics); `version` is the one the call was routed to (the row's own without a match)."""

_NO_CONTEXT: Mapping[str, Any] = {}
_NOT_FAULTS = (TransportUnavailable, PayloadTooLarge)  # not the extension's doing


def backoff_s(attempt: int) -> float:
    """The pause after failed attempt number `attempt` (1-based)."""
    base: float = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2.0 ** (attempt - 1))
    return jitter(base)


def outcome_of(exc: ExtensionError) -> str:
    """The metrics outcome label of a failed call."""
    if isinstance(exc, ExtensionTimeout | MaxRetriesExceeded):
        return "timeout"
    if isinstance(exc, CircuitOpen):
        return "circuit_open"
    return "error"


class Invoker:
    """Calls extensions (see the module docstring). Create with `Invoker.open(...)`.

    `breaker` and `health` are this process's; `health` shows cluster-wide totals once the
    flusher has read them back from the database. Set `observer` to be told of every outcome;
    add to `pipeline.observers` to be told of every policy run.
    Latencies are measured with `perf_counter` whatever the clock: they are durations that
    happened, not decisions a test needs to steer.
    """

    def __init__(
        self,
        registry: Registry,
        settings: Settings,
        *,
        transport: NatsTransport | None = None,
        node_id: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.clock = clock
        self.breaker = CircuitBreakers.from_settings(settings, clock=clock)
        # With a database the charts read it, so memory keeps only the recent window.
        keep_s = settings.health_window_seconds if settings.persists_health else SERIES_KEEP_S
        self.health = HealthMonitor.from_settings(
            settings, self.breaker, clock=clock, keep_s=keep_s
        )
        self.observer: Observer | None = None
        self.pipeline = PipelineRunner(self)
        self._transport = transport or NatsTransport(settings.nats_url)
        self._request = self._transport.request
        self._limits = Limits.from_settings(settings)
        self._routes: dict[str, Route] = {}
        self._decode = msgspec.json.Decoder().decode
        self._gate = HealthGate.from_settings(self.health, settings)
        self.auto = AutoManager.from_settings(registry, self.breaker, settings)
        self.ejections = Ejections.from_settings(
            settings, registry, clock, on_change=lambda ext_id: self._routes.pop(ext_id, None)
        )
        self._ejections_task: asyncio.Task[None] | None = None
        self.flusher = HealthFlusher(
            self.health,
            self.breaker,
            registry,
            interval_s=settings.health_flush_interval_seconds,
            node_id=node_id,
            observers=[self._gate.observe] if self._gate is not None else [],
        )
        self._snapshot = Snapshot.empty()
        self._configured: set[str] = set()
        self._bulkheads: dict[str, Bulkhead] = {}  # only extensions with a concurrency limit
        self._flush_task: asyncio.Task[None] | None = None
        self._auto_task: asyncio.Task[None] | None = None
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        registry: Registry,
        settings: Settings,
        *,
        node_id: str | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> AsyncIterator[Invoker]:
        """Connect to NATS and start the background work; flush health and stop on exit.

        `clock` is read by the breaker (timeouts, windows), health (last call times) and so the
        automation's recovery door; tests pass one they move forward (see `core.clock`)."""
        invoker = cls(registry, settings, node_id=node_id, clock=clock)
        await invoker.start()
        try:
            yield invoker
        finally:
            await invoker.close()

    async def start(self) -> None:
        await self._transport.connect()
        self.breaker.on_state_change(_log_transition)
        self._follow(self.registry.snapshot)
        self.registry.on_change(self._follow)
        with contextlib.suppress(TimeoutError):  # a database that is away must not delay the start
            await asyncio.wait_for(self.flusher.refresh(), START_REFRESH_TIMEOUT_S)
        self._flush_task = asyncio.create_task(self.flusher.run(), name="extreg-health-flush")
        if self.auto is not None:
            self._auto_task = asyncio.create_task(self.auto.run(), name="extreg-auto-manage")
        if self.ejections is not None:
            self._ejections_task = asyncio.create_task(
                self.ejections.run(), name="extreg-ejections"
            )

    async def close(self) -> None:
        """Stop flushing, close NATS, write the last health, let pending auto actions finish."""
        self._closed = True
        await _cancel(self._flush_task)
        await self._transport.close()
        await self.flusher.close()
        if self.auto is not None and self._auto_task is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.auto.wait_idle(), AUTO_IDLE_WAIT_S)
        await _cancel(self._auto_task)
        await _cancel(self._ejections_task)
        if self.ejections is not None:
            await self.ejections.close()

    async def flush_health(self) -> bool:
        """Write health now (normally done every `health_flush_interval_seconds`)."""
        return await self.flusher.flush()

    @property
    def connected(self) -> bool:
        """True while the NATS connection is up."""
        return self._transport.connected

    # -- the hot path -------------------------------------------------------------------------

    async def run_policy(
        self,
        policy_id: str,
        message: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        provider: ProviderHook | None = None,
    ) -> PolicyResult:
        """Run a routing policy on `message`, each step through `invoke` (see
        `extreg.invoke.pipeline`); a `PolicyResult` or a `PolicyError`."""
        return await self.pipeline.run(policy_id, message, context, provider)

    async def invoke(
        self,
        extension_id: str,
        request: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Call the extension once (plus retries on timeout); its JSON reply, or an error.

        Traced as `extreg.invoke <id>` when `tracing.active()` (see `extreg.tracing`); the
        untraced path costs the check and one coroutine call (docs/performance.md, "Tracing")."""
        if not tracing.active():
            return await self._invoke(extension_id, request, context, None)
        with tracing.invocation(extension_id) as span:
            return await self._invoke(extension_id, request, context, span)

    async def _invoke(
        self,
        extension_id: str,
        request: Mapping[str, Any],
        context: Mapping[str, Any] | None,
        span: Span | None,
    ) -> dict[str, Any]:
        trial = False
        try:
            ext = self.registry.lookup(extension_id)
        except ExtensionDisabled:
            ext, trial = self._recovery_trial(extension_id), True
        route = self._routes.get(extension_id)
        if route is None or route.ext is not ext:
            ejected = self.ejections.ejected(extension_id) if self.ejections else frozenset()
            route = self._routes[extension_id] = Route(ext, self._limits, ejected)
        ctx = _NO_CONTEXT if context is None else context
        trace_id = ctx.get("trace_id") or request.get("trace_id")
        tenant_id = ctx.get("tenant_id") or request.get("tenant_id")
        if route.dynamic and not trial:  # a recovery trial is the row's, on its own circuit
            target = _pick(route, ctx, trace_id, tenant_id)
        else:
            target = route.default
        data = encode_envelope(
            extension_id,
            request,
            trace_id,
            tenant_id,
            route.max_payload_size,
            route.max_metadata_size,
            provider=ext.type == "provider",
        )
        if span is not None:
            tracing.routed(span, ext.type, target.version, target.subject, tenant_id, len(data))
        if ctx.get("dry_run"):
            return {}
        observer = self.observer
        if not self._transport.connected:
            raise TransportUnavailable(extension_id)
        bulkhead = self._bulkheads.get(extension_id)
        if bulkhead is not None and not bulkhead.acquire():
            if observer is not None:
                observer(extension_id, ext.type, target.version, "overloaded", 0.0)
            raise Overloaded(extension_id, f"{bulkhead.limit} calls in flight, its limit", 0)
        rtt: float | None = None  # the bulkhead's sample: answered and timed-out calls only
        try:
            try:
                if self._gate is not None:
                    self._gate.check(extension_id)
                self.breaker.check_circuit(target.circuit)
            except CircuitOpen:
                if observer is not None:
                    observer(extension_id, ext.type, target.version, "circuit_open", 0.0)
                raise
            hdrs = headers(trace_id, tenant_id)
            send: Send = self._request
            if span is not None:
                hdrs = tracing.inject(hdrs)
                send = _counting_attempts(send, span)
            started = perf_counter()
            try:
                try:
                    body = await send(extension_id, target.subject, data, target.timeout_s, hdrs)
                    attempts = 1
                except ExtensionTimeout as exc:
                    body, attempts = await self._retry(send, extension_id, target, data, hdrs, exc)
                try:
                    reply = self._decode(body)
                except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                    reply = None  # not JSON, not UTF-8 text, or nested too deeply
                if type(reply) is not dict:
                    raise InvalidResponse(extension_id, _invalid_reason(body), attempts)
            except _NOT_FAULTS:
                raise
            except ExtensionError as exc:
                seconds = perf_counter() - started
                if isinstance(exc, ExtensionTimeout | MaxRetriesExceeded):
                    rtt = seconds  # slowness is the limit's business; a fast error is not
                exc.attempts = exc.attempts or 1
                if target.instance_id is not None and self.ejections is not None:
                    self.ejections.record(route, target.instance_id, False)
                self.breaker.record_failure(target.circuit)
                self.health.record(
                    extension_id, False, seconds * 1000.0, *_by_version(route, target)
                )
                outcome = outcome_of(exc)
                if observer is not None:
                    observer(extension_id, ext.type, target.version, outcome, seconds)
                log.warning(
                    "invoke_failed",
                    **_call_fields(
                        ext, target, outcome, seconds, exc.attempts, trace_id, tenant_id
                    ),
                    reason=exc.reason,
                )
                raise
            rtt = seconds = perf_counter() - started
            if target.instance_id is not None and self.ejections is not None:
                self.ejections.record(route, target.instance_id, True)
            self.breaker.record_success(target.circuit, seconds)
            self.health.record(extension_id, True, seconds * 1000.0, *_by_version(route, target))
            if observer is not None:
                observer(extension_id, ext.type, target.version, "ok", seconds)
            if logs.debug_enabled:
                log.debug(
                    "invoke_ok",
                    **_call_fields(ext, target, "ok", seconds, attempts, trace_id, tenant_id),
                )
        finally:
            if bulkhead is not None:
                bulkhead.release(rtt)
        return reply

    async def _retry(
        self,
        send: Send,
        extension_id: str,
        target: Target,
        data: bytes,
        hdrs: dict[str, str] | None,
        first: ExtensionTimeout,
    ) -> tuple[bytes, int]:
        """After a first timeout: up to `target.retries` more attempts, timeouts only."""
        attempt = 1
        while attempt <= target.retries:
            await asyncio.sleep(backoff_s(attempt))
            attempt += 1
            try:
                return await send(
                    extension_id, target.subject, data, target.timeout_s, hdrs
                ), attempt
            except ExtensionTimeout:
                continue
            except ExtensionError as exc:
                exc.attempts = attempt
                raise
        if not target.retries:
            first.attempts = 1
            raise first
        raise MaxRetriesExceeded(
            extension_id,
            f"all {attempt} attempts timed out after {target.timeout_s * 1000:g} ms each "
            f"on {target.subject}",
            attempt,
        )

    def _recovery_trial(self, extension_id: str) -> Extension:
        """The record of an auto-disabled extension when this call may be its half-open trial;
        otherwise re-raise `ExtensionDisabled` (see `automation`)."""
        auto = self.auto
        ext = self.registry.get(extension_id)
        if auto is None or ext is None or not auto.may_try_disabled(extension_id):
            raise ExtensionDisabled(extension_id)
        return ext

    # -- following the registry ---------------------------------------------------------------

    def _follow(self, snapshot: Snapshot) -> None:
        """Keep circuits and limits in step with the records; forget deleted extensions.

        Unchanged records are the same objects in consecutive snapshots (patching keeps them),
        so this is one identity check per record. Changed metadata reconfigures every circuit
        of the record; a version added gets its circuit configured, a version removed loses
        its circuit, and a version enabled again (after a rollback, say) starts closed.
        """
        if self._closed:
            return
        before, self._snapshot = self._snapshot.by_id, snapshot
        for extension_id, ext in snapshot.by_id.items():
            old = before.get(extension_id)
            if old is ext:
                continue
            self._follow_circuits(old, ext)
            if old is None or old.metadata != ext.metadata:
                self._limit(extension_id, ext.metadata)
        for extension_id in before.keys() - snapshot.by_id.keys():
            for key in _circuits(before[extension_id]):
                self._drop_circuit(key)
            self.health.remove(extension_id)
            self._routes.pop(extension_id, None)
            self._bulkheads.pop(extension_id, None)
            if self.ejections is not None:
                self.ejections.forget(extension_id)

    def _follow_circuits(self, old: Extension | None, ext: Extension) -> None:
        keys = _circuits(ext)
        if old is None:
            self._configure_all(keys, ext.metadata)
            return
        had = set(_circuits(old))
        was_enabled = {v.version: v.enabled for v in old.versions}
        reopened = [  # enabled again (after a rollback, say): a closed circuit anew
            version_circuit(ext.id, v.version)
            for v in ext.versions
            if v.enabled and was_enabled.get(v.version) is False
        ]
        for key in [*(had - set(keys)), *reopened]:
            self._drop_circuit(key)
        for gone in was_enabled.keys() - {v.version for v in ext.versions}:
            self.health.forget_version(ext.id, gone)
        changed = old.metadata != ext.metadata
        self._configure_all([k for k in keys if changed or k not in had] + reopened, ext.metadata)

    def _configure_all(self, keys: list[str], metadata: Mapping[str, Any]) -> None:
        for key in dict.fromkeys(keys):
            self._configure(key, metadata)

    def _drop_circuit(self, key: str) -> None:
        self.breaker.remove(key)
        self._configured.discard(key)

    def _limit(self, extension_id: str, metadata: Mapping[str, Any]) -> None:
        """Give the extension its bulkhead, or none: metadata `max_concurrency` (validated
        with the record), else `extension_max_concurrency` (0: none), adaptive below that
        maximum with `adaptive_concurrency_enabled`. A changed limit keeps the calls in
        flight counted (the same bulkhead, or the same adaptive state, is kept)."""
        settings = self.settings
        fixed = metadata.get("max_concurrency") or settings.extension_max_concurrency
        bulkhead = self._bulkheads.get(extension_id)
        if settings.adaptive_concurrency_enabled:
            adaptive = bulkhead.adaptive if bulkhead is not None else None
            if bulkhead is None or adaptive is None:
                adaptive = AdaptiveLimit(self.clock.monotonic)
                bulkhead = self._bulkheads[extension_id] = Bulkhead(0, adaptive)
            adaptive.cap(fixed or MAX_LIMIT)
            bulkhead.limit = adaptive.limit
        elif fixed:
            if bulkhead is None:
                self._bulkheads[extension_id] = Bulkhead(fixed)
            else:
                bulkhead.limit = fixed
        else:
            self._bulkheads.pop(extension_id, None)

    def _configure(self, extension_id: str, metadata: Mapping[str, Any]) -> None:
        overrides = any(str(key).startswith("circuit_breaker") for key in metadata)
        if not self.breaker.enabled or (not overrides and extension_id not in self._configured):
            return  # defaults apply to circuits created on first use
        try:
            self.breaker.configure(extension_id, metadata)
        except InvalidRecord as exc:
            log.error(
                "circuit_overrides_rejected", extension_id=extension_id, problems=exc.problems
            )
            return
        if overrides:
            self._configured.add(extension_id)
        else:
            self._configured.discard(extension_id)


def _log_transition(key: str, old: str, new: str) -> None:
    extension_id, version = split_circuit(key)
    level = log.warning if new == "open" else log.info
    level("circuit_state_changed", extension_id=extension_id, version=version, old=old, new=new)


_NO_VERSION: tuple[None, None] = (None, None)


def _by_version(route: Route, target: Target) -> tuple[str, str] | tuple[None, None]:
    """The (version, circuit) a call counts under in `versions` of its health, or nothing for
    an extension without versions (its total is its only version: no work per call)."""
    return (target.version, target.circuit) if route.ext.versions else _NO_VERSION


def _circuits(ext: Extension) -> list[str]:
    """The circuit keys of a record: its own, and one per version named apart from its row."""
    return [
        ext.id,
        *(version_circuit(ext.id, v.version) for v in ext.versions if v.version != ext.version),
    ]


async def _cancel(task: asyncio.Task[None] | None) -> None:
    if task is not None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def _counting_attempts(send: Send, span: Span) -> Send:
    """`send` that adds an `extreg.attempt` event to `span` for every request it makes."""
    number = 0

    async def attempt(
        extension_id: str, subject: str, data: bytes, timeout_s: float, hdrs: dict[str, str] | None
    ) -> bytes:
        nonlocal number
        number += 1
        try:
            body = await send(extension_id, subject, data, timeout_s, hdrs)
        except ExtensionError as exc:
            tracing.attempt(span, number, outcome_of(exc))
            raise
        tracing.attempt(span, number, "reply")
        return body

    return attempt


def _pick(route: Route, ctx: Mapping[str, Any], trace_id: Any, tenant_id: Any) -> Target:
    """Route a call whose extension has versions or instances (ids resolved as in the envelope)."""

    def lookup(key: str) -> Any:
        if key == "tenant_id":
            return tenant_id
        if key == "trace_id":
            return trace_id
        return ctx.get(key)

    return route.pick(lookup)


def _call_fields(
    ext: Extension,
    target: Target,
    outcome: str,
    seconds: float,
    attempts: int,
    trace_id: str | None,
    tenant_id: str | None,
) -> dict[str, Any]:
    """What a call's log line says, failed or not (docs/admin-api.md, "Logs")."""
    return {
        "extension_id": ext.id,
        "extension_type": ext.type,
        "version": target.version,
        "subject": target.subject,
        "outcome": outcome,
        "latency_ms": round(seconds * 1000.0, 2),
        "attempts": attempts,
        "trace_id": trace_id,
        "tenant_id": tenant_id,
    }


def _invalid_reason(body: bytes) -> str:
    shown = body[:80].decode("utf-8", "replace")
    return f"reply is not a JSON object: {shown!r}" + ("..." if len(body) > 80 else "")
