"""The `extreg` command (SPEC.md, "Command line"), run as the installed console script in a
subprocess so that `extreg.cli.main` maps errors to exit codes exactly as users see them:
0 success, 1 failure (database down), 2 bad usage or bad input."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import psycopg
import pytest
from cli_helpers import ACTOR, flat, last_line, outcome, run

from extreg.adapters.fixtures import load_fixtures
from extreg.adapters.migrate import migrate, migration_files
from extreg.core.model import to_plain
from testsupport.pgprocess import PostgresProcess, free_port

SECRET = "s3cret"
DB_KEPT = ("created_at", "updated_at")


# -- helpers -------------------------------------------------------------------------------


def query(url: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    with psycopg.connect(url, autocommit=True) as conn:
        cur = conn.execute(sql, params)
        return cur.fetchall() if cur.description else []


def count_rows(url: str, table: str) -> int:
    return int(query(url, f"SELECT count(*) FROM {table}")[0][0])


def audit_rows(url: str) -> list[tuple[str, str, str]]:
    return sorted(
        (r[0], r[1], r[2])
        for r in query(url, "SELECT extension_id, action, changed_by FROM extension_audit_log")
    )


def fresh_database(pg_server: PostgresProcess, *, migrated: bool) -> str:
    url = pg_server.create_database(f"cli_{uuid.uuid4().hex[:12]}")
    if migrated:
        migrate(url)
    return url


ROUTED: dict[str, Any] = {
    "id": "routed",
    "type": "provider",
    "subject": "beamline.provider.routed.v1",
    "timeout_ms": 900,
    "retry": 2,
    "config": {"model": "big"},
    "metadata": {"owner": "team-a"},
    "versions": [
        {"version": "v2", "subject": "beamline.provider.routed.v2"},
        {
            "version": "v3",
            "subject": "beamline.provider.routed.v3",
            "timeout_ms": 1200,
            "routing_rules": {"tenant_id": ["acme", "beta"]},
        },
    ],
    "instances": [
        {
            "instance_id": "i1",
            "subject": "beamline.provider.routed.i1",
            "weight": 70,
            "health_status": "healthy",
        },
        {"instance_id": "i2", "subject": "beamline.provider.routed.i2", "weight": 30},
    ],
}
NORMALIZE = {
    "id": "normalize_text",
    "type": "pre",
    "subject": "beamline.ext.pre.normalize_text.v1",
    "timeout_ms": 100,
}
GUARD = {
    "id": "pii_guard",
    "type": "validator",
    "subject": "beamline.ext.validate.pii_guard.v1",
    "timeout_ms": 200,
    "enabled": False,
}
IDS = ["normalize_text", "pii_guard", "routed"]
# What import-fixtures --json reports of a folder without a policies/ subfolder.
NO_POLICIES: dict[str, Any] = {"policies": {"created": [], "updated": [], "unchanged": []}}


def fixtures_folder(folder: Path, routed: dict[str, Any] = ROUTED) -> Path:
    """Three records: a JSON list of two and a YAML file with versions and instances."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "basic.json").write_text(json.dumps([NORMALIZE, GUARD]), encoding="utf-8")
    (folder / "routed.yaml").write_text(json.dumps(routed), encoding="utf-8")  # JSON is YAML
    return folder


def seed(url: str) -> None:
    """Two extensions written with plain SQL, one disabled."""
    query(
        url,
        "INSERT INTO extensions (id, type, subject, timeout_ms, retry, enabled, metadata)"
        " VALUES ('alpha', 'pre', 'a.alpha', 100, 1, true, '{\"k\": 1}'),"
        " ('beta', 'post', 'a.beta', 200, 0, false, '{}')",
    )


