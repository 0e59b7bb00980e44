"""With `circuit_breaker_enabled` false (the default) every reading of a circuit says
`disabled`, never `closed`: the invoker's breaker, health answers, the API, the CLI and the
Prometheus gauge (-1); forcing a circuit answers 409 saying how to turn breakers on. Real
PostgreSQL, NATS and sample extensions; the dashboard's side is in test_dashboard.py."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from api_helpers import make_tokens, seed, sql
from helpers import make_settings, record
from prometheus_client.parser import text_string_to_metric_families

from extreg.adapters.postgres import PostgresSource
from extreg.api import create_app
from extreg.health_view import database_report
from extreg.invoke import Invoker
from extreg.local.samples import SAMPLE_EXTENSIONS, SampleRunner
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings

EXTREG = Path(sys.executable).parent / "extreg"
ENABLE_HINT = "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED=true"


@contextlib.asynccontextmanager
async def api_client(
    settings: Settings, *, with_invoker: bool
) -> AsyncIterator[tuple[httpx.AsyncClient, Any]]:
    """The API on a real registry (and, if asked, a real NATS invoker): client and invoker."""
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(Registry.open(settings))
        invoker = (
            await stack.enter_async_context(Invoker.open(registry, settings))
            if with_invoker
            else None
        )
        runtime = await stack.enter_async_context(
            Runtime.open(settings, registry, invoker, metrics=Metrics())
        )
        transport = httpx.ASGITransport(app=create_app(runtime))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://extreg.test")
        )
        yield client, invoker


async def bearers(db_url: str) -> dict[str, dict[str, str]]:
    """Authorization headers by role, for tokens stored in the database."""
    return {
        role: {"Authorization": f"Bearer {token}"}
        for role, token in (await make_tokens(db_url)).items()
    }


def circuit_gauge(text: str) -> dict[str, float]:
    """extension_circuit_breaker_state by extension id, from a /metrics body."""
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        s.labels["extension_id"]: s.value
        for s in families["extension_circuit_breaker_state"].samples
    }


async def test_breaker_off_reads_disabled_through_invoker_api_and_metrics(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """A real invoker with the default settings: its breaker admits calls as `disabled`, health
    (Python, API, one and all) and /metrics say `disabled` (-1) after a real call, every
    extension counts as healthy, and forcing a circuit answers 409 naming how to enable it."""
    settings = make_settings(tmp_path, source="database", database_url=db_url, nats_url=nats_url)
    await seed(db_url, settings, *(s.record() for s in SAMPLE_EXTENSIONS))
    auth = await bearers(db_url)
    async with api_client(settings, with_invoker=True) as (client, inv):
        await inv.invoke("normalize_text", {"payload": {"payload": "Hi"}, "metadata": {}}, {})
        python = (
            inv.breaker.check_circuit("normalize_text"),
            inv.breaker.state("normalize_text"),
            inv.health.get_health("normalize_text")["circuit_breaker_state"],
        )
        report = (await client.get("/admin/extensions/health", headers=auth["viewer"])).json()
        one = (
            await client.get("/admin/extensions/normalize_text/health", headers=auth["viewer"])
        ).json()
        forced = [
            await client.post(
                "/admin/extensions/normalize_text/circuit",
                json={"action": action},
                headers=auth["operator"],
            )
            for action in ("open", "close", "reset")
        ]
        gauge = circuit_gauge((await client.get("/metrics")).text)
        still = inv.breaker.state("normalize_text")
    assert ("disabled", "disabled", "disabled") == python
    assert {"disabled"} == {e["health"]["circuit_breaker_state"] for e in report["extensions"]}
    summary = report["summary"]
    assert (1, summary["enabled"] - 1, 1) == (  # the one called; the others have no calls
        summary["healthy"],
        summary["unknown"],
        one["health"]["success_count"],
    )
    assert "disabled" == one["health"]["circuit_breaker_state"]
    assert [409] * 3 == [r.status_code for r in forced]
    assert {"Conflict"} == {r.json()["error"] for r in forced}
    assert all(
        "circuit breakers are disabled" in r.json()["detail"] and ENABLE_HINT in r.json()["detail"]
        for r in forced
    )
    assert {s.id: -1.0 for s in SAMPLE_EXTENSIONS} == gauge
    assert "disabled" == still


async def test_without_an_invoker_the_setting_decides(tmp_path: Path, db_url: str) -> None:
    """A server without an invoker answers `disabled` (gauge -1) when the breaker is off and
    `closed` (gauge 0) when it is on."""
    await seed(
        db_url, make_settings(tmp_path, source="database", database_url=db_url), record("alpha")
    )
    auth = await bearers(db_url)
    seen = []
    for enabled in (False, True):
        settings = make_settings(
            tmp_path, source="database", database_url=db_url, circuit_breaker_enabled=enabled
        )
        async with api_client(settings, with_invoker=False) as (client, _):
            report = (await client.get("/admin/extensions/health", headers=auth["viewer"])).json()
            gauge = circuit_gauge((await client.get("/metrics")).text)
        seen.append((report["extensions"][0]["health"]["circuit_breaker_state"], gauge["alpha"]))
    assert [("disabled", -1.0), ("closed", 0.0)] == seen


def test_cli_health_on_the_database_reads_disabled(tmp_path: Path, db_url: str) -> None:
    """`extreg health` without --url reads the rows but, with the breaker off in its settings,
    shows `disabled` whatever state a row holds; with the breaker on, the row's state."""
    sql(db_url, "INSERT INTO extensions (id, type, subject) VALUES ('alpha', 'pre', 'a.b')")
    sql(
        db_url,
        "INSERT INTO extension_health (extension_id, circuit_breaker_state)"
        " VALUES ('alpha', 'open')",
    )
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
    }
    env["EXTENSION_REGISTRY_DATA_DIR"] = str(tmp_path / "data")
    states = []
    for extra in ({}, {"EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED": "true"}):
        done = subprocess.run(
            [str(EXTREG), "--database-url", db_url, "health", "alpha", "--json"],
            capture_output=True,
            text=True,
            env={**env, **extra},
            timeout=60,
            check=False,
        )
        assert 0 == done.returncode, done.stderr
        states.append(json.loads(done.stdout)["health"]["circuit_breaker_state"])
    table = subprocess.run(
        [str(EXTREG), "--database-url", db_url, "health"],
        capture_output=True,
        text=True,
        env={**env, "COLUMNS": "400"},
        timeout=60,
        check=False,
    )
    assert ["disabled", "open"] == states
    assert (0, True) == (table.returncode, "disabled" in table.stdout)


