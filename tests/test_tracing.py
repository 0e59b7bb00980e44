"""OpenTelemetry tracing (SPEC.md, "Observability"): invocation and policy-run spans caught by
an in-memory exporter, the W3C trace context in the NATS headers, the sample extensions
continuing the trace through the real NATS server, log lines inside a span, nothing without an
SDK, and `extreg serve` exporting over OTLP to a stand-in collector."""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import shutil
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from api_helpers import BUNDLED_POLICIES, SUPPORT_EN, make_tokens, samples_server, seed
from cli_helpers import EXTREG, environment, start_server, stop_server
from helpers import make_settings
from invoke_helpers import constant, fixture_settings, listen, open_invoker, subject
from nats.aio.client import Client
from opentelemetry import context, trace
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from trace_helpers import named

from extreg import (
    ConfigError,
    ExtensionError,
    ExtensionNotFound,
    InvalidResponse,
    Invoker,
    MaxRetriesExceeded,
    NoProvider,
    Settings,
    ValidatorBlocked,
    logs,
    tracing,
)
from extreg.adapters.migrate import migrate
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLE_EXTENSIONS, SampleRunner
from testsupport.otel import use_provider

REQUEST = {"payload": {"payload": "Hello   World"}, "metadata": {}}


def rec(ext_id: str, on: str, **values: Any) -> dict[str, Any]:
    return {"id": ext_id, "type": "pre", "subject": on, "timeout_ms": 200, **values}


def traceparent(span: Any) -> str:
    ctx = span.get_span_context()
    ids = f"{trace.format_trace_id(ctx.trace_id)}-{trace.format_span_id(ctx.span_id)}"
    return f"00-{ids}-{ctx.trace_flags:02x}"


async def test_an_invocation_is_a_client_span_the_extension_continues(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner, spans: InMemorySpanExporter
) -> None:
    """`extreg.invoke <id>`: CLIENT, the messaging attributes for NATS, the extension's id,
    type and version, one attempt event; the sample's SERVER span is its child, found through
    the `traceparent` that crossed the real NATS server."""
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        await inv.invoke("normalize_text", REQUEST, {"tenant_id": "acme"})
        await asyncio.sleep(0)
    [call] = named(spans, "extreg.invoke normalize_text")
    ext = inv.registry.lookup("normalize_text")
    assert SpanKind.CLIENT == call.kind
    assert {
        "messaging.system": "nats",
        "messaging.operation.type": "send",
        "messaging.operation.name": "request",
        "messaging.destination.name": ext.subject,
        "extreg.extension.id": "normalize_text",
        "extreg.extension.type": "pre",
        "extreg.extension.version": ext.version,
        "extreg.tenant_id": "acme",
    }.items() <= dict(call.attributes or {}).items()
    assert [("extreg.attempt", {"extreg.attempt": 1, "extreg.outcome": "reply"})] == [
        (e.name, dict(e.attributes or {})) for e in call.events
    ]
    assert StatusCode.UNSET == call.status.status_code
    served = await wait_for_span(spans, "normalize_text process")
    assert SpanKind.SERVER == served.kind
    assert served.parent is not None and call.context is not None
    assert (call.context.trace_id, call.context.span_id) == (
        served.parent.trace_id,
        served.parent.span_id,
    )


async def wait_for_span(exporter: InMemorySpanExporter, name: str) -> Any:
    """The one span called `name`, once the sample's thread has ended it."""
    for _ in range(500):
        found = named(exporter, name)
        if found:
            [span] = found
            return span
        await asyncio.sleep(0.01)
    raise AssertionError(f"no span {name!r} in {[s.name for s in exporter.get_finished_spans()]}")


