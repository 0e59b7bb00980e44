"""Routing policies in PostgreSQL: the one write path (locks, checks, audit, dry run), the
validation of rows, and the cache's freshness (notification, sync, snapshot file) for them.

Everything runs against a real PostgreSQL; the test that stops the database starts its own.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from api_helpers import sql
from helpers import make_settings, record
from invoke_helpers import wait_for
from lock_helpers import until_one_waits
from structlog.testing import capture_logs

from extreg import Registry
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import POLICY_LOCK_CLASS, PostgresSource, location_of
from extreg.adapters.snapshot_file import Origin, read_snapshot, write_snapshot_file
from extreg.core.model import Extension, parse_extension
from extreg.core.policy import Policy, PolicyLimits, StepItem, parse_policy
from extreg.errors import InvalidRecord
from extreg.local.embedded import prepare_embedded
from extreg.settings import Settings
from testsupport.pgprocess import PostgresProcess

DEADLINE_S = 30.0  # generous: a busy 2-core machine


def ext(ext_id: str, ext_type: str = "pre") -> Extension:
    return parse_extension(
        record(ext_id, type=ext_type, subject=f"beamline.ext.{ext_type}.{ext_id}.v1"),
        max_timeout_ms=60_000,
        max_retries=10,
    )


def policy(policy_id: str = "p", **values: Any) -> Policy:
    data = {"policy_id": policy_id, "pre": [{"id": "norm"}], "validators": [{"id": "guard"}]}
    return parse_policy({**data, **values}, limits=PolicyLimits())


def settings_for(tmp_path: Path, url: str, **values: Any) -> Settings:
    values.setdefault("sync_interval_seconds", 3600)
    return make_settings(tmp_path, source="database", database_url=url, **values)


async def seeded(db: PostgresSource, *policies: Policy) -> None:
    """The extensions the test policies name (a pre, a validator, a provider and a post), then
    `policies`, all imported by `test`."""
    await db.import_extensions(
        [ext("norm"), ext("guard", "validator"), ext("llm", "provider"), ext("mask", "post")],
        "test",
    )
    if policies:
        await db.import_policies(list(policies), "test")


def audit(url: str, policy_id: str = "p") -> list[tuple[Any, ...]]:
    return sql(
        url,
        "SELECT action, changed_by FROM extension_audit_log WHERE extension_id = %s"
        " ORDER BY changed_at, id",
        (policy_id,),
    )


def stored_rows(url: str) -> list[tuple[Any, ...]]:
    return sql(url, "SELECT policy_id, enabled, body FROM routing_policies ORDER BY policy_id")


# -- the write path ----------------------------------------------------------------------------


async def test_create_update_disable_delete_are_audited_and_the_delete_row_survives(
    tmp_path: Path, db_url: str
) -> None:
    """Each write of a policy gives its outcome and one audit row in extension_audit_log under
    the policy id (policy_create, policy_update, policy_disable, policy_delete) by the actor;
    an unchanged write gives none; the rows outlive the policy."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db)
        created = await db.write_policies({"p": lambda _: policy()}, "alice")
        assert "created" == created["p"][0]
        after = created["p"][1]
        assert after is not None and ("alice", "alice") == (after.created_by, after.updated_by)
        assert after.created_at is not None and after.updated_at is not None
        assert {"p": "unchanged"} == await db.import_policies([policy()], "bob")

        def add_post(cur: Policy | None) -> Policy | None:
            assert cur is not None
            return msgspec.structs.replace(cur, post=(StepItem("mask"),), providers=("llm",))

        outcome, updated = (await db.write_policies({"p": add_post}, "bob"))["p"]
        assert "updated" == outcome and updated is not None
        assert (("llm",), "mask", "bob") == (
            updated.providers,
            updated.post[0].id,
            updated.updated_by,
        )

        def disable(cur: Policy | None) -> Policy | None:
            return None if cur is None else msgspec.structs.replace(cur, enabled=False)

        assert "updated" == (await db.write_policies({"p": disable}, "carol"))["p"][0]
        assert ("deleted", None) == (await db.write_policies({"p": lambda _: None}, "dave"))["p"]
        assert ("absent", None) == (await db.write_policies({"p": lambda _: None}, "dave"))["p"]
    assert [] == stored_rows(db_url)
    assert [
        ("policy_create", "alice"),
        ("policy_update", "bob"),
        ("policy_disable", "carol"),
        ("policy_delete", "dave"),
    ] == audit(db_url)
    old = sql(
        db_url,
        "SELECT old_values FROM extension_audit_log WHERE action = 'policy_delete'",
    )[0][0]
    assert ("p", False, ["llm"]) == (old["policy_id"], old["enabled"], old["body"]["providers"])


