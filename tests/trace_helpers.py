"""An OpenTelemetry SDK with an in-memory exporter for one test (`spans` fixture).

The API lets a process set its tracer provider once; OpenTelemetry's own tests undo that
between tests (`opentelemetry.test.globals_test.reset_trace_globals`, in a package not on
PyPI's current releases), and so does `reset_tracing` here, the same two globals. extreg's
module tracer is made again too: a proxy tracer keeps the first real tracer it found.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.util._once import Once

from extreg import tracing

__all__ = ["no_sdk", "spans"]


def reset_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """No tracer provider set, as in a process without an SDK."""
    monkeypatch.setattr(trace, "_TRACER_PROVIDER_SET_ONCE", Once())
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    monkeypatch.setattr(tracing, "TRACER", trace.get_tracer("extreg"))


@pytest.fixture
def no_sdk(monkeypatch: pytest.MonkeyPatch) -> None:
    """This test runs without an SDK, whatever an earlier test set."""
    reset_tracing(monkeypatch)


@pytest.fixture
def spans(monkeypatch: pytest.MonkeyPatch) -> Iterator[InMemorySpanExporter]:
    """An SDK for this test only, exporting every ended span to the exporter yielded."""
    reset_tracing(monkeypatch)
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    yield exporter
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]