async def test_the_request_headers_carry_the_span_and_the_ids(
    tmp_path: Path, nats_url: str, nats_client: Client, spans: InMemorySpanExporter
) -> None:
    """The NATS headers hold the invocation span's `traceparent` beside `trace_id` and
    `tenant_id`, so an extension continues exactly this span."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on))
    async with listen(nats_client, on, constant(b"{}")) as heard, open_invoker(settings) as inv:
        await inv.invoke("x", {"payload": 1}, {"trace_id": "t-1", "tenant_id": "acme"})
    [call] = named(spans, "extreg.invoke x")
    [msg] = heard.messages
    assert {"trace_id": "t-1", "tenant_id": "acme", "traceparent": traceparent(call)}.items() <= (
        msg.headers or {}
    ).items()


async def test_a_failed_call_is_an_error_span_with_an_event_per_attempt(
    tmp_path: Path, nats_url: str, nats_client: Client, spans: InMemorySpanExporter
) -> None:
    """Three attempts that time out: three `timeout` attempt events, status ERROR with the
    error's reason, `error.type` and an `exception` event of the class and the reason."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("slow", on, timeout_ms=30, retry=2))
    async with listen(nats_client, on), open_invoker(settings) as inv:
        with pytest.raises(MaxRetriesExceeded) as raised:
            await inv.invoke("slow", {"payload": 1})
    [call] = named(spans, "extreg.invoke slow")
    attempts = [dict(e.attributes or {}) for e in call.events if e.name == "extreg.attempt"]
    assert [{"extreg.attempt": n, "extreg.outcome": "timeout"} for n in (1, 2, 3)] == attempts
    assert (StatusCode.ERROR, raised.value.reason) == (
        call.status.status_code,
        call.status.description,
    )
    assert "MaxRetriesExceeded" == (call.attributes or {})["error.type"]
    [exception] = [e for e in call.events if e.name != "extreg.attempt"]
    assert ("exception", {"exception.type": "MaxRetriesExceeded"}) == (
        exception.name,
        {"exception.type": (exception.attributes or {})["exception.type"]},
    )
    assert raised.value.reason == (exception.attributes or {})["exception.message"]


async def test_a_refused_call_is_an_error_span_too(
    tmp_path: Path, nats_url: str, spans: InMemorySpanExporter
) -> None:
    """An unknown extension fails before any request: an error span with no attempt."""
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        with pytest.raises(ExtensionNotFound):
            await inv.invoke("nope", {"payload": 1})
    [call] = named(spans, "extreg.invoke nope")
    assert StatusCode.ERROR == call.status.status_code
    assert "ExtensionNotFound" == (call.attributes or {})["error.type"]
    assert not [e for e in call.events if e.name == "extreg.attempt"]


async def test_a_policy_run_is_the_parent_of_its_steps(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner, spans: InMemorySpanExporter
) -> None:
    """`support_en`: one `extreg.policy` span whose children are the four steps' invocation
    spans, all in one trace, whose id is the run's `trace_id` too."""
    settings = fixture_settings(tmp_path, nats_url)
    (settings.fixtures_dir / "policies").mkdir()
    shutil.copy(BUNDLED_POLICIES / "support_en.json", settings.fixtures_dir / "policies")
    async with open_invoker(settings) as inv:
        result = await inv.run_policy("support_en", {"payload": "Hello   World"})
    [run] = named(spans, "extreg.policy support_en")
    assert run.context is not None
    steps = [s for s in spans.get_finished_spans() if s.name.startswith("extreg.invoke ")]
    assert ["normalize_text", "pii_guard", "test_provider", "mask_pii"] == [
        s.name.removeprefix("extreg.invoke ") for s in steps
    ]
    assert all(s.parent is not None and s.parent.span_id == run.context.span_id for s in steps)
    assert trace.format_trace_id(run.context.trace_id) == result.context["trace_id"]


def policy_settings(
    tmp_path: Path, nats_url: str, records: list[dict[str, Any]], policy: dict[str, Any]
) -> Settings:
    settings = fixture_settings(tmp_path, nats_url, *records)
    (settings.fixtures_dir / "policies").mkdir()
    (settings.fixtures_dir / "policies" / "p.json").write_text(json.dumps(policy), "utf-8")
    return settings


async def test_a_blocked_run_is_no_error_and_its_cancelled_step_ends_quietly(
    tmp_path: Path, nats_url: str, nats_client: Client, spans: InMemorySpanExporter
) -> None:
    """Two validators asked at once; the first blocks, so the second (never answering) is
    cancelled. The policy span says `blocked` without ERROR; the cancelled call's span has
    ended, not failed, with no attempt outcome and no exception."""
    quick, silent = subject(), subject()
    settings = policy_settings(
        tmp_path,
        nats_url,
        [rec("a", quick, type="validator"), rec("b", silent, type="validator", timeout_ms=5000)],
        {"policy_id": "p", "validators": [{"id": "a"}, {"id": "b"}]},
    )
    reject = json.dumps({"status": "reject", "reason": "no"}).encode()
    async with (
        listen(nats_client, quick, constant(reject)),
        listen(nats_client, silent) as asked,
        open_invoker(settings) as inv,
    ):
        with pytest.raises(ValidatorBlocked):
            await inv.run_policy("p", {"payload": "hi"})
    assert 1 == asked.count
    [run] = named(spans, "extreg.policy p")
    assert (StatusCode.UNSET, "blocked") == (
        run.status.status_code,
        (run.attributes or {})["extreg.policy.outcome"],
    )
    [cancelled] = named(spans, "extreg.invoke b")
    assert StatusCode.UNSET == cancelled.status.status_code
    assert [] == [e.name for e in cancelled.events]


