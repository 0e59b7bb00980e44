"""Automatic management with a real PostgreSQL and NATS: auto-disable when a circuit opens,
auto-enable when it closes (audited as extreg:auto), and health-based routing."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import psycopg
import pytest
from helpers import make_settings
from invoke_helpers import (
    SAMPLE_RECORDS,
    FakeClock,
    fixture_settings,
    open_invoker,
    record_calls,
    wait_for,
)

from extreg import CircuitOpen, ExtensionDisabled, InvalidResponse, Settings
from extreg.adapters.postgres import PostgresSource
from extreg.core.health import HealthMonitor
from extreg.core.model import parse_extension
from extreg.invoke import AUTO_ACTOR, HealthGate, HealthRefused
from extreg.local.samples import Flaky, SampleRunner

REQUEST = {"payload": {"payload": "hi"}, "metadata": {}}


def audit(url: str, ext_id: str) -> list[tuple[str, str]]:
    with psycopg.connect(url, autocommit=True) as conn:
        rows = conn.execute("SELECT action, changed_by FROM extension_audit_log"
                            " WHERE extension_id = %s AND action IN ('enable', 'disable')"
                            " ORDER BY changed_at, id", (ext_id,)).fetchall()  # fmt: skip
    return [(r[0], r[1]) for r in rows]


def auto_settings(tmp_path: Path, url: str, nats_url: str, **values: Any) -> Settings:
    return make_settings(
        tmp_path, source="database", database_url=url, nats_url=nats_url,
        circuit_breaker_enabled=True, circuit_breaker_failure_threshold=3,
        circuit_breaker_timeout_seconds=30, auto_disable_on_circuit_open=True,
        auto_enable_on_circuit_close=True, health_flush_interval_seconds=3600, **values,
    )  # fmt: skip


async def seed(settings: Settings) -> PostgresSource:
    records = [parse_extension(r, max_timeout_ms=60_000, max_retries=10) for r in SAMPLE_RECORDS]
    db = PostgresSource(settings)
    await db.open()
    await db.import_extensions(records, "test")
    return db


async def test_auto_disable_and_enable(
    tmp_path: Path,
    db_url: str,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """Three failures open flaky's circuit and extreg:auto disables it (audited); while open,
    calls get ExtensionDisabled without reaching the extension; after the circuit timeout one
    call goes through as the half-open trial, succeeds, closes the circuit, and extreg:auto
    enables the extension again (audited). The timeout passes by the test's clock."""
    settings = auto_settings(tmp_path, db_url, nats_url)
    clock = FakeClock()
    db = await seed(settings)
    try:
        async with open_invoker(settings, clock=clock) as inv:
            flaky_extension.control({"failure_rate": 1.0, "failure_mode": "invalid"})
            for _ in range(3):
                with pytest.raises(InvalidResponse):
                    await inv.invoke("flaky", REQUEST)
            assert "open" == inv.breaker.state("flaky")
            await wait_for(lambda: not inv.registry.get("flaky").enabled)  # type: ignore[union-attr]
            flaky_extension.control({"reset": True})
            calls_before = sample_extensions.calls["flaky"]
            with pytest.raises(ExtensionDisabled):
                await inv.invoke("flaky", REQUEST)
            assert calls_before == sample_extensions.calls["flaky"]
            clock.advance(30)
            assert {"payload": {"payload": "hi"}} == await inv.invoke("flaky", REQUEST)
            assert "closed" == inv.breaker.state("flaky")
            await wait_for(lambda: inv.registry.get("flaky").enabled)  # type: ignore[union-attr]
            assert {"payload": {"payload": "hi"}} == await inv.invoke("flaky", REQUEST)
    finally:
        await db.close()
    assert [("disable", AUTO_ACTOR), ("enable", AUTO_ACTOR)] == audit(db_url, "flaky")


async def test_operator_reset_enables_and_operator_disable_is_kept(
    tmp_path: Path,
    db_url: str,
    nats_url: str,
    sample_extensions: SampleRunner,
) -> None:
    """An operator opening a circuit disables the extension and resetting it enables it again;
    an extension an operator disabled stays disabled when its circuit closes."""
    settings = auto_settings(tmp_path, db_url, nats_url)
    db = await seed(settings)
    try:
        async with open_invoker(settings) as inv:
            inv.breaker.force_open("echo")
            await wait_for(lambda: not inv.registry.get("echo").enabled)  # type: ignore[union-attr]
            inv.breaker.reset("echo")
            await wait_for(lambda: inv.registry.get("echo").enabled)  # type: ignore[union-attr]

            await db.set_enabled("mask_pii", False, "cli:operator")
            inv.breaker.force_open("mask_pii")
            inv.breaker.reset("mask_pii")
            assert inv.auto is not None
            await inv.auto.wait_idle()  # the conditional enable has run (and changed nothing)
            assert [False] == [e.enabled for e in await db.load_extensions(["mask_pii"])]
            assert False is inv.registry.get("mask_pii").enabled  # type: ignore[union-attr]
    finally:
        await db.close()
    assert [("disable", AUTO_ACTOR), ("enable", AUTO_ACTOR)] == audit(db_url, "echo")
    assert [("disable", "cli:operator")] == audit(db_url, "mask_pii")


