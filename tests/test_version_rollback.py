"""Per-version circuits and the automatic rollback (issue 14, item 2), on a real PostgreSQL and
NATS: a canary version that fails opens its own circuit, not the extension's; with
`auto_disable_on_circuit_open` it is disabled alone, audited as `extreg:auto`, and its calls
go back to the extension's own row, while the old version keeps answering throughout."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from api_helpers import seed, sql
from helpers import make_settings
from invoke_helpers import FakeClock, constant, listen, open_invoker, subject, wait_for
from nats.aio.client import Client

from extreg import CircuitOpen, InvalidResponse, Settings


def row(on: str, **values: Any) -> dict[str, Any]:
    """Extension x, its own row (version v1) on subject `on`."""
    return {"id": "x", "type": "pre", "subject": on, "version": "v1", "timeout_ms": 1000,
            **values}  # fmt: skip


def with_beta_version(record: dict[str, Any], on: str) -> dict[str, Any]:
    """`record` with version v2 on subject `on`, taking tenant beta's calls."""
    v2 = {"version": "v2", "subject": on, "timeout_ms": 1000,
          "routing_rules": {"tenant_id": ["beta"]}}  # fmt: skip
    return {**record, "versions": [v2]}


def breaker_settings(tmp_path: Path, db_url: str, nats_url: str, **values: Any) -> Settings:
    return make_settings(
        tmp_path, source="database", database_url=db_url, nats_url=nats_url,
        circuit_breaker_enabled=True, **values,
    )  # fmt: skip


async def test_a_failing_canary_is_rolled_back_while_the_row_keeps_answering(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    stable, canary = subject(), subject()
    settings = breaker_settings(
        tmp_path, db_url, nats_url,
        circuit_breaker_failure_threshold=3, auto_disable_on_circuit_open=True,
    )  # fmt: skip
    await seed(db_url, settings, with_beta_version(row(stable), canary))
    beta, others = {"tenant_id": "beta"}, {"tenant_id": "acme"}
    async with (
        listen(nats_client, stable, constant(b"{}")) as old,
        listen(nats_client, canary, constant(b"[]")) as new,
        open_invoker(settings) as inv,
    ):
        for _ in range(3):
            with pytest.raises(InvalidResponse):
                await inv.invoke("x", {"payload": 1}, beta)
            assert {} == await inv.invoke("x", {"payload": 1}, others)  # the row answers
        assert "open" == inv.breaker.state("x@v2")
        assert "closed" == inv.breaker.state("x")
        versions = inv.health.get_health("x")["versions"]
        assert (0, 3, "open") == (
            versions["v2"]["success_count"],
            versions["v2"]["failure_count"],
            versions["v2"]["circuit_breaker_state"],
        )
        assert (3, 0, "closed") == (
            versions["v1"]["success_count"],
            versions["v1"]["failure_count"],
            versions["v1"]["circuit_breaker_state"],
        )
        await inv.flush_health()  # the totals read back from the database; versions stay
        assert versions == inv.health.get_health("x")["versions"]
        for _ in range(500):  # refused until the rollback reaches this node's cache
            try:
                assert {} == await inv.invoke("x", {"payload": 1}, beta)
                break
            except CircuitOpen:
                await asyncio.sleep(0.01)
        else:
            raise AssertionError("beta's calls never went back to the row")
        assert 3 == new.count  # nothing more reached the canary once its circuit opened
        assert {} == await inv.invoke("x", {"payload": 1}, others)
        ext = inv.registry.lookup("x")
        assert (True, [False]) == (ext.enabled, [v.enabled for v in ext.versions])
        await wait_for(lambda: bool(audit(db_url)), timeout=10)
        assert [("update", "extreg:auto")] == audit(db_url)
        assert old.count >= 5


def audit(db_url: str) -> list[tuple[str, str]]:
    rows = sql(
        db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'x' AND changed_by = 'extreg:auto' ORDER BY changed_at",
    )
    return [(r[0], r[1]) for r in rows]


async def test_a_version_added_later_gets_the_extensions_overrides_and_obeys_a_forced_open(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A version added to a record whose metadata sets `circuit_breaker_failure_threshold`
    2 opens after 2 failures (not the default 5); an operator's forced open of the extension
    refuses its version's calls too, as the extension's own; removed again, the version
    leaves neither numbers nor a circuit behind."""
    stable, canary = subject(), subject()
    record = row(stable, metadata={"circuit_breaker_failure_threshold": 2})
    settings = breaker_settings(tmp_path, db_url, nats_url)
    await seed(db_url, settings, record)
    beta = {"tenant_id": "beta"}
    async with (
        listen(nats_client, stable, constant(b"{}")),
        listen(nats_client, canary, constant(b"[]")),
        open_invoker(settings) as inv,
    ):
        await seed(db_url, settings, with_beta_version(record, canary))
        await wait_for(lambda: bool(inv.registry.lookup("x").versions), timeout=30)
        for _ in range(2):
            with pytest.raises(InvalidResponse):
                await inv.invoke("x", {"payload": 1}, beta)
        assert "open" == inv.breaker.state("x@v2")
        inv.breaker.reset("x")  # the extension's and its versions'
        inv.breaker.force_open("x")
        with pytest.raises(CircuitOpen) as refused:
            await inv.invoke("x", {"payload": 1}, beta)
        assert "x" == refused.value.extension_id
        assert "operator" in refused.value.reason
        assert "v2" in inv.health.get_health("x")["versions"]
        await seed(db_url, settings, record)  # the version removed again
        await wait_for(lambda: not inv.registry.lookup("x").versions, timeout=30)
        assert "v2" not in inv.health.get_health("x").get("versions", {})
        assert "x@v2" not in inv.breaker.states()


async def test_a_recovery_trial_goes_to_the_row_whatever_the_versions_rules(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """The row fails until the extension is auto-disabled; after the circuit's timeout the
    one trial call goes to the row, on the extension's circuit, even from a tenant that a
    version's rules would take (that version answering well proves nothing of the row)."""
    own, version = subject(), subject()
    settings = breaker_settings(
        tmp_path, db_url, nats_url,
        circuit_breaker_failure_threshold=3, circuit_breaker_timeout_seconds=30,
        auto_disable_on_circuit_open=True, auto_enable_on_circuit_close=True,
        health_flush_interval_seconds=3600,
    )  # fmt: skip
    await seed(db_url, settings, with_beta_version(row(own), version))
    clock = FakeClock()
    async with (
        listen(nats_client, own, constant(b"[]")) as failing,
        listen(nats_client, version, constant(b"{}")) as fine,
        open_invoker(settings, clock=clock) as inv,
    ):
        for _ in range(3):
            with pytest.raises(InvalidResponse):
                await inv.invoke("x", {"payload": 1})
        await wait_for(lambda: not inv.registry.get("x").enabled, timeout=30)  # type: ignore[union-attr]
        clock.advance(30)
        with pytest.raises(InvalidResponse):  # the trial went to the failing row
            await inv.invoke("x", {"payload": 1}, {"tenant_id": "beta"})
        assert (4, 0) == (failing.count, fine.count)
        assert "open" == inv.breaker.state("x")