async def test_a_provider_hook_is_a_child_span_whose_error_keeps_its_secrets(
    tmp_path: Path, nats_url: str, spans: InMemorySpanExporter
) -> None:
    """A `name:model` provider is an `extreg.provider_hook` span under the run; a hook that
    raises with a key in its message fails the span by class only: the key is in no
    attribute or event of any span."""
    settings = policy_settings(tmp_path, nats_url, [], {"policy_id": "p", "providers": ["llm:gpt"]})

    async def hook(name: str, message: dict[str, Any], ctx: dict[str, Any]) -> dict[str, Any]:
        raise RuntimeError("GET https://llm.example/v1?api_key=SECRET-123 failed")

    async with open_invoker(settings) as inv:
        with pytest.raises(NoProvider):
            await inv.run_policy("p", {"payload": "hi"}, provider=hook)
    [run] = named(spans, "extreg.policy p")
    [called] = named(spans, "extreg.provider_hook llm:gpt")
    assert called.parent is not None and run.context is not None
    assert run.context.span_id == called.parent.span_id
    assert StatusCode.ERROR == called.status.status_code
    exported = repr(
        [(s.attributes, [(e.name, e.attributes) for e in s.events], s.status.description)
         for s in spans.get_finished_spans()]
    )  # fmt: skip
    assert "SECRET" not in exported
    assert "InvocationError" == (called.attributes or {})["error.type"]


async def test_inside_a_span_log_lines_carry_its_ids(
    tmp_path: Path, nats_url: str, nats_client: Client, spans: InMemorySpanExporter
) -> None:
    """The warning of a failed call, through the processors every line goes through, names
    the invocation span's trace and span ids (`otel_trace_id`, `otel_span_id`) beside the
    router's own `trace_id`."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("bad", on))
    async with listen(nats_client, on, constant(b"[]")), open_invoker(settings) as inv:
        with structlog.testing.capture_logs(processors=logs.PROCESSORS) as lines:
            with pytest.raises(InvalidResponse):
                await inv.invoke("bad", {"payload": 1}, {"trace_id": "t-7"})
            structlog.get_logger("test").warning("outside")
    [call] = named(spans, "extreg.invoke bad")
    [failed] = [line for line in lines if line["event"] == "invoke_failed"]
    [outside] = [line for line in lines if line["event"] == "outside"]
    assert call.context is not None
    assert {
        "trace_id": "t-7",
        "otel_trace_id": trace.format_trace_id(call.context.trace_id),
        "otel_span_id": trace.format_span_id(call.context.span_id),
    }.items() <= failed.items()
    assert "otel_trace_id" not in outside


async def test_without_an_sdk_nothing_is_traced_or_sent(
    tmp_path: Path,
    nats_url: str,
    nats_client: Client,
    no_sdk: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """No SDK and no parent span: `active()` is False, no span is even asked for (the tracer
    fails on use) and the headers hold only the ids."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on))
    assert not tracing.active()
    monkeypatch.setattr(tracing, "TRACER", None)  # any span call would raise
    async with listen(nats_client, on, constant(b"{}")) as heard, open_invoker(settings) as inv:
        await inv.invoke("x", {"payload": 1}, {"tenant_id": "acme"})
    assert [{"tenant_id": "acme"}] == [m.headers for m in heard.messages]


