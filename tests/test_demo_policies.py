"""The demo runs the bundled `support_en` policy: its traffic shows policy runs that pass and
runs that pii_guard blocks, and `register_samples` stores the policy in a database that lacks
it (and leaves one that is there alone)."""

from __future__ import annotations

import asyncio
import json
import shutil
from pathlib import Path

import msgspec
from helpers import make_settings
from invoke_helpers import SAMPLE_RECORDS, open_invoker, wait_for

from extreg.adapters.postgres import PostgresSource
from extreg.local.demo import POLICY_ID, demo_services, register_samples, traffic
from extreg.metrics import Metrics
from extreg.settings import BUNDLED_FIXTURES

DEADLINE_S = 60.0  # generous: two runs a second, one in eight blocked


def runs(metrics: Metrics, outcome: str) -> float:
    value = metrics.registry.get_sample_value(
        "extreg_policy_runs_total", {"policy_id": POLICY_ID, "outcome": outcome}
    )
    return value or 0.0


async def test_demo_traffic_runs_the_bundled_policy_passing_and_blocked(tmp_path: Path) -> None:
    """With the demo's services and traffic running, `extreg_policy_runs_total` counts
    `support_en` runs that end `ok` and runs that pii_guard `blocked` (the card number), and
    the blocking step is counted as pii_guard `rejected`."""
    folder = tmp_path / "fixtures"
    (folder / "policies").mkdir(parents=True)
    (folder / "records.json").write_text(json.dumps(SAMPLE_RECORDS), "utf-8")
    shutil.copy(BUNDLED_FIXTURES / "policies" / f"{POLICY_ID}.json", folder / "policies")
    settings = make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    async with demo_services(settings) as services, open_invoker(services.settings) as inv:
        metrics = Metrics()
        metrics.watch_invoker(inv)
        stop = asyncio.Event()
        task = asyncio.create_task(traffic(inv, services.samples, stop))
        try:
            await wait_for(
                lambda: runs(metrics, "ok") >= 1 and runs(metrics, "blocked") >= 1, DEADLINE_S
            )
        finally:
            stop.set()
            await task
    rejected = metrics.registry.get_sample_value(
        "router_extension_execution_total",
        {
            "extension_id": "pii_guard",
            "extension_type": "validator",
            "status": "rejected",
            "policy_id": POLICY_ID,
        },
    )
    assert rejected is not None and rejected >= 1


async def test_register_samples_stores_the_bundled_policy_once(tmp_path: Path, db_url: str) -> None:
    """A database without `support_en` gets the bundled one; a `support_en` already there
    (here disabled by its owner) is not overwritten by the next demo start."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    await register_samples(settings)
    async with PostgresSource(settings) as db:
        policy = await db.load_policy(POLICY_ID)
        assert policy is not None
        assert [i.id for i in policy.pre] == ["normalize_text"]
        assert [i.id for i in policy.validators] == ["pii_guard"]
        assert list(policy.providers) == ["test_provider"]
        await db.import_policies([msgspec.structs.replace(policy, enabled=False)], "test")
    await register_samples(settings)
    async with PostgresSource(settings) as db:
        again = await db.load_policy(POLICY_ID)
    assert again is not None and again.enabled is False