async def test_auto_disable_without_database_leaves_calls_to_the_breaker(
    tmp_path: Path,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """On fixtures (no database) an opening circuit cannot disable anything: the call path is
    unaffected and the circuit alone refuses calls."""
    settings = fixture_settings(
        tmp_path,
        nats_url,
        circuit_breaker_enabled=True,
        circuit_breaker_failure_threshold=1,
        auto_disable_on_circuit_open=True,
    )
    async with open_invoker(settings) as inv:
        flaky_extension.control({"failure_rate": 1.0, "failure_mode": "invalid"})
        with pytest.raises(InvalidResponse):
            await inv.invoke("flaky", REQUEST)
        assert inv.auto is not None
        await inv.auto.wait_idle()
        with pytest.raises(CircuitOpen):
            await inv.invoke("flaky", REQUEST)
        assert True is inv.registry.get("flaky").enabled  # type: ignore[union-attr]


# -- health-based routing --------------------------------------------------------------------


def test_gate_refuses_low_success_rate_after_min_calls() -> None:
    """Over the recent window, an extension with at least min_calls calls and a success rate
    under the minimum is refused; fewer calls, or a good rate, are not; old calls age out."""
    clock = FakeClock(wall=1_780_000_000.0)
    monitor = HealthMonitor(clock=clock.time, window_s=60)
    gate = HealthGate(monitor, min_success_rate=0.8, min_calls=10)
    record_calls(monitor, "bad", 2, 8)
    record_calls(monitor, "few", 0, 9)
    record_calls(monitor, "good", 9, 1)
    gate.observe()
    assert ["bad"] == sorted(gate.refused)
    with pytest.raises(HealthRefused) as caught:
        gate.check("bad")
    assert isinstance(caught.value, CircuitOpen)
    assert "success rate 0.20 over the last 10 calls (60 s)" in caught.value.reason
    clock.advance(30)
    record_calls(monitor, "few", 0, 1)  # few: 10 calls in the window now
    gate.observe()
    assert ["bad", "few"] == sorted(gate.refused)
    clock.advance(40)  # t0+70: t0's interval is out of the window; few keeps 1
    gate.observe()
    assert [] == sorted(gate.refused)


async def test_health_based_routing_refuses_and_recovers(
    tmp_path: Path,
    nats_url: str,
    sample_extensions: SampleRunner,
    flaky_extension: Flaky,
) -> None:
    """With health-based routing on, an extension failing 5 of 5 calls is refused with
    HealthRefused (nothing sent) after the next flush; once the bad calls leave the recent
    window (`health_window_seconds`, on the invoker's clock) it is called again. The flushes
    are the test's, not the timer's."""
    settings = fixture_settings(
        tmp_path,
        nats_url,
        health_based_routing_enabled=True,
        circuit_breaker_min_calls=5,
        health_window_seconds=60,
        health_flush_interval_seconds=3600,
    )
    clock = FakeClock()
    async with open_invoker(settings, clock=clock) as inv:
        flaky_extension.control({"failure_rate": 1.0, "failure_mode": "invalid"})
        for _ in range(5):
            with pytest.raises(InvalidResponse):
                await inv.invoke("flaky", REQUEST)
        flaky_extension.control({"reset": True})
        await inv.flush_health()
        sent = sample_extensions.calls["flaky"]
        with pytest.raises(HealthRefused):
            await inv.invoke("flaky", REQUEST)
        clock.advance(50)
        await inv.flush_health()  # the bad calls are still in the window
        with pytest.raises(HealthRefused):
            await inv.invoke("flaky", REQUEST)
        assert sent == sample_extensions.calls["flaky"]
        clock.advance(20)
        await inv.flush_health()  # now they are out
        assert {"payload": {"payload": "hi"}} == await inv.invoke("flaky", REQUEST)
    assert sent + 1 == sample_extensions.calls["flaky"]
