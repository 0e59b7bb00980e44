"""Tracing fixtures: an OpenTelemetry SDK with an in-memory exporter for one test (`spans`), or
none at all (`no_sdk`), whatever an earlier test set (see `testsupport.otel`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from testsupport.otel import use_provider

__all__ = ["no_sdk", "spans"]


@pytest.fixture
def no_sdk() -> None:
    """This test runs without an SDK."""
    use_provider(None)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """An SDK for this test only, exporting every ended span to the exporter yielded."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    use_provider(provider)
    yield exporter
    use_provider(None)
    provider.shutdown()


def named(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]
