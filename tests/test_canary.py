"""The original's canary recipe against real PostgreSQL, through the real registry, invoker and
routing: versions are tried newest first (created_at descending), so a `{}` default created
first and a tenant-list version created later send the listed tenants to the newer version."""

from __future__ import annotations

from pathlib import Path

from api_helpers import seed
from helpers import make_settings, record
from invoke_helpers import constant, listen, open_invoker, subject
from nats.aio.client import Client


async def test_canary_recipe_newest_version_first(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A `{}` default version written in one transaction and a tenant-list canary written in a
    later one (so its created_at is later): the canary's tenants reach the canary, everyone else
    the default, and the extension's own row gets nothing (the default matches all)."""
    row, default_on, canary_on = subject(), subject(), subject()
    settings = make_settings(tmp_path, source="database", database_url=db_url, nats_url=nats_url)
    default = {"version": "v2", "subject": default_on, "timeout_ms": 500, "routing_rules": {}}
    canary = {
        "version": "v3",
        "subject": canary_on,
        "timeout_ms": 500,
        "routing_rules": {"tenant_id": ["beta-1", "beta-2"]},
    }
    await seed(db_url, settings, record("canaried", subject=row, versions=[default]))
    # The canary is listed first on purpose: the order of the record is not what decides.
    await seed(db_url, settings, record("canaried", subject=row, versions=[canary, default]))
    async with listen(nats_client, row, constant(b'{"from": "row"}')), \
            listen(nats_client, default_on, constant(b'{"from": "default"}')), \
            listen(nats_client, canary_on, constant(b'{"from": "canary"}')), \
            open_invoker(settings) as inv:  # fmt: skip
        got = {
            tenant: (await inv.invoke("canaried", {"payload": 1}, {"tenant_id": tenant}))["from"]
            for tenant in ("beta-1", "beta-2", "acme", None)
        }
    assert {"beta-1": "canary", "beta-2": "canary", "acme": "default", None: "default"} == got
