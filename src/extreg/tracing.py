"""OpenTelemetry tracing: extreg's one adapter of `opentelemetry-api`.

extreg depends on the API only, so an application that embeds it decides about the SDK, and a
process without one pays next to nothing. What is traced (SPEC.md, "Observability"):

- every invocation: a CLIENT span `extreg.invoke <extension id>` with the OpenTelemetry
  messaging attributes for NATS (`messaging.system`, `messaging.destination.name`, ...),
  `extreg.extension.id`/`.type`/`.version`, one `extreg.attempt` event per request sent, and
  status ERROR when the call fails (`invocation`, `routed`, `attempt`, `failed`);
- every policy run: an INTERNAL span `extreg.policy <policy id>`, whose steps' invocation spans
  (and provider-hook spans) are its children (`span`); a blocked run is no error (its outcome
  is an attribute), a failed one is.

A failure is exported as its class and extreg's own `reason`, never as the exception's text or
stack trace: a provider hook's or a library's message may hold a key or a URL.
- across NATS: the W3C `traceparent`/`tracestate` (and `baggage`) go into the request headers
  (`inject`), and an extension continues the trace from them (`serving`, as the samples do);
- from HTTP: an admin API invoke or policy run continues the trace of a request that carries a
  `traceparent` (`continued`).

The fast path: `active()` is False when no SDK has set a tracer provider and the caller is in
no span; the invoker then skips every span call (even a no-op span makes objects and touches
the context; docs/performance.md, "Tracing", has the figures). With a remote parent and no SDK, spans are the API's non-recording ones, which still carry the
caller's trace on to the extension.

`export_from_env()` is `extreg serve`'s: the SDK with an OTLP (HTTP/protobuf) exporter, only
when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set. The SDK and
exporter are the `otlp` extra (`pip install 'extreg[otlp]'`). An endpoint holding credentials
(a user, a password, a query) or a malformed headers variable is refused: the exporter and the
SDK would log them whole.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import structlog
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import (
    INVALID_SPAN,
    ProxyTracerProvider,
    Span,
    SpanKind,
    Status,
    StatusCode,
)

from .errors import ConfigError

log = structlog.get_logger("extreg.tracing")

TRACER = trace.get_tracer("extreg")
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
PROTOCOL_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")
HEADERS_VARIABLES = ("OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS")
_INSTALL_HINT = "pip install 'extreg[otlp]'"
_NATS = {
    "messaging.system": "nats",
    "messaging.operation.type": "send",
    "messaging.operation.name": "request",
}

# `trace.get_tracer_provider()` looks in os.environ on every call while no provider is set,
# slower than the whole check (bench/bench_tracing.py prints both); the module global it reads is
# set once, by `set_tracer_provider`. Read it when this API version has it; otherwise fall
# back to the public call (correct, only slower).
trace.get_tracer_provider()  # loads a provider named by OTEL_PYTHON_TRACER_PROVIDER, if any
if hasattr(trace, "_TRACER_PROVIDER"):

    def provider_set() -> bool:
        """True once an SDK (any real tracer provider) has been set for this process."""
        return trace._TRACER_PROVIDER is not None

else:  # pragma: no cover - a future API without the global

    def provider_set() -> bool:
        """True once an SDK (any real tracer provider) has been set for this process."""
        return not isinstance(trace.get_tracer_provider(), ProxyTracerProvider)


def active() -> bool:
    """Whether a span made now would be recorded or carry a trace on (see the module doc)."""
    if provider_set():
        return True
    current = trace.get_current_span()  # INVALID_SPAN outside any span: skip the id check
    return current is not INVALID_SPAN and current.get_span_context().is_valid


@contextlib.contextmanager
def span(
    name: str,
    kind: SpanKind = SpanKind.INTERNAL,
    attributes: Mapping[str, Any] | None = None,
    expected: tuple[type[Exception], ...] = (),
) -> Iterator[Span]:
    """A current span around the block. An exception leaving it fails the span (`failed`),
    unless it is one of `expected` (an outcome, not an error) or a cancellation (not an
    `Exception`: the span just ends)."""
    with TRACER.start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,  # `failed` does both, with the error's reason
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
        except expected:
            raise
        except Exception as exc:
            failed(current, exc)
            raise


def invocation(extension_id: str) -> contextlib.AbstractContextManager[Span]:
    """The CLIENT span of one invocation; `routed` adds what routing chose."""
    return span(
        f"extreg.invoke {extension_id}",
        SpanKind.CLIENT,
        {**_NATS, "extreg.extension.id": extension_id},
    )


def routed(
    current: Span, extension_type: str, version: str, subject: str, tenant_id: Any, size: int
) -> None:
    """The invocation's attributes known once it is routed and encoded."""
    current.set_attributes(
        {
            "extreg.extension.type": extension_type,
            "extreg.extension.version": version,
            "messaging.destination.name": subject,
            "messaging.message.body.size": size,
        }
    )
    if tenant_id is not None:
        current.set_attribute("extreg.tenant_id", str(tenant_id))


def attempt(current: Span, number: int, outcome: str) -> None:
    """One request sent: its number (1 is the first) and what came of it (reply, timeout,
    error)."""
    current.add_event("extreg.attempt", {"extreg.attempt": number, "extreg.outcome": outcome})