@pytest.mark.parametrize(
    ("bad", "field", "item"),
    [
        (policy("bad", validators=[{"id": "nowhere"}]), "validators[0].id", "nowhere"),
        (policy("bad", pre=[{"id": "guard"}]), "pre[0].id", "guard"),
        (policy("bad", providers=["norm"]), "providers[0]", "norm"),
        (policy("bad", pre=[{"id": "norm"}, {"id": "norm"}]), "pre", "2 items"),
        (policy("other"), "policy_id", "'other'"),
    ],
    ids=["unknown-id", "wrong-type", "wrong-provider-type", "too-deep", "another-id"],
)
async def test_a_bad_policy_is_refused_and_nothing_is_written(
    tmp_path: Path, db_url: str, bad: Policy, field: str, item: str
) -> None:
    """A policy naming an unknown id, an extension of another stage's type, more items than
    the limits allow, or another policy id than the one written is refused with InvalidRecord
    (kind policy) naming the field and the item, and nothing of the write is stored or
    audited: not even the good policy beside it."""
    settings = settings_for(tmp_path, db_url, extension_max_pre_count=1)
    async with PostgresSource(settings) as db:
        await seeded(db, policy("kept"))
        rows, trail = stored_rows(db_url), sql(db_url, "SELECT * FROM extension_audit_log")
        with pytest.raises(InvalidRecord) as refused:
            await db.write_policies(
                {"good": lambda _: policy("good"), "bad": lambda _: bad}, "test"
            )
        assert ("policy", "bad") == (refused.value.kind, refused.value.record)
        assert [field] == [f for f, _ in refused.value.problems]
        assert item in refused.value.problems[0][1]
        assert rows == stored_rows(db_url)
        assert trail == sql(db_url, "SELECT * FROM extension_audit_log")


async def test_a_kept_reference_to_a_gone_extension_does_not_block_a_write(
    tmp_path: Path, db_url: str
) -> None:
    """Once an extension a policy names is deleted, the policy can still be disabled or edited
    (the reference was checked when it was added); a new bad reference is still refused."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db, policy())
        await db.delete_extension("guard", "test")
        disabled = policy(enabled=False)
        assert {"p": "updated"} == await db.import_policies([disabled], "test")
        with pytest.raises(InvalidRecord, match=r"post\[0\]\.id: no extension 'gone'"):
            await db.import_policies([policy(post=[{"id": "gone"}])], "test")


async def test_concurrent_writes_of_one_policy_serialize(tmp_path: Path, db_url: str) -> None:
    """Eight writers increment a counter held in the policy at once: each change runs on the
    policy as the previous writer committed it, so none is lost."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db, policy(tenant_id="0"))
        seen: list[int] = []

        def increment(cur: Policy | None) -> Policy | None:
            assert cur is not None and cur.tenant_id is not None
            seen.append(int(cur.tenant_id))
            return msgspec.structs.replace(cur, tenant_id=str(int(cur.tenant_id) + 1))

        await asyncio.gather(*(db.write_policies({"p": increment}, "test") for _ in range(8)))
        final = await db.load_policy("p")
        assert final is not None and "8" == final.tenant_id
        assert list(range(8)) == sorted(seen)


