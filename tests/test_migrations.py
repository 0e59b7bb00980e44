"""Schema migrations: idempotent, safe in parallel, compatible with the seed's database."""

from __future__ import annotations

import threading
from pathlib import Path

import psycopg

from extreg.adapters.migrate import migrate, migration_files
from testsupport.pgprocess import PostgresProcess

SEED_SQL = Path(__file__).parent / "data" / "seed_011_extensions_registry.sql"


def _tables(url: str) -> set[str]:
    with psycopg.connect(url) as conn:
        rows = conn.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_migrate_twice_applies_nothing_the_second_time(pg_server: PostgresProcess) -> None:
    """The first run applies every file; the second finds the database up to date."""
    url = pg_server.create_database("mig_twice")
    names = [name for name, _ in migration_files()]
    assert names == migrate(url)
    assert [] == migrate(url)
    assert {
        "extensions",
        "extension_versions",
        "extension_instances",
        "extension_health",
        "extension_audit_log",
        "extreg_schema_migrations",
    } <= _tables(url)


def test_concurrent_migrate_applies_each_file_once(pg_server: PostgresProcess) -> None:
    """Four processes' worth of migrate at once: no error, each file applied exactly once."""
    url = pg_server.create_database("mig_concurrent")
    results: list[list[str]] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.append(migrate(url))
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [] == errors
    applied = sorted(name for result in results for name in result)
    assert sorted(name for name, _ in migration_files()) == applied


def test_seed_database_migrates_and_keeps_rows(pg_server: PostgresProcess) -> None:
    """A database laid out by the seed's SQL migrates cleanly, keeps its rows, and then keeps
    audit rows of a deleted extension (the seed's cascade is dropped)."""
    url = pg_server.create_database("mig_seed")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_SQL.read_bytes())
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM extensions ORDER BY id")]
        assert ["mask_pii", "normalize_text", "pii_guard"] == ids
        health = conn.execute("SELECT count(*) FROM extension_health").fetchone()
        assert (3,) == health
        conn.execute("DELETE FROM extensions WHERE id = 'pii_guard'")
        actions = conn.execute(
            "SELECT action FROM extension_audit_log WHERE extension_id = 'pii_guard'"
        ).fetchall()
    assert [("delete",)] == actions


def test_audit_trail_of_plain_sql_changes(db_url: str) -> None:
    """Changes made with plain SQL are audited with old and new values and the actor: the
    session's extreg.actor when set, else the database user."""
    with psycopg.connect(db_url, autocommit=True) as conn:
        conn.execute("INSERT INTO extensions (id, type, subject) VALUES ('a1', 'pre', 'x.a1')")
        conn.execute("UPDATE extensions SET enabled = false WHERE id = 'a1'")
        conn.execute("SET extreg.actor = 'alice'")
        conn.execute("UPDATE extensions SET enabled = true WHERE id = 'a1'")
        conn.execute("UPDATE extensions SET timeout_ms = 250 WHERE id = 'a1'")
        conn.execute("UPDATE extensions SET timeout_ms = 250 WHERE id = 'a1'")  # no change
        conn.execute("DELETE FROM extensions WHERE id = 'a1'")
        rows = conn.execute(
            "SELECT action, changed_by, old_values->>'timeout_ms', new_values->>'timeout_ms'"
            " FROM extension_audit_log WHERE extension_id = 'a1' ORDER BY changed_at, action"
        ).fetchall()
    assert [
        ("create", "postgres", None, "5000"),
        ("disable", "postgres", "5000", "5000"),
        ("enable", "alice", "5000", "5000"),
        ("update", "alice", "5000", "250"),
        ("delete", "alice", "250", None),
    ] == rows


def test_seed_database_audits_policies(pg_server: PostgresProcess) -> None:
    """On a database laid out by the seed, whose audit log knows five actions only, the
    policy table's writes are audited (policy_create, policy_disable, policy_delete) and
    announced as `policy:<id>`."""
    url = pg_server.create_database("mig_seed_policies")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(SEED_SQL.read_bytes())
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("LISTEN extreg_changes")
        conn.execute("INSERT INTO routing_policies (policy_id, body) VALUES ('p1', '{}')")
        conn.execute("UPDATE routing_policies SET enabled = false WHERE policy_id = 'p1'")
        conn.execute("DELETE FROM routing_policies WHERE policy_id = 'p1'")
        actions = conn.execute(
            "SELECT action FROM extension_audit_log WHERE extension_id = 'p1' ORDER BY changed_at"
        ).fetchall()
        payloads = {n.payload for n in conn.notifies(timeout=1, stop_after=3)}
    assert [("policy_create",), ("policy_disable",), ("policy_delete",)] == actions
    assert {"policy:p1"} == payloads
