"""OpenTelemetry tracing: extreg's one adapter of `opentelemetry-api`.

extreg depends on the API only, so an application that embeds it decides about the SDK, and a
process without one pays next to nothing. What is traced (SPEC.md, "Observability"):

- every invocation: a CLIENT span `extreg.invoke <extension id>` with the OpenTelemetry
  messaging attributes for NATS (`messaging.system`, `messaging.destination.name`, ...),
  `extreg.extension.id`/`.type`/`.version`, one `extreg.attempt` event per request sent, and
  status ERROR with the exception when the call fails (`invocation`, `routed`, `attempt`);
- every policy run: an INTERNAL span `extreg.policy <policy id>`, whose steps' invocation spans
  (and provider-hook spans) are its children (`span`);
- across NATS: the W3C `traceparent`/`tracestate` (and `baggage`) go into the request headers
  (`inject`), and an extension continues the trace from them (`serving`, as the samples do);
- from HTTP: an admin API invoke or policy run continues the trace of a request that carries a
  `traceparent` (`continued`).

The fast path: `active()` is False when no SDK has set a tracer provider and the caller is in
no span; the invoker then skips every span call (a no-op span still costs about 4 µs). With a
remote parent and no SDK, spans are the API's non-recording ones, which still carry the
caller's trace on to the extension.

`export_from_env()` is `extreg serve`'s: the SDK with an OTLP (HTTP/protobuf) exporter, only
when the standard `OTEL_EXPORTER_OTLP_ENDPOINT` (or `..._TRACES_ENDPOINT`) is set. The SDK and
exporter are the `otlp` extra (`pip install 'extreg[otlp]'`).
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
_INSTALL_HINT = "pip install 'extreg[otlp]'"
_NATS = {
    "messaging.system": "nats",
    "messaging.operation.type": "send",
    "messaging.operation.name": "request",
}

# `trace.get_tracer_provider()` looks in os.environ on every call while no provider is set
# (about 0.8 µs), too slow for a check made per invocation; the module global it reads is
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
    name: str, kind: SpanKind = SpanKind.INTERNAL, attributes: Mapping[str, Any] | None = None
) -> Iterator[Span]:
    """A current span around the block; an exception leaving it (a cancellation aside) sets
    status ERROR with its reason, `error.type` and an exception event."""
    with TRACER.start_as_current_span(
        name,
        kind=kind,
        attributes=attributes,
        record_exception=False,  # `failed` does both, with the error's reason
        set_status_on_exception=False,
    ) as current:
        try:
            yield current
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
    """Mark `current` failed by `exc` (its `reason` when it has one: no message text of
    a library, which may hold a URL, reaches the description)."""
    reason = getattr(exc, "reason", None)
    current.set_attribute("error.type", type(exc).__name__)
    current.record_exception(exc)
    current.set_status(Status(StatusCode.ERROR, reason if isinstance(reason, str) else None))


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
        f"{name} process", context=parent, kind=SpanKind.SERVER, attributes=attributes
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
    `OTEL_SERVICE_NAME`) is read by the SDK itself. `ConfigError` when the endpoint is set but
    the `otlp` extra is missing, or another protocol than HTTP/protobuf is asked for.
    """
    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    if endpoint is None or os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return None
    protocol = next((os.environ[v] for v in PROTOCOL_VARIABLES if os.environ.get(v)), None)
    if protocol not in (None, "http/protobuf"):
        raise ConfigError(
            f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r}: extreg exports traces over "
            "http/protobuf only (unset it, or set it to http/protobuf)"
        )
    try:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
    except ImportError:
        raise ConfigError(
            "OTEL_EXPORTER_OTLP_ENDPOINT is set, but the OpenTelemetry SDK and OTLP exporter "
            f"are not installed: {_INSTALL_HINT}"
        ) from None
    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": service_name}
    provider = TracerProvider(resource=Resource.create(defaults))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    where = urlsplit(endpoint)  # logged without a user, a password or a path
    log.info("tracing_exported", collector=f"{where.scheme}://{where.netloc.rpartition('@')[2]}")
    return provider.shutdown