async def test_a_policy_write_waits_for_its_lock(tmp_path: Path, db_url: str) -> None:
    """While another session holds the policy lock of an id's bucket, a write of that id (a
    new one, with no row to lock yet) waits for it; the extension lock class is another."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db)
        holder = await psycopg.AsyncConnection.connect(db_url, autocommit=True)
        async with holder:
            await holder.execute("BEGIN")
            await holder.execute(
                "SELECT pg_advisory_xact_lock(%s, hashtext(%s) & 255)", (POLICY_LOCK_CLASS, "p")
            )
            task = asyncio.create_task(db.import_policies([policy()], "test"))

            await until_one_waits(holder, "the write waits for the lock", DEADLINE_S)
            assert not task.done()
            assert "created" == await db.upsert_extension(ext("p"), "test")  # its own lock
            await holder.execute("COMMIT")
            assert {"p": "created"} == await asyncio.wait_for(task, DEADLINE_S)


async def test_dry_run_writes_nothing(tmp_path: Path, db_url: str) -> None:
    """A dry run answers what the write would do, and stores and audits nothing."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db)
        trail = sql(db_url, "SELECT count(*) FROM extension_audit_log")
        assert {"p": "created"} == await db.import_policies([policy()], "test", dry_run=True)
        report = await db.write_policies({"p": lambda _: policy()}, "test", dry_run=True)
        assert "created" == report["p"][0]
        assert [] == stored_rows(db_url)
        assert trail == sql(db_url, "SELECT count(*) FROM extension_audit_log")


# -- reading rows: the one validation path -----------------------------------------------------


async def test_extensions_and_policies_import_in_one_transaction(
    tmp_path: Path, db_url: str
) -> None:
    """A folder is all or nothing: a policy refused inside the import's transaction takes the
    extensions of the same import with it; a dry run checks the policies against the
    extensions it would write."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        exts = [ext("norm"), ext("guard", "validator")]
        assert ({"norm": "created", "guard": "created"}, {"p": "created"}) == (
            await db.import_records(exts, [policy()], "test", dry_run=True)
        )
        with pytest.raises(InvalidRecord) as caught:
            await db.import_records(exts, [policy(validators=[{"id": "nosuch"}])], "test")
        assert caught.value.problems == [("validators[0].id", "no extension 'nosuch'")]
        assert await db.ids() == set()
        assert sql(db_url, "SELECT count(*) FROM extension_audit_log") == [(0,)]


async def test_a_row_broken_by_plain_sql_is_left_out_and_named(tmp_path: Path, db_url: str) -> None:
    """A body that does not parse (an item without its id, a field no policy has) is left out
    of what is read and reported under `policy:<id>` with the field at fault; the write path
    can still replace or delete the row."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db, policy("p"), policy("q"))
        sql(db_url, """UPDATE routing_policies SET body = '{"pre": [{"mode": "optional"}]}'""")
        sql(db_url, """UPDATE routing_policies SET body = '{"extra": 1}' WHERE policy_id = 'q'""")
        assert [] == await db.load_all_policies()
        assert {"policy:p", "policy:q"} == db.invalid.keys()
        assert "pre[0].id" in db.invalid["policy:p"]
        assert "body.extra: unknown field" in db.invalid["policy:q"]
        assert {"p": "updated"} == await db.import_policies([policy("p")], "test")
        assert ["p"] == [p.policy_id for p in await db.load_policies(["p", "q"])]
        assert ["policy:q"] == sorted(db.invalid)
        assert ("deleted", None) == (await db.write_policies({"q": lambda _: None}, "t"))["q"]


async def test_row_versions_include_policies(tmp_path: Path, db_url: str) -> None:
    """What the sync compares holds each policy under `policy:<id>`, and its token changes
    with every committed write of the row."""
    async with PostgresSource(settings_for(tmp_path, db_url)) as db:
        await seeded(db, policy())
        before = await db.row_versions()
        sql(db_url, "UPDATE routing_policies SET tenant_id = 'acme'")
        after = await db.row_versions()
    assert {"norm", "guard", "llm", "mask", "policy:p"} == before.keys()
    assert before["policy:p"] != after["policy:p"]
    assert before["norm"] == after["norm"]


