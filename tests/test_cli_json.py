"""Every `extreg` command that prints takes --json (SPEC.md, "Command line"), run as the
installed console script: one JSON document on stdout and an empty stderr on success; an
error as the API's error answer (`error` the `extreg.errors` class, `detail`) on stdout with
exit 1 for a failure and 2 for bad usage or bad input. Also what scripts read without
--json: tables as tab-separated lines in a pipe, no log lines below warning unless -v."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
from cli_helpers import extreg, flat, outcome, run

from testsupport.pgprocess import free_port

BUNDLED = Path(__file__).parents[1] / "src" / "extreg" / "fixtures"
SECRET = "s3cret"
DOWN = f"postgresql://u:{SECRET}@127.0.0.1:{free_port()}/x"  # nothing listens there
NOWHERE = f"http://127.0.0.1:{free_port()}"
POLICY = {"policy_id": "route_b", "pre": [{"id": "normalize_text"}], "providers": ["test_provider"]}


def as_json(tmp_path: Path, *args: str, code: int = 0, **options: Any) -> Any:
    """`extreg ARGS --json` (on `db` if given, else the bundled fixtures): its exit status
    must be `code`, and stdout one JSON document, which is returned."""
    result = run(tmp_path, *args, "--json", **options)
    assert code == result.returncode, outcome(result)
    return json.loads(result.stdout)


def quiet(tmp_path: Path, *args: str, **options: Any) -> Any:
    """`as_json` of a command that must succeed and say nothing on stderr."""
    result = run(tmp_path, *args, "--json", **options)
    assert (0, "") == (result.returncode, result.stderr), outcome(result)
    return json.loads(result.stdout)


def test_every_command_answers_json_on_a_database(db_url: str, tmp_path: Path) -> None:
    """On a database, each command's --json is one document of the documented shape, with
    nothing on stderr (no log line below warning)."""
    db = {"db": db_url}
    assert {"applied": []} == quiet(tmp_path, "migrate", **db)
    imported = quiet(tmp_path, "import-fixtures", str(BUNDLED), **db)
    assert (4, ["support_en"]) == (len(imported["created"]), imported["policies"]["created"])
    assert {"valid": True, "count": 4, "policies": 1} == quiet(tmp_path, "validate", str(BUNDLED))

    listed = quiet(tmp_path, "list", **db)
    assert "normalize_text" in [r["id"] for r in listed]
    assert "pre" == quiet(tmp_path, "show", "normalize_text", **db)["type"]
    assert ("database", 4) == (lambda s: (s["source"], s["count"]))(quiet(tmp_path, "status", **db))

    off = {"id": "normalize_text", "enabled": False, "outcome": "updated"}
    assert off == quiet(tmp_path, "disable", "normalize_text", **db)
    assert {**off, "outcome": "unchanged"} == quiet(tmp_path, "disable", "normalize_text", **db)
    on = {"id": "normalize_text", "enabled": True, "outcome": "updated"}
    assert on == quiet(tmp_path, "enable", "normalize_text", **db)
    assert {"requested": True} == quiet(tmp_path, "reload", **db)

    report = quiet(tmp_path, "health", **db)
    assert ({"extensions", "summary"}, 4) == (set(report), len(report["extensions"]))
    assert "normalize_text" == quiet(tmp_path, "health", "normalize_text", **db)["id"]
    trail = quiet(tmp_path, "audit", "normalize_text", "--limit", "2", **db)
    assert ["enable", "disable"] == [row["action"] for row in trail]

    folder = tmp_path / "exported"
    assert {
        "folder": str(folder),
        "extensions": sorted(r["id"] for r in listed),
        "policies": ["support_en"],
    } == quiet(tmp_path, "export", str(folder), **db)
    assert ["support_en"] == [
        p["policy_id"] for p in quiet(tmp_path, "export", "-", **db)["policies"]
    ]

    created = quiet(tmp_path, "token", "create", "ci", "--role", "viewer", **db)
    assert ("ci", "viewer", True) == (
        created["name"],
        created["role"],
        created["token"].startswith("extreg_"),
    )
    assert ["ci"] == [t["name"] for t in quiet(tmp_path, "token", "list", **db)]
    assert "ci" == quiet(tmp_path, "token", "revoke", "ci", **db)["name"]

    file = tmp_path / "route.json"
    file.write_text(json.dumps(POLICY), encoding="utf-8")
    assert ["route_b"] == quiet(tmp_path, "policy", "apply", str(file), **db)["created"]
    policies = [p["policy_id"] for p in quiet(tmp_path, "policy", "list", **db)]
    assert ["route_b", "support_en"] == sorted(policies)
    assert "route_b" == quiet(tmp_path, "policy", "show", "route_b", **db)["policy_id"]
    deleted = quiet(tmp_path, "policy", "delete", "route_b", **db)
    assert {"policy_id": "route_b", "deleted": True} == deleted


def test_enable_and_disable_say_when_nothing_changed(db_url: str, tmp_path: Path) -> None:
    """Disabling a disabled extension (or enabling an enabled one) says "already" plainly,
    exits 0 and writes no audit row."""
    assert 0 == run(tmp_path, "import-fixtures", str(BUNDLED), db=db_url).returncode
    first = run(tmp_path, "disable", "mask_pii", db=db_url)
    again = run(tmp_path, "disable", "mask_pii", db=db_url)
    still = run(tmp_path, "enable", "pii_guard", db=db_url)
    assert [(0, "mask_pii disabled"), (0, "mask_pii already disabled")] == [
        (r.returncode, r.stdout.strip()) for r in (first, again)
    ]
    assert (0, "pii_guard already enabled") == (still.returncode, still.stdout.strip())
    trail = as_json(tmp_path, "audit", "mask_pii", db=db_url)
    assert ["disable", "create"] == [row["action"] for row in trail]


DOWN_DB = ("--database-url", DOWN)
FIXTURES = ("--source", "fixtures")


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ((*DOWN_DB, "migrate"), "SourceUnavailable"),
        ((*DOWN_DB, "import-fixtures", str(BUNDLED)), "SourceUnavailable"),
        ((*DOWN_DB, "--source", "database", "export", "-"), "SourceUnavailable"),
        ((*DOWN_DB, "--source", "database", "list"), "SourceUnavailable"),
        ((*DOWN_DB, "--source", "database", "show", "x"), "SourceUnavailable"),
        ((*DOWN_DB, "--source", "database", "status"), "SourceUnavailable"),
        ((*DOWN_DB, "enable", "x"), "SourceUnavailable"),
        ((*DOWN_DB, "disable", "x"), "SourceUnavailable"),
        ((*DOWN_DB, "reload"), "SourceUnavailable"),
        ((*DOWN_DB, "health"), "SourceUnavailable"),
        ((*DOWN_DB, "audit"), "SourceUnavailable"),
        ((*DOWN_DB, "token", "create", "x", "--role", "viewer"), "SourceUnavailable"),
        ((*DOWN_DB, "token", "list"), "SourceUnavailable"),
        ((*DOWN_DB, "token", "revoke", "x"), "SourceUnavailable"),
        ((*DOWN_DB, "policy", "apply", str(BUNDLED / "policies" / "support_en.json")), None),
        ((*DOWN_DB, "policy", "delete", "x"), "SourceUnavailable"),
        (("disable", "x", "--url", NOWHERE), "ServerUnreachable"),
        (("health", "--url", NOWHERE), "ServerUnreachable"),
        (("policy", "list", "--url", NOWHERE), "ServerUnreachable"),
        (("policy", "show", "x", "--url", NOWHERE), "ServerUnreachable"),
        ((*FIXTURES, "invoke", "normalize_text"), "NatsUnavailable"),
        ((*FIXTURES, "policy", "run", "support_en", "--message", "{}"), "NatsUnavailable"),
    ],
    ids=lambda v: " ".join(a for a in v if "/" not in a) if isinstance(v, tuple) else str(v),
)
def test_a_failure_exits_1_with_a_json_error(
    tmp_path: Path, args: tuple[str, ...], error: str | None
) -> None:
    """The database, the server or NATS out of reach: exit 1 and the error as the API
    answers it on stdout, its password masked (`None`: SourceUnavailable too)."""
    result = extreg(tmp_path, *args, "--json")
    answer = json.loads(result.stdout or "null")
    assert (1, error or "SourceUnavailable") == (result.returncode, answer["error"]), outcome(
        result
    )
    assert (True, False) == (bool(answer["detail"]), SECRET in result.stdout + result.stderr)


def bad_fixtures(tmp_path: Path) -> str:
    folder = tmp_path / "bad"
    shutil.copytree(BUNDLED, folder)
    (folder / "zz.json").write_text('{"id": "x", "type": "pre"}', encoding="utf-8")
    return str(folder)


@pytest.mark.parametrize(
    ("args", "error"),
    [
        (("show",), "ConfigError"),  # bad usage: no ID
        (("list", "--bogus"), "ConfigError"),
        (("audit", "--limit", "0"), "ConfigError"),
        (("--source", "nowhere", "status"), "ConfigError"),
        (("--database-url", f"mysql://u:{SECRET}@h/x", "migrate"), "ConfigError"),
        ((*FIXTURES, "show", "nosuch"), "ExtensionNotFound"),
        ((*FIXTURES, "import-fixtures", "BAD"), "FixtureError"),
        ((*FIXTURES, "--source", "nowhere", "export", "-"), "ConfigError"),
        ((*FIXTURES, "enable", "mask_pii"), "Conflict"),  # fixtures are read-only
        ((*FIXTURES, "disable", "mask_pii"), "Conflict"),
        ((*FIXTURES, "reload"), "Conflict"),
        ((*FIXTURES, "health"), "Conflict"),
        ((*FIXTURES, "audit", "a", "--policy", "b"), "ConfigError"),
        ((*FIXTURES, "invoke", "normalize_text", "--payload", '{"text": 1}'), "ConfigError"),
        ((*FIXTURES, "token", "create", "x", "--role", "god"), "ConfigError"),
        ((*FIXTURES, "token", "list"), "ConfigError"),  # no database: a tokens file
        ((*FIXTURES, "token", "revoke", "x"), "ConfigError"),
        ((*FIXTURES, "policy", "list", "--url", "ftp://x"), None),
        ((*FIXTURES, "policy", "show", "nosuch"), "PolicyNotFound"),
        ((*FIXTURES, "policy", "apply", "MISSING"), "FixtureError"),
        ((*FIXTURES, "policy", "delete", "support_en"), "Conflict"),
        ((*FIXTURES, "policy", "run", "nosuch", "--message", "{}"), "PolicyNotFound"),
        ((*FIXTURES, "policy", "run", "support_en", "--message", "[1]"), "ConfigError"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, tuple) else str(v),
)
def test_bad_input_exits_2_with_a_json_error(
    tmp_path: Path, args: tuple[str, ...], error: str | None
) -> None:
    """Bad usage or bad input: exit 2 and the error as the API answers it on stdout, nothing
    on stderr, never a traceback (`None`: any class of the tree)."""
    places = {"BAD": bad_fixtures(tmp_path), "MISSING": str(tmp_path / "missing.json")}
    result = extreg(tmp_path, *(places.get(a, a) for a in args), "--json")
    answer = json.loads(result.stdout or "null")
    assert (2, "") == (result.returncode, result.stderr), outcome(result)
    assert error in (None, answer["error"]), outcome(result)
    assert SECRET not in result.stdout


def test_validate_json_of_a_bad_folder_is_its_report(tmp_path: Path) -> None:
    """`validate --json` answers a bad folder with its report (the data it exists to give),
    not an error answer: {"valid": false, "problems": [...]} and exit 2."""
    report = as_json(tmp_path, "validate", bad_fixtures(tmp_path), code=2)
    assert (False, 1) == (report["valid"], len(report["problems"]))


def test_tables_are_tab_separated_and_whole_in_a_pipe(tmp_path: Path) -> None:
    """Without a terminal, `list` prints a header line and one tab-separated line per
    record, every cell whole (no `beamline.e…`); `show` prints field and value lines."""
    listed = run(tmp_path, "list")
    lines = [line.split("\t") for line in listed.stdout.splitlines()]
    assert ["id", "type", "version", "subject", "timeout", "retry", "enabled"] == lines[0]
    assert [
        "normalize_text",
        "pre",
        "v1",
        "beamline.ext.pre.normalize_text.v1",
        "100 ms",
        "0",
        "yes",
    ] in lines
    assert "…" not in listed.stdout
    shown = run(tmp_path, "show", "normalize_text")
    assert ["subject", "beamline.ext.pre.normalize_text.v1"] in [
        line.split("\t") for line in shown.stdout.splitlines()
    ]


def test_log_lines_below_warning_need_verbose(db_url: str, tmp_path: Path) -> None:
    """A database command logs nothing on stderr by itself; with -v its info events appear
    (JSON lines, stderr being no terminal), and stdout is the same either way."""
    assert 0 == run(tmp_path, "import-fixtures", str(BUNDLED), db=db_url).returncode
    plain = run(tmp_path, "list", db=db_url)
    loud = run(tmp_path, "-v", "list", db=db_url)
    assert (0, "", 0) == (plain.returncode, plain.stderr, loud.returncode), outcome(plain)
    events = [json.loads(line) for line in loud.stderr.splitlines()]
    assert events and {"info"} <= {e["level"] for e in events}, outcome(loud)
    assert plain.stdout == loud.stdout


def test_health_table_leads_with_status_and_the_recent_window(db_url: str, tmp_path: Path) -> None:
    """`health` in a pipe: the header names the columns, status and the recent window (what
    status judges by) before the all-time figures; a row per extension."""
    assert 0 == run(tmp_path, "import-fixtures", str(BUNDLED), db=db_url).returncode
    report = as_json(tmp_path, "health", db=db_url)
    lines = run(tmp_path, "health", db=db_url).stdout.splitlines()
    header = lines[0].split("\t")
    assert ["id", "type", "status", "circuit", "recent calls", "recent success"] == header[:6]
    assert len(report["extensions"]) == len([line for line in lines[1:] if "\t" in line])
    assert "error" not in flat(header[-1])