def failed(current: Span, exc: BaseException) -> None:
    """Mark `current` failed by `exc`: status ERROR, `error.type`, and an `exception` event
    with the class and extreg's `reason` only (see the module docstring: not
    `record_exception`, which exports the message and the stack trace)."""
    reason = getattr(exc, "reason", None)
    reason = reason if isinstance(reason, str) else None
    name = type(exc).__name__
    current.set_attribute("error.type", name)
    current.add_event("exception", {"exception.type": name, "exception.message": reason or name})
    current.set_status(Status(StatusCode.ERROR, reason))


def inject(headers: dict[str, str] | None) -> dict[str, str]:
    """`headers` (a new dict for None) with the current trace context's W3C headers added."""
    carrier = {} if headers is None else headers
    propagate.inject(carrier)
    return carrier


def trace_id_hex() -> str | None:
    """The current span's trace id, as `traceparent` writes it, or None outside a span."""
    context = trace.get_current_span().get_span_context()
    return trace.format_trace_id(context.trace_id) if context.is_valid else None


@contextlib.contextmanager
def continued(headers: Mapping[str, str]) -> Iterator[None]:
    """The caller's trace current for the block, when its request (an HTTP request to the
    admin API, say) carries a `traceparent`; nothing otherwise."""
    if "traceparent" not in headers:
        yield
        return
    token = otel_context.attach(propagate.extract(headers))
    try:
        yield
    finally:
        otel_context.detach(token)


@contextlib.contextmanager
def serving(name: str, subject: str, headers: Mapping[str, str] | None) -> Iterator[None]:
    """An extension's side of a request: a SERVER span continuing the caller's trace from the
    NATS headers. Nothing at all without an SDK (an extension calls no one further)."""
    if not provider_set():
        yield
        return
    parent = propagate.extract(headers or {})
    attributes = {**_NATS, "messaging.operation.type": "process"}
    attributes["messaging.destination.name"] = subject
    with TRACER.start_as_current_span(
        f"{name} process",
        context=parent,
        kind=SpanKind.SERVER,
        attributes=attributes,
        record_exception=False,  # a sample answers its own errors; a cancellation is none
        set_status_on_exception=False,
    ):
        yield


def add_span_ids(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: `otel_trace_id`/`otel_span_id` on every line written in a span
    (not `trace_id`: that is the router's own id, which call lines carry already)."""
    context = trace.get_current_span().get_span_context()
    if context.is_valid:
        event["otel_trace_id"] = trace.format_trace_id(context.trace_id)
        event["otel_span_id"] = trace.format_span_id(context.span_id)
    return event


def export_from_env(service_name: str = "extreg") -> Callable[[], None] | None:
    """Set up the SDK with a batching OTLP exporter when an OTLP endpoint variable is set;
    the function that flushes and stops it, or None when tracing is not exported.

    Every other `OTEL_*` variable (headers, timeout, resource attributes, sampler,
    `OTEL_SERVICE_NAME`) is read by the SDK itself; `service_name` is used when they name no
    service. `ConfigError` when the `otlp` extra is missing, another protocol than
    HTTP/protobuf is asked for, or a variable would put a secret in the SDK's logs.
    """
    endpoint = _first(ENDPOINT_VARIABLES)
    if endpoint is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    _check_export_variables(endpoint[1])
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import SERVICE_NAME, Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            f"{endpoint[0]} is set, but the OpenTelemetry SDK and OTLP exporter are not "
            f"installed: {_INSTALL_HINT}"
        ) from None
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: service_name}))
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    where = urlsplit(endpoint[1])
    log.info("tracing_exported", collector=f"{where.scheme}://{where.netloc}")
    return provider.shutdown


def _first(variables: tuple[str, ...]) -> tuple[str, str] | None:
    """(name, value) of the first of `variables` set to something, or None."""
    return next(((v, os.environ[v]) for v in variables if os.environ.get(v)), None)


def _check_export_variables(endpoint: str) -> None:
    """Refuse what the exporter cannot use or would log with its secrets (see `export_from_env`);
    errors name the variable and the problem, never the value."""
    protocol = _first(PROTOCOL_VARIABLES)
    if protocol is not None and protocol[1] != "http/protobuf":
        raise ConfigError(
            f"{protocol[0]}={protocol[1]!r}: extreg exports traces over http/protobuf only "
            "(unset it, or set it to http/protobuf)"
        )
    where = urlsplit(endpoint)
    if where.scheme not in ("http", "https") or not where.hostname:
        raise ConfigError(
            "the OTLP endpoint must be an http:// or https:// URL with a host, "
            "e.g. http://127.0.0.1:4318"
        )
    if "@" in where.netloc or where.query:
        raise ConfigError(
            "the OTLP endpoint holds credentials (a user, a password or a query), which the "
            "exporter would log on every failed export: put them in "
            "OTEL_EXPORTER_OTLP_HEADERS (e.g. Authorization=Bearer%20...) instead"
        )
    for variable in HEADERS_VARIABLES:
        for number, item in enumerate(os.environ.get(variable, "").split(","), 1):
            if item.strip() and "=" not in item:
                raise ConfigError(
                    f"{variable}: item {number} is not name=value (the SDK would log it "
                    "whole, and it may hold a token); separate name and value with '='"
                )
