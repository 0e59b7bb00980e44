"""Logging set-up, the one piece of global state extreg owns.

Structured events through structlog: JSON lines when stderr is not a terminal (production,
CI), readable colour output in a terminal; a line written inside an OpenTelemetry span carries
its `otel_trace_id` and `otel_span_id`. `configure` is called once by the CLI; tests use
`structlog.testing.capture_logs()`. Nothing logged here ever carries a secret: database
locations are logged only through `Settings.db_display`.
"""

from __future__ import annotations

import logging
import sys

import structlog

from . import tracing

debug_enabled = False
"""True once `configure` chose the debug level. The invocation path reads it before it builds
a per-call debug line: a plain flag costs nothing, and a process that never configured
logging (extreg used as a library) gets no line per call."""


PROCESSORS: list[structlog.typing.Processor] = [
    structlog.contextvars.merge_contextvars,
    structlog.processors.add_log_level,
    tracing.add_span_ids,
    structlog.processors.TimeStamper(fmt="iso", utc=True),
    structlog.processors.format_exc_info,
]
"""What every line goes through before it is rendered (tests capture lines through these)."""


def configure(level: str = "info", json: bool | None = None) -> None:
    """Route structlog (and the standard library's warnings) to stderr."""
    global debug_enabled
    debug_enabled = logging.getLevelName(level.upper()) <= logging.DEBUG
    use_json = (not sys.stderr.isatty()) if json is None else json
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[*PROCESSORS, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    # psycopg's pool logs every failed reconnection attempt; our own events say it once.
    logging.getLogger("psycopg.pool").setLevel(logging.ERROR)
