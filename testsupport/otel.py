"""Switch the process's OpenTelemetry tracer provider, for tests and benchmarks.

Why: the API lets a process set its provider once, but a test wants an SDK of its own and the
next test none, and a benchmark alternates rounds with and without one. OpenTelemetry's own
tests reset the same two globals (`reset_trace_globals` in its test utilities, which are not
published in current releases). extreg's module tracer is made again too: a proxy tracer keeps
the first real tracer it found.
"""

from __future__ import annotations

from opentelemetry import trace
from opentelemetry.trace import TracerProvider
from opentelemetry.util._once import Once

from extreg import tracing


def use_provider(provider: TracerProvider | None) -> None:
    """Make `provider` the process's tracer provider; None: none, as without an SDK."""
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None
    if provider is not None:
        trace.set_tracer_provider(provider)
    tracing.TRACER = trace.get_tracer("extreg")