# -- the cache: notification, sync, unusable policies ------------------------------------------


async def test_plain_sql_policy_changes_reach_the_registry_by_notification(
    tmp_path: Path, db_url: str
) -> None:
    """An update of the body, an insert, a row broken by hand, a delete and a TRUNCATE made with
    plain SQL reach a running registry through notifications (the sync is an hour away)."""
    settings = settings_for(tmp_path, db_url)
    async with PostgresSource(settings) as db:
        await seeded(db, policy())
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            assert ["p"] == [p.policy_id for p in reg.policies()]
            sql(db_url, """UPDATE routing_policies SET body = '{"providers": ["llm"]}'""")
            await wait_for(lambda: reg.lookup_policy("p").providers == ("llm",), DEADLINE_S)
            assert () == reg.lookup_policy("p").pre
            sql(db_url, "INSERT INTO routing_policies (policy_id, body) VALUES ('q', '{}')")
            await wait_for(lambda: reg.policy("q") is not None, DEADLINE_S)
            sql(db_url, """UPDATE routing_policies SET body = '{"pre": 1}' WHERE policy_id = 'q'""")
            await wait_for(lambda: reg.policy("q") is None, DEADLINE_S)
            assert ["policy:q"] == sorted(reg.status.invalid_records)
            sql(db_url, "DELETE FROM routing_policies WHERE policy_id = 'p'")
            await wait_for(lambda: reg.policy("p") is None, DEADLINE_S)
            sql(db_url, "UPDATE routing_policies SET body = '{}' WHERE policy_id = 'q'")
            await wait_for(lambda: reg.policy("q") is not None, DEADLINE_S)
            generation = reg.status.generation
            sql(db_url, "TRUNCATE routing_policies")
            await wait_for(lambda: reg.status.generation > generation, DEADLINE_S)
            assert ([], 4) == (reg.policies(), reg.status.count)
    changed = [(e["policy_id"], e["via"]) for e in events if e["event"] == "policy_changed"]
    assert ("p", "notification") in changed and ("q", "notification") in changed
    assert any(e["event"] == "policy_deleted" and e["policy_id"] == "p" for e in events)


async def test_the_sync_alone_brings_policy_changes(tmp_path: Path, db_url: str) -> None:
    """With the notify triggers dropped, a sync brings in a policy inserted, one updated and
    one deleted with plain SQL."""
    settings = settings_for(tmp_path, db_url)
    async with PostgresSource(settings) as db:
        await seeded(db, policy("keep"), policy("gone"))
    for table in ("extensions", "extension_versions", "extension_instances", "routing_policies"):
        sql(db_url, f"DROP TRIGGER extreg_notify ON {table}")
    async with Registry.open(settings) as reg:
        sql(db_url, "INSERT INTO routing_policies (policy_id, body) VALUES ('new', '{}')")
        sql(db_url, "UPDATE routing_policies SET enabled = false WHERE policy_id = 'keep'")
        sql(db_url, "DELETE FROM routing_policies WHERE policy_id = 'gone'")
        await reg.sync()
        assert ["keep", "new"] == [p.policy_id for p in reg.policies()]
        assert False is reg.policy("keep").enabled  # type: ignore[union-attr]


async def test_a_deleted_extension_makes_the_policy_unusable(tmp_path: Path, db_url: str) -> None:
    """When an extension a policy names is deleted, status lists the policy as unusable with
    the reason, and one warning names it; when it returns, the policy is usable again."""
    settings = settings_for(tmp_path, db_url)
    async with PostgresSource(settings) as db:
        await seeded(db, policy())
        with capture_logs() as events:
            async with Registry.open(settings) as reg:
                assert {} == reg.status.unusable_policies
                await db.delete_extension("guard", "test")
                await wait_for(lambda: "p" in reg.status.unusable_policies, DEADLINE_S)
                assert ["validators[0].id: extension 'guard' does not exist"] == (
                    reg.status.unusable_policies["p"]
                )
                await db.set_enabled("norm", False, "test")
                await wait_for(lambda: "norm" not in reg.snapshot.enabled, DEADLINE_S)
                await db.import_extensions([ext("guard", "validator"), ext("norm")], "test")
                await wait_for(lambda: not reg.status.unusable_policies, DEADLINE_S)
    warnings = [e for e in events if e["event"] == "policy_unusable"]
    assert 1 == len(warnings)
    assert ("p", "warning") == (warnings[0]["policy_id"], warnings[0]["log_level"])
    assert "guard" in warnings[0]["problems"][0]


