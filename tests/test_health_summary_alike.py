"""One health arithmetic (`extreg.core.health.summarize`): the CLI's report from database rows
and the API's report from a live monitor give identical numbers for the same counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
from helpers import make_settings

from extreg.adapters.postgres import PostgresSource
from extreg.adapters.postgres_health import HealthBatch
from extreg.core.health import HealthMonitor
from extreg.core.model import Extension
from extreg.health_view import health_report

EXTREG = Path(sys.executable).parent / "extreg"
# (id, enabled, [(ok, latency_ms)]): counts whose rounded per-extension figures average to
# other numbers than the figures themselves do (0.6666 against 0.6667, 0.01 against 0.0).
CALLS: list[tuple[str, bool, list[tuple[bool, float]]]] = [
    ("steady", True, [(True, 0.006)]),
    ("flaky", True, [(True, 0.0), (False, 0.0), (False, 0.0)]),
    ("idle", True, []),
    ("parked", False, []),
]
COUNTS = ("success_count", "failure_count", "success_rate", "avg_latency_ms", "status", "recent")


def cli_health(tmp_path: Path, db_url: str) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTENSION_REGISTRY_")}
    env["EXTENSION_REGISTRY_DATA_DIR"] = str(tmp_path / "data")
    done = subprocess.run(
        [str(EXTREG), "--database-url", db_url, "health", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert 0 == done.returncode, done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return report


async def test_cli_from_rows_and_api_from_monitor_give_identical_numbers(
    db_url: str, tmp_path: Path
) -> None:
    """The same calls, counted by a monitor (the API's source) and written to the database as
    a node's health batch (the CLI's source), give the same summary dict and the same counts,
    rates, mean latencies, statuses and recent numbers per extension."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        for ext_id, enabled, _ in CALLS:
            conn.execute(
                "INSERT INTO extensions (id, type, subject, enabled) VALUES (%s, 'pre', %s, %s)",
                (ext_id, f"s.{ext_id}", enabled),
            )
    monitor = HealthMonitor()  # no breaker: every circuit `disabled`, as with breakers off
    for ext_id, _, calls in CALLS:
        for ok, latency_ms in calls:
            monitor.record(ext_id, ok, latency_ms)
    batch = HealthBatch("node-a", 1)
    batch.absorb(monitor.drain_deltas(), {})
    async with PostgresSource(make_settings(tmp_path, database_url=db_url)) as db:
        assert await db.update_health(batch)
    extensions = [Extension(id=i, type="pre", subject=f"s.{i}", enabled=e) for i, e, _ in CALLS]

    api = health_report(sorted(extensions, key=lambda e: e.id), monitor, breaker_enabled=False)
    cli = cli_health(tmp_path, db_url)

    assert api["summary"] == cli["summary"]
    assert {
        "total": 4,
        "enabled": 3,
        "healthy": 1,
        "degraded": 0,
        "unhealthy": 1,
        "unknown": 1,  # idle; parked is disabled, so it is counted in total only
        "avg_success_rate": 0.6667,
        "avg_latency_ms": 0.0,
    } == cli["summary"]
    per_extension = [
        {"id": item["id"], **{k: item["health"][k] for k in (*COUNTS, "circuit_breaker_state")}}
        for item in api["extensions"]
    ]
    assert per_extension == [
        {"id": item["id"], **{k: item["health"][k] for k in (*COUNTS, "circuit_breaker_state")}}
        for item in cli["extensions"]
    ]