def without_db_kept(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records minus the timestamps that differ from one database to another."""
    out = []
    for rec in records:
        rec = {k: v for k, v in rec.items() if k not in DB_KEPT}
        rec["versions"] = [
            {k: v for k, v in ver.items() if k != "created_at"} for ver in rec["versions"]
        ]
        out.append(rec)
    return out


# -- migrate -------------------------------------------------------------------------------


def test_migrate_twice(pg_server: PostgresProcess, tmp_path: Path) -> None:
    """`migrate` applies every migration once; a second run says the database is up to date."""
    url = fresh_database(pg_server, migrated=False)
    first = run(tmp_path, "migrate", db=url)
    names = ", ".join(name for name, _ in migration_files())
    assert (0, f"applied: {names}") == (first.returncode, first.stdout.strip()), outcome(first)
    second = run(tmp_path, "migrate", db=url)
    assert (0, "database is up to date") == (second.returncode, second.stdout.strip()), outcome(
        second
    )
    assert 0 == count_rows(url, "extensions")


# -- import-fixtures -----------------------------------------------------------------------


def test_import_fixtures_counts_audit_and_idempotence(db_url: str, tmp_path: Path) -> None:
    """First import creates all (audited as create by cli:<user>); the same folder again is all
    unchanged with no new audit rows; an edited record is updated and audited once."""
    folder = fixtures_folder(tmp_path / "fx")
    first = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert 0 == first.returncode, outcome(first)
    assert {
        "dry_run": False,
        "created": IDS,
        "updated": [],
        "unchanged": [],
        **NO_POLICIES,
    } == json.loads(first.stdout)
    assert [(i, "create", ACTOR) for i in IDS] == audit_rows(db_url)
    assert ACTOR.startswith("cli:")
    assert (2, 2) == (
        count_rows(db_url, "extension_versions"),
        count_rows(db_url, "extension_instances"),
    )
    stamps = query(db_url, "SELECT id, updated_at FROM extensions ORDER BY id")

    second = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert 0 == second.returncode, outcome(second)
    assert {
        "dry_run": False,
        "created": [],
        "updated": [],
        "unchanged": IDS,
        **NO_POLICIES,
    } == json.loads(second.stdout)
    assert [(i, "create", ACTOR) for i in IDS] == audit_rows(db_url)
    assert stamps == query(db_url, "SELECT id, updated_at FROM extensions ORDER BY id")

    (folder / "basic.json").write_text(
        json.dumps([{**NORMALIZE, "timeout_ms": 250}, GUARD]), encoding="utf-8"
    )
    third = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert 0 == third.returncode, outcome(third)
    assert {
        "dry_run": False,
        "created": [],
        "updated": ["normalize_text"],
        "unchanged": ["pii_guard", "routed"],
        **NO_POLICIES,
    } == json.loads(third.stdout)
    assert sorted(
        [*((i, "create", ACTOR) for i in IDS), ("normalize_text", "update", ACTOR)]
    ) == audit_rows(db_url)
    assert [(250,)] == query(
        db_url, "SELECT timeout_ms FROM extensions WHERE id = 'normalize_text'"
    )


def test_reimport_with_children_in_any_order_is_unchanged(db_url: str, tmp_path: Path) -> None:
    """A record whose versions/instances are listed in another order than the database returns
    them is still "unchanged" on the second import (and its row is not rewritten)."""
    shuffled = {
        **ROUTED,
        "versions": ROUTED["versions"][::-1],
        "instances": ROUTED["instances"][::-1],
    }
    folder = fixtures_folder(tmp_path / "fx", routed=shuffled)
    first = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert 0 == first.returncode, outcome(first)
    stamps = query(db_url, "SELECT id, updated_at FROM extensions ORDER BY id")
    second = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert {
        "dry_run": False,
        "created": [],
        "updated": [],
        "unchanged": IDS,
        **NO_POLICIES,
    } == json.loads(second.stdout), outcome(second)
    assert stamps == query(db_url, "SELECT id, updated_at FROM extensions ORDER BY id")


def test_import_changing_only_a_version_is_audited(db_url: str, tmp_path: Path) -> None:
    """Re-importing a record whose only change is a version's subject updates that version,
    reports the record as updated and leaves an `update` audit row by cli:<user>."""
    folder = fixtures_folder(tmp_path / "fx")
    assert 0 == run(tmp_path, "import-fixtures", str(folder), db=db_url).returncode
    changed = {
        **ROUTED,
        "versions": [
            ROUTED["versions"][0],
            {**ROUTED["versions"][1], "subject": "beamline.routed.v3b"},
        ],
    }
    fixtures_folder(folder, routed=changed)
    result = run(tmp_path, "import-fixtures", str(folder), "--json", db=db_url)
    assert {
        "dry_run": False,
        "created": [],
        "updated": ["routed"],
        "unchanged": ["normalize_text", "pii_guard"],
        **NO_POLICIES,
    } == json.loads(result.stdout), outcome(result)
    assert [("beamline.routed.v3b",)] == query(
        db_url, "SELECT subject FROM extension_versions WHERE id = 'routed' AND version = 'v3'"
    )
    assert sorted(
        [*((i, "create", ACTOR) for i in IDS), ("routed", "update", ACTOR)]
    ) == audit_rows(db_url)


def test_import_fixtures_dry_run_writes_nothing(db_url: str, tmp_path: Path) -> None:
    """--dry-run reports what would happen (JSON and text) and leaves every table empty."""
    folder = fixtures_folder(tmp_path / "fx")
    as_json = run(tmp_path, "import-fixtures", str(folder), "--dry-run", "--json", db=db_url)
    assert 0 == as_json.returncode, outcome(as_json)
    assert {
        "dry_run": True,
        "created": IDS,
        "updated": [],
        "unchanged": [],
        **NO_POLICIES,
    } == json.loads(as_json.stdout)
    as_text = run(tmp_path, "import-fixtures", str(folder), "--dry-run", db=db_url)
    assert 0 == as_text.returncode, outcome(as_text)
    assert [
        f"would be created: 3 ({', '.join(IDS)})",
        "would be updated: 0",
        "would be unchanged: 0",
    ] == [flat(line) for line in as_text.stdout.strip().splitlines()]
    assert {
        "extensions": 0,
        "extension_versions": 0,
        "extension_instances": 0,
        "extension_audit_log": 0,
    } == {
        t: count_rows(db_url, t)
        for t in ("extensions", "extension_versions", "extension_instances", "extension_audit_log")
    }


def test_import_fixtures_with_one_invalid_record_writes_nothing(
    db_url: str, tmp_path: Path
) -> None:
    """One bad record among good ones: exit 2, the error names file, record and field, and not
    a single row is written."""
    folder = fixtures_folder(tmp_path / "fx")
    (folder / "zz-bad.yaml").write_text(
        "id: bad_one\ntype: pre\nsubject: beamline.bad\ncolour: blue\n", encoding="utf-8"
    )
    result = run(tmp_path, "import-fixtures", str(folder), db=db_url)
    assert 2 == result.returncode, outcome(result)
    assert "zz-bad.yaml record #1 (bad_one): field colour: unknown field" in flat(result.stderr)
    assert "Traceback" not in result.stderr
    assert (0, 0) == (count_rows(db_url, "extensions"), count_rows(db_url, "extension_audit_log"))


# -- export --------------------------------------------------------------------------------


def test_export_then_import_round_trip(
    db_url: str, pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """Records exported to a folder and imported into another fresh database list identically
    (database timestamps aside); `export -` prints the same records as the `extensions` list
    of one JSON object (beside `policies`, none here)."""
    source = fixtures_folder(tmp_path / "fx")
    assert 0 == run(tmp_path, "import-fixtures", str(source), db=db_url).returncode

    exported = tmp_path / "exported"
    result = run(tmp_path, "export", str(exported), db=db_url)
    assert 0 == result.returncode, outcome(result)
    originals = load_fixtures(source, max_timeout_ms=60_000, max_retries=10).extensions
    reread = load_fixtures(exported, max_timeout_ms=60_000, max_retries=10).extensions
    assert sorted(originals, key=lambda e: e.id) == sorted(reread, key=lambda e: e.id)

    other = fresh_database(pg_server, migrated=True)
    result = run(tmp_path, "import-fixtures", str(exported), "--json", db=other)
    assert {
        "dry_run": False,
        "created": IDS,
        "updated": [],
        "unchanged": [],
        **NO_POLICIES,
    } == json.loads(result.stdout), outcome(result)

    listed = [run(tmp_path, "list", "--json", db=url) for url in (db_url, other)]
    assert [0, 0] == [r.returncode for r in listed], [outcome(r) for r in listed]
    first, second = (json.loads(r.stdout) for r in listed)
    assert IDS == [r["id"] for r in first]
    assert without_db_kept(first) == without_db_kept(second)

    to_stdout = run(tmp_path, "export", "-", db=other)
    assert 0 == to_stdout.returncode, outcome(to_stdout)
    printed = json.loads(to_stdout.stdout)
    assert [] == printed["policies"]
    assert [
        json.loads(json.dumps(to_plain(e, writable_only=True)))
        for e in sorted(originals, key=lambda e: e.id)
    ] == printed["extensions"]


# -- validate ------------------------------------------------------------------------------


def test_validate_good_folder(tmp_path: Path) -> None:
    """A valid folder: exit 0, with counts (extensions, policies) in text and in JSON."""
    folder = fixtures_folder(tmp_path / "fx")
    text = run(tmp_path, "validate", str(folder))
    assert (0, f"{folder}: 3 extensions and 0 policies, all valid") == (
        text.returncode,
        flat(text.stdout),
    ), outcome(text)
    as_json = run(tmp_path, "validate", str(folder), "--json")
    assert (0, {"valid": True, "count": 3, "policies": 0}) == (
        as_json.returncode,
        json.loads(as_json.stdout),
    )


def bad_folder(folder: Path) -> tuple[Path, list[str]]:
    folder = fixtures_folder(folder)
    (folder / "x1.json").write_text(
        json.dumps(
            [
                {**NORMALIZE, "id": "dup_free", "retry": 11},
                {**NORMALIZE, "id": "wild", "subject": "a.>"},
            ]
        ),
        encoding="utf-8",
    )
    (folder / "x2.yaml").write_text("id: pii_guard\ntype: pre\nsubject: x.y\n", encoding="utf-8")
    (folder / "x3.json").write_text("[]", encoding="utf-8")
    return folder, [
        "x1.json record #1 (dup_free): field retry: 11 exceeds extension_max_retries 10",
        "x1.json record #2 (wild): field subject: must be a NATS subject",
        "x2.yaml record #1 (pii_guard): field id: duplicate id, first defined in basic.json record #2",
        "x3.json: file holds an empty list",
    ]


def test_validate_bad_folder_lists_every_problem(tmp_path: Path) -> None:
    """A folder with problems in three files: exit 2 and every problem on stderr."""
    folder, expected = bad_folder(tmp_path / "fx")
    result = run(tmp_path, "validate", str(folder))
    assert 2 == result.returncode, outcome(result)
    errors = flat(result.stderr)
    assert [p for p in expected if p not in errors] == [], errors
    assert "Traceback" not in result.stderr


def test_validate_bad_folder_json_exits_2(tmp_path: Path) -> None:
    """`validate --json` on a bad folder prints every problem as JSON and still exits 2."""
    folder, expected = bad_folder(tmp_path / "fx")
    result = run(tmp_path, "validate", str(folder), "--json")
    data = json.loads(result.stdout)
    assert (False, 4) == (data["valid"], len(data["problems"]))
    assert [e for e, p in zip(expected, data["problems"], strict=True) if not p.startswith(e)] == []
    assert 2 == result.returncode, outcome(result)


# -- reading -------------------------------------------------------------------------------


def test_list_and_show(db_url: str, tmp_path: Path) -> None:
    """`list --json` gives every record, disabled ones too; `show ID --json` gives that record;
    `show` of a missing id exits 2 naming it."""
    seed(db_url)
    listed = run(tmp_path, "list", "--json", db=db_url)
    assert 0 == listed.returncode, outcome(listed)
    records = json.loads(listed.stdout)
    assert [
        ("alpha", "pre", "a.alpha", 100, 1, True, {"k": 1}),
        ("beta", "post", "a.beta", 200, 0, False, {}),
    ] == [
        (r["id"], r["type"], r["subject"], r["timeout_ms"], r["retry"], r["enabled"], r["metadata"])
        for r in records
    ]

    shown = run(tmp_path, "show", "beta", "--json", db=db_url)
    assert (0, records[1]) == (shown.returncode, json.loads(shown.stdout)), outcome(shown)

    missing = run(tmp_path, "show", "missing", db=db_url)
    assert (2, "") == (missing.returncode, missing.stdout), outcome(missing)
    assert "error: missing: no such extension" == last_line(missing.stderr)


def test_status_json(db_url: str, tmp_path: Path) -> None:
    """`status --json` says the database serves, how many records, and where it is."""
    seed(db_url)
    result = run(tmp_path, "status", "--json", db=db_url)
    assert 0 == result.returncode, outcome(result)
    data = json.loads(result.stdout)
    assert {
        "mode": "auto",
        "source": "database",
        "count": 2,
        "enabled_count": 1,
        "stale": False,
        "fallback_reason": None,
        "database": db_url,
    } == {
        k: data[k]
        for k in (
            "mode",
            "source",
            "count",
            "enabled_count",
            "stale",
            "fallback_reason",
            "database",
        )
    }


# -- writing -------------------------------------------------------------------------------


def test_enable_and_disable(db_url: str, tmp_path: Path) -> None:
    """`disable`/`enable` flip the row and write `disable`/`enable` audit rows by cli:<user>;
    `disable` of a missing id exits 2 and writes nothing."""
    seed(db_url)
    before = audit_rows(db_url)

    off = run(tmp_path, "disable", "alpha", db=db_url)
    assert (0, "alpha disabled") == (off.returncode, off.stdout.strip()), outcome(off)
    assert [(False,)] == query(db_url, "SELECT enabled FROM extensions WHERE id = 'alpha'")

    on = run(tmp_path, "enable", "beta", db=db_url)
    assert (0, "beta enabled") == (on.returncode, on.stdout.strip()), outcome(on)
    assert [(True,)] == query(db_url, "SELECT enabled FROM extensions WHERE id = 'beta'")

    assert sorted([*before, ("alpha", "disable", ACTOR), ("beta", "enable", ACTOR)]) == audit_rows(
        db_url
    )

    missing = run(tmp_path, "disable", "missing", db=db_url)
    assert 2 == missing.returncode, outcome(missing)
    assert "error: missing: no such extension" == last_line(missing.stderr)
    assert sorted([*before, ("alpha", "disable", ACTOR), ("beta", "enable", ACTOR)]) == audit_rows(
        db_url
    )


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("migrate",),
        ("--source", "database", "list"),
        ("enable", "alpha"),
        ("import-fixtures", "FIXTURES"),
    ],
    ids=["migrate", "list-source-database", "enable", "import-fixtures"],
)
def test_unreachable_database_exits_1_without_password(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """A database URL on a closed port: exit 1, a one-line error that shows where (password
    masked), never the password, and no traceback."""
    port = free_port()
    url = f"postgresql://u:{SECRET}@127.0.0.1:{port}/x"
    folder = fixtures_folder(tmp_path / "fx")
    args = tuple(str(folder) if a == "FIXTURES" else a for a in args)
    result = run(tmp_path, *args, db=url)
    assert 1 == result.returncode, outcome(result)
    assert SECRET not in result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: database postgresql://u:********@127.0.0.1:{port}/x unavailable" in flat(
        result.stderr
    ), outcome(result)


def test_status_falls_back_to_fixtures_when_database_is_unreachable(tmp_path: Path) -> None:
    """In auto mode an unreachable database boots on fixtures; status says so, stale, with a
    password-free reason."""
    port = free_port()
    url = f"postgresql://u:{SECRET}@127.0.0.1:{port}/x"
    result = run(tmp_path, "status", "--json", db=url)
    assert 0 == result.returncode, outcome(result)
    assert SECRET not in result.stdout + result.stderr
    data = json.loads(result.stdout)
    assert ("auto", "fixtures", True, 4, f"postgresql://u:********@127.0.0.1:{port}/x") == (
        data["mode"],
        data["source"],
        data["stale"],
        data["count"],
        data["database"],
    )
    assert data["fallback_reason"].startswith(
        f"database postgresql://u:********@127.0.0.1:{port}/x unavailable"
    )


def test_non_postgresql_url_exits_2_without_password(tmp_path: Path) -> None:
    """A --database-url that is not postgresql:// is bad input (exit 2) and its password is
    not echoed back."""
    result = run(tmp_path, "list", db=f"mysql://u:{SECRET}@127.0.0.1/x")
    assert 2 == result.returncode, outcome(result)
    assert "database_url" in result.stderr
    assert SECRET not in result.stdout + result.stderr, outcome(result)


@pytest.mark.parametrize("args", [("show",), ("no-such-command",)], ids=["missing-arg", "unknown"])
def test_bad_usage_exits_2_without_traceback(tmp_path: Path, args: tuple[str, ...]) -> None:
    """A missing argument or an unknown command is bad usage: exit 2 and a usage message, not
    a Python traceback."""
    result = run(tmp_path, *args)
    assert "Traceback" not in result.stderr, outcome(result)
    assert 2 == result.returncode, outcome(result)