async def test_database_report_follows_the_setting(db_url: str, tmp_path: Path) -> None:
    """Database rows say `closed` by default (the seed's column default) even when no breaker
    ever ran; with the breaker off the report from the database says `disabled` (status by
    recent calls alone: none, so `unknown`), with it on the row's `open` makes it unhealthy."""
    sql(db_url, "INSERT INTO extensions (id, type, subject) VALUES ('a', 'pre', 's.a')")
    sql(
        db_url,
        "INSERT INTO extension_health (extension_id, success_count, failure_count,"
        " circuit_breaker_state) VALUES ('a', 9, 1, 'open')",
    )
    reports = []
    for enabled in (False, True):
        settings = make_settings(tmp_path, database_url=db_url, circuit_breaker_enabled=enabled)
        async with PostgresSource(settings) as db:
            reports.append(await database_report(db, settings))
    off, on = reports
    assert ("disabled", "unknown", 1) == (
        off["extensions"][0]["health"]["circuit_breaker_state"],
        off["extensions"][0]["health"]["status"],
        off["summary"]["unknown"],
    )
    assert ("open", "unhealthy", 1) == (
        on["extensions"][0]["health"]["circuit_breaker_state"],
        on["extensions"][0]["health"]["status"],
        on["summary"]["unhealthy"],
    )