async def test_without_an_sdk_a_callers_trace_is_carried_on(
    tmp_path: Path, nats_url: str, nats_client: Client, no_sdk: None
) -> None:
    """No SDK, but the caller is inside a span (extracted from its own request): the
    extension gets the caller's trace, so a router's trace does not stop at extreg."""
    on = subject()
    settings = fixture_settings(tmp_path, nats_url, rec("x", on))
    parent = trace.SpanContext(
        trace_id=0x4BF92F3577B34DA6A3CE929D0E0E4736,
        span_id=0x00F067AA0BA902B7,
        is_remote=True,
        trace_flags=trace.TraceFlags(1),
    )
    token = context.attach(trace.set_span_in_context(trace.NonRecordingSpan(parent)))
    try:
        async with listen(nats_client, on, constant(b"{}")) as heard, open_invoker(settings) as inv:
            await inv.invoke("x", {"payload": 1})
    finally:
        context.detach(token)
    [msg] = heard.messages
    assert (msg.headers or {})["traceparent"] == (
        "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    )


# -- extreg serve and OTLP -------------------------------------------------------------------


class Collector:
    """A stand-in OpenTelemetry collector: accepts OTLP/HTTP trace exports, keeps the spans."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str, str]] = []  # (service, name, trace, parent)
        collector = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                if self.path == "/v1/traces":
                    collector.receive(body)
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def receive(self, body: bytes) -> None:
        request = ExportTraceServiceRequest.FromString(body)
        for resource in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource.resource.attributes}
            for scope in resource.scope_spans:
                self.spans += [
                    (
                        attributes.get("service.name", ""),
                        s.name,
                        s.trace_id.hex(),
                        s.parent_span_id.hex(),
                    )
                    for s in scope.spans
                ]


@pytest.fixture
def collector() -> Iterator[Collector]:
    found = Collector()
    thread = threading.Thread(target=found.server.serve_forever, daemon=True)
    thread.start()
    yield found
    found.server.shutdown()
    found.server.server_close()


async def test_serve_exports_spans_when_an_otlp_endpoint_is_set(
    tmp_path: Path,
    db_url: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    collector: Collector,
) -> None:
    """`OTEL_EXPORTER_OTLP_ENDPOINT` set: `extreg serve` exports its invocation spans, as
    service `extreg`, by the time it has stopped."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    migrate(db_url)
    await seed(db_url, settings, *(s.record() for s in SAMPLE_EXTENSIONS))
    tokens = await make_tokens(db_url)
    proc, url, _ = start_server(
        tmp_path,
        "--database-url",
        db_url,
        nats_url=nats_url,
        OTEL_EXPORTER_OTLP_ENDPOINT=collector.url,
    )
    try:
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            called = await client.post(
                "/admin/extensions/normalize_text/invoke",
                json={"payload": {"payload": "Hi"}},
                headers={"Authorization": f"Bearer {tokens['operator']}"},
            )
            assert 200 == called.status_code, called.text
    finally:
        assert 0 == stop_server(proc)
    assert ("extreg", "extreg.invoke normalize_text") in [s[:2] for s in collector.spans]


async def test_the_sample_extensions_command_exports_its_side_of_the_trace(
    tmp_path: Path,
    nats_server_factory: Callable[..., NatsServer],
    collector: Collector,
    spans: InMemorySpanExporter,
) -> None:
    """`extreg sample-extensions` with an OTLP endpoint: a traced call's extension-side span
    reaches the collector as service `extreg-samples`, a child of the invocation's span
    (the trace crossed a real NATS server into another process)."""
    server = nats_server_factory()  # its own: the session's samples would share the calls
    proc = await asyncio.create_subprocess_exec(
        str(EXTREG),
        "sample-extensions",
        "--nats-url",
        server.url,
        env=environment(tmp_path, OTEL_EXPORTER_OTLP_ENDPOINT=collector.url),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        async with open_invoker(fixture_settings(tmp_path, server.url)) as inv:
            for _ in range(200):  # until the samples answer
                try:
                    await inv.invoke("normalize_text", REQUEST)
                    break
                except ExtensionError:
                    await asyncio.sleep(0.1)
    finally:
        proc.send_signal(signal.SIGINT)
        assert 0 == await asyncio.wait_for(proc.wait(), 30)  # exits after exporting
    [call] = [
        s
        for s in named(spans, "extreg.invoke normalize_text")
        if s.status.status_code == StatusCode.UNSET
    ]
    assert call.context is not None
    ids = trace.format_trace_id(call.context.trace_id), trace.format_span_id(call.context.span_id)
    assert ("extreg-samples", "normalize_text process", *ids) in collector.spans


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://u:pw@127.0.0.1:4318"}, "holds credentials"),
        (
            {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "https://c.example/v1/traces?key=pw"},
            "holds credentials",
        ),
        ({"OTEL_EXPORTER_OTLP_ENDPOINT": "127.0.0.1:4318"}, "must be an http:// or https:// URL"),
        (
            {
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318",
                "OTEL_EXPORTER_OTLP_HEADERS": "x-team=a,Authorization: Bearer pw",
            },
            "OTEL_EXPORTER_OTLP_HEADERS: item 2 is not name=value",
        ),
    ],
)
def test_export_settings_that_would_log_a_secret_are_refused(
    variables: dict[str, str], problem: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An endpoint with a user, password or query (the exporter logs its URL on every failed
    export) and a headers item without '=' (the SDK logs it whole): a `ConfigError` that
    names the problem and not the secret, and no SDK set up."""
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=re.escape(problem)) as raised:
        tracing.export_from_env()
    assert "pw" not in str(raised.value)
    assert not tracing.provider_set()


def test_the_service_is_named_by_the_resource_variables_first(
    monkeypatch: pytest.MonkeyPatch, no_sdk: None
) -> None:
    """`service.name` from `OTEL_RESOURCE_ATTRIBUTES` is kept; without one, `extreg`."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:9")
    for attributes, expected in (("service.name=router-a", "router-a"), ("team=x", "extreg")):
        monkeypatch.setenv("OTEL_RESOURCE_ATTRIBUTES", attributes)
        stop = tracing.export_from_env()
        assert stop is not None
        try:
            provider = trace.get_tracer_provider()
            assert expected == provider.resource.attributes["service.name"]  # type: ignore[attr-defined]
        finally:
            use_provider(None)
            stop()


