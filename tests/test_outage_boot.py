"""Issue 9, item 6: a server booting while its database is down serves the last-known-good
snapshot and accepts the tokens it knew (their digests are kept beside the snapshot file),
answers reads, and refuses writes with 503 and a reason."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
from api_helpers import seed
from helpers import make_settings, record

from extreg.adapters.migrate import migrate
from extreg.api import create_app
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings
from extreg.tokens import KnownTokens, TokenStore
from testsupport.pgprocess import PostgresProcess


async def _serve_once(settings: Settings) -> None:
    """Boot with the database up and stop: leaves the snapshot and known-tokens files."""
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()),
    ):
        pass


async def test_boot_without_database_accepts_known_tokens_reads_and_refuses_writes(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    url = own_pg.create_database("outage")
    migrate(url)
    settings = make_settings(tmp_path, source="database", database_url=url)
    await seed(url, settings, record("alpha"))
    store = TokenStore(url)
    admin, viewer = (
        await store.create("ada", "admin", "test"),
        await store.create("vic", "viewer", "test"),
    )
    gone = await store.create("rex", "admin", "test")
    await store.revoke("rex")
    await _serve_once(settings)
    known = KnownTokens.from_settings(settings)
    text = known.path.read_text()
    assert {"ada", "vic"} == set(json.loads(text)["tokens"])
    assert all(token not in text for token in (admin, viewer, gone))

    own_pg.stop()
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        assert "snapshot_file" == registry.status.source
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:

            def auth(token: str) -> dict[str, str]:
                return {"Authorization": f"Bearer {token}"}

            listed = await client.get("/admin/extensions", headers=auth(admin))
            as_viewer = await client.get("/admin/extensions/alpha", headers=auth(viewer))
            created = await client.post(
                "/admin/extensions", headers=auth(admin), json=record("beta")
            )
            disabled = await client.post("/admin/extensions/alpha/disable", headers=auth(admin))
            wrong = await client.get("/admin/extensions", headers=auth(admin + "x"))
            revoked = await client.get("/admin/extensions", headers=auth(gone))
            still = await client.get("/admin/extensions", headers=auth(admin))
    assert (200, ["alpha"]) == (listed.status_code, [e["id"] for e in listed.json()])
    assert 200 == as_viewer.status_code
    assert [503, 503] == [created.status_code, disabled.status_code], created.text
    for refused in (created, disabled):
        detail = refused.json()["detail"]
        assert "database" in detail and "read-only" in detail, detail
    assert [401, 401, 200] == [wrong.status_code, revoked.status_code, still.status_code]


def test_known_tokens_of_another_database_are_refused(tmp_path: Path) -> None:
    """Like the snapshot file, the known tokens serve only the database they came from."""
    path = tmp_path / "snapshot.tokens.json"
    KnownTokens(path, "h1:5432/one").write([])
    try:
        KnownTokens(path, "h2:5432/two").read()
    except Exception as exc:
        assert "ConfigError" == type(exc).__name__
        assert "not of h2:5432/two" in str(exc)
    else:
        raise AssertionError("tokens of another database were accepted")
    assert [] == KnownTokens(path, "h1:5432/one").read()