async def test_refresh_rereads_policies_named_by_a_writer(tmp_path: Path, db_url: str) -> None:
    """`refresh(policy_ids=...)` after a commit: the cache holds the write when it returns."""
    settings = settings_for(tmp_path, db_url)
    async with PostgresSource(settings) as db:
        await seeded(db)
        for table in ("extensions", "routing_policies"):
            sql(db_url, f"DROP TRIGGER extreg_notify ON {table}")
        async with Registry.open(settings) as reg:
            await db.import_policies([policy()], "test")
            await reg.refresh([], policy_ids=["p"])
            assert "p" == reg.lookup_policy("p").policy_id


# -- the snapshot file -------------------------------------------------------------------------


def test_the_snapshot_file_round_trips_policies(tmp_path: Path) -> None:
    """Policies written to the snapshot file read back equal, beside the extensions."""
    path = tmp_path / "snapshot.json"
    origin = Origin("here:5432/db", "db", "1")
    extensions = [ext("norm"), ext("guard", "validator")]
    policies = [policy("p"), policy("q", enabled=False, tenant_id="acme")]
    write_snapshot_file(path, extensions, origin, policies)
    found = read_snapshot(path, origin.location)
    assert (extensions, policies) == (found.extensions, found.policies)
    assert '"format":"extreg-snapshot/3"' in path.read_text().splitlines()[0]


def test_a_format_2_snapshot_file_is_still_read(tmp_path: Path) -> None:
    """A file the previous release wrote (format /2: a list of extensions, no policies) is
    read, with no policies."""
    path = tmp_path / "snapshot.json"
    extensions = [ext("norm")]
    body = msgspec.json.encode(extensions)
    header = {
        "format": "extreg-snapshot/2",
        "count": 1,
        "written_at": datetime.now(UTC).isoformat(),
        "database": {"location": "here:5432/db", "name": "db", "system_identifier": "1"},
        "sha256": hashlib.sha256(body).hexdigest(),
    }
    path.write_bytes(json.dumps(header).encode() + b"\n" + body)
    found = read_snapshot(path, "here:5432/db")
    assert (extensions, []) == (found.extensions, found.policies)


async def test_a_boot_from_the_snapshot_file_serves_its_policies(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    """With the database down, source=database boots from the snapshot file and serves the
    policies it holds, as they were."""
    url = own_pg.create_database("snap")
    migrate(url)
    settings = settings_for(tmp_path, url)
    async with PostgresSource(settings) as db:
        await seeded(db, policy(), policy("q", enabled=False))
    async with Registry.open(settings) as reg:
        served = reg.policies()
    own_pg.stop()
    async with Registry.open(settings) as reg:
        assert ("snapshot_file", served) == (reg.status.source, reg.policies())
        assert ["p", "q"] == [p.policy_id for p in reg.policies()]
        assert {} == reg.status.unusable_policies
    assert served == read_snapshot(settings.snapshot_path, location_of(url)).policies


# -- the embedded default ----------------------------------------------------------------------


async def test_an_empty_embedded_database_gets_the_sample_policy(
    tmp_path: Path, db_url: str
) -> None:
    """`prepare_embedded` on an empty database loads the bundled samples, the support_en
    policy with them; a second run changes nothing."""
    settings = settings_for(tmp_path, db_url)
    await prepare_embedded(settings)
    await prepare_embedded(settings)
    async with PostgresSource(settings) as db:
        policies = await db.load_all_policies()
    assert ["support_en"] == [p.policy_id for p in policies]
    assert [("policy_create", "extreg:bootstrap")] == audit(db_url, "support_en")