def test_invoke_is_a_coroutine_function() -> None:
    """Embedders mock it (`create_autospec` makes an `AsyncMock` of it) and frameworks pick
    `await` by `inspect.iscoroutinefunction`: it stays `async def`, traced or not."""
    assert inspect.iscoroutinefunction(Invoker.invoke)


def test_another_protocol_is_refused_by_name(monkeypatch: pytest.MonkeyPatch) -> None:
    """extreg exports over HTTP/protobuf: gRPC asked for is a `ConfigError` naming the
    variable, before anything starts."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")
    with pytest.raises(ConfigError, match="OTEL_EXPORTER_OTLP_PROTOCOL='grpc'"):
        tracing.export_from_env()


def test_an_endpoint_without_the_otlp_extra_says_what_to_install(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The exporter not installed (extreg's runtime needs the API only): a `ConfigError`
    naming the extra to install."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", "http://127.0.0.1:4318")
    exporter = "opentelemetry.exporter.otlp.proto.http.trace_exporter"
    monkeypatch.setitem(sys.modules, exporter, None)  # an import of it now fails
    with pytest.raises(ConfigError, match=r"pip install 'extreg\[otlp\]'"):
        tracing.export_from_env()


def test_no_endpoint_no_export(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without an endpoint variable, serve sets up no SDK."""
    for variable in tracing.ENDPOINT_VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    assert tracing.export_from_env() is None


async def test_the_admin_api_continues_a_callers_trace(
    tmp_path: Path,
    db_url: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    spans: InMemorySpanExporter,
) -> None:
    """An HTTP invoke or policy run that carries a `traceparent` makes its spans children of
    the caller's span; the invoke answers the trace's id as its `trace_id`."""
    live, tokens = await samples_server(tmp_path, db_url, nats_url)
    caller = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    headers = {
        "Authorization": f"Bearer {tokens['operator']}",
        "traceparent": f"00-{caller[0]}-{caller[1]}-01",
    }
    with live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            called = await client.post(
                "/admin/extensions/normalize_text/invoke",
                json={"payload": {"payload": "Hi"}},
                headers=headers,
            )
            assert 200 == called.status_code, called.text
            assert caller[0] == called.json()["trace_id"]
            admin = {"Authorization": f"Bearer {tokens['admin']}"}
            created = await client.post("/admin/policies", json=SUPPORT_EN, headers=admin)
            assert 201 == created.status_code, created.text
            ran = await client.post(
                "/admin/policies/support_en/run",
                json={"message": {"payload": "Hello   World"}},
                headers=headers,
            )
            assert 200 == ran.status_code, ran.text
    [call] = named(spans, "extreg.invoke normalize_text")[:1]
    [run] = named(spans, "extreg.policy support_en")
    for span in (call, run):
        assert span.parent is not None
        ids = trace.format_trace_id(span.parent.trace_id), trace.format_span_id(span.parent.span_id)
        assert caller == ids, span.name
