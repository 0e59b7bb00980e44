"""Per-call logs: one warning line per failed call, and at debug level one line per call, each
with what an operator needs to find the call (extension, version, subject, outcome, latency,
attempts, trace and tenant ids). Real NATS and sample extensions; lines captured by structlog."""

from __future__ import annotations

from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
import structlog
from invoke_helpers import fixture_settings, open_invoker

from extreg import InvalidResponse, logs
from extreg.local.samples import Flaky, SampleRunner

REQUEST = {"payload": {"payload": "hi"}, "metadata": {}}
CONTEXT = {"trace_id": "t-42", "tenant_id": "acme"}
FIELDS = {
    "extension_id": "flaky",
    "extension_type": "pre",
    "version": "v1",
    "subject": "beamline.ext.pre.flaky.v1",
    "trace_id": "t-42",
    "tenant_id": "acme",
}


def calls_logged(lines: list[MutableMapping[str, Any]]) -> list[MutableMapping[str, Any]]:
    return [line for line in lines if line["event"] in ("invoke_ok", "invoke_failed")]


async def test_a_failed_call_logs_one_warning_with_its_fields(
    tmp_path: Path,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Debug off (the default): a success logs nothing, a failure one warning naming the
    extension, version, subject, outcome, latency, attempts, ids and the reason."""
    monkeypatch.setattr(logs, "debug_enabled", False)
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        with structlog.testing.capture_logs() as lines:
            await inv.invoke("flaky", REQUEST, CONTEXT)
            flaky_extension.control({"failure_rate": 1.0, "failure_mode": "invalid"})
            with pytest.raises(InvalidResponse):
                await inv.invoke("flaky", REQUEST, CONTEXT)
            flaky_extension.control({"reset": True})
    [line] = calls_logged(lines)
    assert {**FIELDS, "event": "invoke_failed", "log_level": "warning"}.items() <= line.items()
    assert ("error", 1) == (line["outcome"], line["attempts"])
    assert "not a JSON object" in str(line["reason"])
    assert isinstance(line["latency_ms"], float) and line["latency_ms"] >= 0


async def test_at_debug_every_call_logs_a_line(
    tmp_path: Path,
    nats_url: str,
    sample_extensions: SampleRunner,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With `-v -v` (debug), a successful call logs `invoke_ok` with the same fields."""
    monkeypatch.setattr(logs, "debug_enabled", True)
    async with open_invoker(fixture_settings(tmp_path, nats_url)) as inv:
        with structlog.testing.capture_logs() as lines:
            await inv.invoke("flaky", REQUEST, CONTEXT)
    [line] = calls_logged(lines)
    assert {**FIELDS, "event": "invoke_ok", "outcome": "ok", "attempts": 1}.items() <= line.items()
