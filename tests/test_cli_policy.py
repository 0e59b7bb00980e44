"""`extreg policy list|show|apply|delete|run`, and policies in `import-fixtures`, `export` and
`validate` (SPEC.md, "Command line" and "Routing policies and the pipeline"), run as the
installed console script on a real PostgreSQL and, for runs, real NATS serving the sample
extensions; `--url` against a real server on the same database and NATS."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import ROLE_TOKENS, InvokingServer, make_tokens, policy_audit, sql
from cli_helpers import ACTOR, flat, last_line, outcome, run
from helpers import make_settings

from extreg.adapters.fixtures import load_fixtures
from extreg.adapters.migrate import migrate
from extreg.local.samples import SampleRunner
from extreg.settings import Settings
from testsupport.pgprocess import PostgresProcess

BUNDLED = Path(__file__).parents[1] / "src" / "extreg" / "fixtures"
LIMITS: dict[str, Any] = {"max_timeout_ms": 60_000, "max_retries": 10}
CARD = "my card is 4111 1111 1111 1111"

ROUTE: dict[str, Any] = {
    "policy_id": "route_b",
    "tenant_id": "acme",
    "pre": [{"id": "normalize_text", "config": {"lowercase": True}}],
    "validators": [{"id": "pii_guard", "on_fail": "warn"}],
    "providers": ["test_provider", "openai:gpt-4.1-mini"],
}


# -- helpers -------------------------------------------------------------------------------


def samples_only(folder: Path) -> Path:
    """A fixtures folder with the four sample extensions and no policies."""
    folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BUNDLED / "samples.json", folder / "samples.json")
    return folder


def import_samples(tmp_path: Path, db_url: str) -> None:
    result = run(tmp_path, "import-fixtures", str(samples_only(tmp_path / "samples")), db=db_url)
    assert 0 == result.returncode, outcome(result)


def stored_policies(db_url: str) -> list[str]:
    return [r[0] for r in sql(db_url, "SELECT policy_id FROM routing_policies ORDER BY 1")]


def write(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


# -- apply, list, show, delete -------------------------------------------------------------


def test_apply_list_show_delete_round_trip_is_audited(db_url: str, tmp_path: Path) -> None:
    """`policy apply` creates, then leaves alone, then updates a policy from a YAML file (with
    its complexity warnings); `list` and `show` print it; `delete` removes it; each write is an
    audit row by the CLI's actor, and the rows outlive the policy."""
    import_samples(tmp_path, db_url)
    file = tmp_path / "route.yaml"
    file.write_text(json.dumps(ROUTE), encoding="utf-8")  # JSON is YAML

    created = run(tmp_path, "policy", "apply", str(file), db=db_url)
    assert (0, "route_b: created") == (created.returncode, created.stdout.strip()), outcome(created)
    again = run(tmp_path, "policy", "apply", str(file), "--json", db=db_url)
    assert 0 == again.returncode, outcome(again)
    assert {
        "dry_run": False,
        "created": [],
        "updated": [],
        "unchanged": ["route_b"],
        "warnings": {},
    } == json.loads(again.stdout)

    long = {**ROUTE, "pre": [{"id": "normalize_text"}] * 3, "post": [{"id": "mask_pii"}] * 2}
    updated = run(tmp_path, "policy", "apply", str(write(file, long)), db=db_url)
    assert (0, "route_b: updated") == (updated.returncode, updated.stdout.strip()), outcome(updated)
    assert "warning: route_b: pre: 3 items, more than the recommended 2" in flat(updated.stderr)

    listed = run(tmp_path, "policy", "list", "--json", db=db_url)
    assert 0 == listed.returncode, outcome(listed)
    [only] = json.loads(listed.stdout)
    assert ("route_b", "acme", True, []) == (
        only["policy_id"],
        only["tenant_id"],
        only["enabled"],
        only["unusable"],
    )
    assert ["test_provider", "openai:gpt-4.1-mini"] == only["providers"]
    table = run(tmp_path, "policy", "list", db=db_url)
    assert "providers: test_provider, openai:gpt-4.1-mini" in flat(table.stdout), outcome(table)

    shown = run(tmp_path, "policy", "show", "route_b", "--json", db=db_url)
    assert 0 == shown.returncode, outcome(shown)
    data = json.loads(shown.stdout)
    assert (3, "warn", ACTOR) == (
        len(data["pre"]),
        data["validators"][0]["on_fail"],
        data["updated_by"],
    )
    text = run(tmp_path, "policy", "show", "route_b", db=db_url)
    assert '"lowercase": true' not in text.stdout  # the update replaced the whole policy
    assert "openai:gpt-4.1-mini" in text.stdout

    deleted = run(tmp_path, "policy", "delete", "route_b", db=db_url)
    assert (0, "route_b deleted") == (deleted.returncode, deleted.stdout.strip()), outcome(deleted)
    gone = run(tmp_path, "policy", "show", "route_b", db=db_url)
    assert (2, "error: policy route_b: no such policy") == (
        gone.returncode,
        last_line(gone.stderr),
    )
    twice = run(tmp_path, "policy", "delete", "route_b", db=db_url)
    assert (2, "error: policy route_b: no such policy") == (
        twice.returncode,
        last_line(twice.stderr),
    )
    assert [] == stored_policies(db_url)
    assert [
        ("policy_create", ACTOR),
        ("policy_update", ACTOR),
        ("policy_delete", ACTOR),
    ] == policy_audit(db_url, "route_b")


def test_audit_of_an_extension_leaves_out_a_same_named_policy(db_url: str, tmp_path: Path) -> None:
    """`extreg audit pii_guard` lists the extension's rows only, though a policy is named
    `pii_guard` too; `audit --policy pii_guard` lists that policy's rows only; `audit` alone
    both; an id and --policy together exit 2."""
    import_samples(tmp_path, db_url)
    file = write(tmp_path / "p.json", {**ROUTE, "policy_id": "pii_guard"})
    assert 0 == run(tmp_path, "policy", "apply", str(file), db=db_url).returncode

    def actions(*args: str) -> list[str]:
        result = run(tmp_path, "audit", *args, "--json", db=db_url)
        assert 0 == result.returncode, outcome(result)
        return [r["action"] for r in json.loads(result.stdout) if r["extension_id"] == "pii_guard"]

    assert ["create"] == actions("pii_guard")
    assert ["policy_create"] == actions("--policy", "pii_guard")
    assert ["policy_create", "create"] == actions()
    both = run(tmp_path, "audit", "pii_guard", "--policy", "pii_guard", db=db_url)
    assert (2, "error: give an extension id or --policy, not both") == (
        both.returncode,
        last_line(both.stderr),
    ), outcome(both)


def test_apply_dry_run_writes_nothing(db_url: str, tmp_path: Path) -> None:
    """`apply --dry-run` says what it would do and writes nothing."""
    import_samples(tmp_path, db_url)
    result = run(
        tmp_path, "policy", "apply", str(write(tmp_path / "p.json", ROUTE)), "--dry-run", db=db_url
    )
    assert (0, "route_b: would be created") == (result.returncode, result.stdout.strip())
    assert ([], []) == (stored_policies(db_url), policy_audit(db_url, "route_b"))


def test_apply_of_a_bad_policy_exits_2_naming_file_item_and_field(
    db_url: str, tmp_path: Path
) -> None:
    """A file whose second policy breaks a rule (or repeats the first's id) exits 2 naming the
    file, the item and every field at fault, without a traceback, and writes nothing, not even
    the good first one."""
    import_samples(tmp_path, db_url)
    bad = {"policy_id": "bad", "pre": [{"id": "normalize_text", "mode": "sometimes"}], "colour": 1}
    file = write(tmp_path / "two.json", [ROUTE, bad])
    result = run(tmp_path, "policy", "apply", str(file), db=db_url)
    assert 2 == result.returncode, outcome(result)
    text = flat(result.stderr)
    assert f"{file} record #2 (bad): field colour: unknown field" in text
    assert f"{file} record #2 (bad): field pre[0].mode: must be one of required, optional" in text
    assert "Traceback" not in result.stderr
    twice = run(tmp_path, "policy", "apply", str(write(file, [ROUTE, ROUTE])), db=db_url)
    assert 2 == twice.returncode, outcome(twice)
    assert f"{file} record #2 (route_b): field policy_id: duplicate policy_id" in flat(twice.stderr)
    assert ([], []) == (stored_policies(db_url), policy_audit(db_url, "route_b"))


def test_apply_of_a_policy_naming_an_unknown_extension_writes_nothing(
    db_url: str, tmp_path: Path
) -> None:
    """Ids are checked against the database in the write: an unknown id, or one of another
    stage's type, exits 2 naming the policy and the field, and nothing of the file is written."""
    import_samples(tmp_path, db_url)
    wrong = {"policy_id": "wrong", "pre": [{"id": "nope"}], "post": [{"id": "pii_guard"}]}
    file = write(tmp_path / "two.json", [ROUTE, wrong])
    result = run(tmp_path, "policy", "apply", str(file), db=db_url)
    assert 2 == result.returncode, outcome(result)
    text = flat(result.stderr)
    assert "policy 'wrong'" in text
    assert "pre[0].id: no extension 'nope'" in text
    assert "post[0].id: extension 'pii_guard' is a validator extension, not a post" in text
    assert "Traceback" not in result.stderr
    assert [] == stored_policies(db_url)


@pytest.mark.parametrize(
    ("name", "content", "problem"),
    [
        ("missing.json", None, "cannot read file: No such file or directory"),
        ("empty.yaml", "", "file is empty"),
        ("broken.yaml", "policy_id: [", "invalid YAML"),
        ("twice.json", '{"policy_id": "a", "policy_id": "b"}', "invalid JSON"),
        ("number.json", "7", "expected a policy object or a list of them, got a number"),
    ],
)
def test_apply_of_an_unreadable_file_exits_2_naming_it(
    tmp_path: Path, name: str, content: str | None, problem: str
) -> None:
    """A file that cannot be read as strict JSON/YAML exits 2 with the file's name and why,
    without a traceback, before any database is touched (none is configured here)."""
    file = tmp_path / name
    if content is not None:
        file.write_text(content, encoding="utf-8")
    result = run(tmp_path, "policy", "apply", str(file))
    assert 2 == result.returncode, outcome(result)
    assert f"error: {file}: {problem}" in flat(result.stderr)
    assert "Traceback" not in result.stderr


def test_writes_are_refused_on_fixtures(tmp_path: Path) -> None:
    """On the read-only fixtures source `apply` and `delete` exit 2 and say why."""
    file = write(tmp_path / "p.json", ROUTE)
    for args in (("apply", str(file)), ("delete", "support_en")):
        result = run(tmp_path, "policy", *args)
        assert (2, True) == (result.returncode, "fixtures are read-only" in result.stderr), outcome(
            result
        )


def test_list_names_what_makes_a_policy_unusable(db_url: str, tmp_path: Path) -> None:
    """A policy whose extension was disabled since is listed with the reason it cannot run."""
    import_samples(tmp_path, db_url)
    assert (
        0
        == run(
            tmp_path, "policy", "apply", str(write(tmp_path / "p.json", ROUTE)), db=db_url
        ).returncode
    )
    assert 0 == run(tmp_path, "disable", "pii_guard", db=db_url).returncode
    listed = run(tmp_path, "policy", "list", db=db_url)
    assert "validators[0].id: extension 'pii_guard' is disabled" in flat(listed.stdout), outcome(
        listed
    )


# -- validate, import-fixtures, export -----------------------------------------------------


def test_validate_reports_a_policy_naming_an_unknown_extension(tmp_path: Path) -> None:
    """`validate` names the policy file, the item and the field of a policy whose id names no
    extension of the folder, and exits 2; a good folder counts its policies."""
    folder = samples_only(tmp_path / "fx")
    (folder / "policies").mkdir()
    write(folder / "policies" / "bad.json", {"policy_id": "bad", "pre": [{"id": "nope"}]})
    result = run(tmp_path, "validate", str(folder))
    assert 2 == result.returncode, outcome(result)
    assert "policies/bad.json record #1 (bad): field pre[0].id: no extension 'nope'" in flat(
        result.stderr
    )
    as_json = run(tmp_path, "validate", str(folder), "--json")
    assert 2 == as_json.returncode
    assert {
        "valid": False,
        "problems": ["policies/bad.json record #1 (bad): field pre[0].id: no extension 'nope'"],
    } == json.loads(as_json.stdout)
    good = run(tmp_path, "validate", str(BUNDLED), "--json")
    assert {"valid": True, "count": 4, "policies": 1} == json.loads(good.stdout), outcome(good)


def test_import_fixtures_of_the_bundled_samples_imports_support_en(
    db_url: str, tmp_path: Path
) -> None:
    """The bundled folder imports its four extensions and then `support_en` (a dry run first
    writes nothing and says it would create it); importing it again leaves it unchanged."""
    dry = run(tmp_path, "import-fixtures", str(BUNDLED), "--dry-run", db=db_url)
    assert 0 == dry.returncode, outcome(dry)
    assert "policies would be created: 1 (support_en)" in flat(dry.stdout)
    assert [] == stored_policies(db_url)

    first = run(tmp_path, "import-fixtures", str(BUNDLED), "--json", db=db_url)
    assert 0 == first.returncode, outcome(first)
    report = json.loads(first.stdout)
    assert (4, {"created": ["support_en"], "updated": [], "unchanged": []}) == (
        len(report["created"]),
        report["policies"],
    )
    assert ["support_en"] == stored_policies(db_url)
    assert [("policy_create", ACTOR)] == policy_audit(db_url, "support_en")

    dry_again = run(tmp_path, "import-fixtures", str(BUNDLED), "--dry-run", "--json", db=db_url)
    assert {"created": [], "updated": [], "unchanged": ["support_en"]} == json.loads(
        dry_again.stdout
    )["policies"], outcome(dry_again)
    again = run(tmp_path, "import-fixtures", str(BUNDLED), db=db_url)
    assert "policies unchanged: 1 (support_en)" in flat(again.stdout), outcome(again)
    assert [("policy_create", ACTOR)] == policy_audit(db_url, "support_en")


def test_import_fixtures_with_a_bad_policy_writes_nothing(db_url: str, tmp_path: Path) -> None:
    """A folder whose only problem is in a policy writes neither its extensions nor its
    policies: the whole folder is checked before the first write."""
    folder = samples_only(tmp_path / "fx")
    (folder / "policies").mkdir()
    write(folder / "policies" / "p.json", {**ROUTE, "validators": [{"id": "normalize_text"}]})
    result = run(tmp_path, "import-fixtures", str(folder), db=db_url)
    assert 2 == result.returncode, outcome(result)
    assert (
        "policies/p.json record #1 (route_b): field validators[0].id: extension 'normalize_text'"
        " is a pre extension, not a validator"
    ) in flat(result.stderr)
    assert [(0,)] == sql(db_url, "SELECT count(*) FROM extensions")
    assert [] == stored_policies(db_url)


def test_export_then_import_round_trips_policies(
    db_url: str, pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """`export DIR` writes DIR/policies/<id>.json, which `import-fixtures DIR` reads back into
    another database as the same policies; `export -` prints {"extensions", "policies"}."""
    assert 0 == run(tmp_path, "import-fixtures", str(BUNDLED), db=db_url).returncode
    file = write(tmp_path / "route.json", ROUTE)
    assert 0 == run(tmp_path, "policy", "apply", str(file), db=db_url).returncode

    exported = tmp_path / "exported"
    result = run(tmp_path, "export", str(exported), db=db_url)
    assert 0 == result.returncode, outcome(result)
    assert "exported 4 extensions and 2 policies" in result.stdout  # what it did: stdout
    assert ["route_b.json", "support_en.json"] == sorted(
        p.name for p in (exported / "policies").iterdir()
    )
    original = load_fixtures(BUNDLED, **LIMITS).policies
    reread = {p.policy_id: p for p in load_fixtures(exported, **LIMITS).policies}
    assert original == [reread["support_en"]]

    other = pg_server.create_database(f"cli_policy_{uuid.uuid4().hex[:12]}")
    migrate(other)
    imported = run(tmp_path, "import-fixtures", str(exported), "--json", db=other)
    assert {"created": ["route_b", "support_en"], "updated": [], "unchanged": []} == json.loads(
        imported.stdout
    )["policies"], outcome(imported)
    listed = [
        json.loads(run(tmp_path, "policy", "list", "--json", db=url).stdout)
        for url in (db_url, other)
    ]
    kept = ("created_at", "updated_at")
    assert [{k: v for k, v in p.items() if k not in kept} for p in listed[0]] == [
        {k: v for k, v in p.items() if k not in kept} for p in listed[1]
    ]

    to_stdout = run(tmp_path, "export", "-", db=other)
    assert 0 == to_stdout.returncode, outcome(to_stdout)
    document = json.loads(to_stdout.stdout)
    assert ["extensions", "policies"] == sorted(document)
    assert 4 == len(document["extensions"])
    assert json.loads((exported / "policies" / "route_b.json").read_text()) == next(
        p for p in document["policies"] if p["policy_id"] == "route_b"
    )


# -- run -----------------------------------------------------------------------------------


def test_run_prints_the_final_message_and_provider(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """`policy run support_en` on the bundled fixtures runs the pipeline from here: the text
    is normalized, the provider answers, post masks; it prints the final message, the
    provider and every step, in text and as JSON."""
    with_mail = json.dumps({"payload": "Hello  WORLD, mail me at ann@example.com"})
    result = run(
        tmp_path, "policy", "run", "support_en", "--message", with_mail, "--json", nats_url=nats_url
    )
    assert 0 == result.returncode, outcome(result)
    answer = json.loads(result.stdout)
    assert "test_provider" == answer["provider_id"]
    assert "Test response: hello world, mail me at [EMAIL_MASKED]" == answer["message"]["payload"]
    assert ("true", "true") == (
        answer["message"]["metadata"]["normalized"],
        answer["message"]["metadata"]["pii_masked"],
    )
    assert [
        ("pre", "normalize_text", "ok"),
        ("validator", "pii_guard", "ok"),
        ("provider", "test_provider", "ok"),
        ("post", "mask_pii", "ok"),
    ] == [(s["stage"], s["id"], s["status"]) for s in answer["steps"]]

    message = json.dumps({"payload": "Hello  WORLD"})
    text = run(tmp_path, "policy", "run", "support_en", "--message", message, nats_url=nats_url)
    assert 0 == text.returncode, outcome(text)
    assert '"payload": "Test response: hello world"' in text.stdout
    assert "provider_id: test_provider" in text.stdout
    assert "mask_pii" in text.stdout  # the steps table


def test_run_of_a_card_number_is_blocked_and_exits_1(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """A message with a card number is blocked by pii_guard: exit 1, the error's class, the
    validator, its reason `pii_detected` and the steps so far; with --json the same as the
    API's error answer on stdout."""
    message = json.dumps({"payload": CARD})
    result = run(tmp_path, "policy", "run", "support_en", "--message", message, nats_url=nats_url)
    assert 1 == result.returncode, outcome(result)
    text = flat(result.stderr)
    assert "ValidatorBlocked by pii_guard: pii_detected" in text
    assert "rejected" in text  # the steps table
    assert "error: policy support_en: pii_detected" in text
    assert "Traceback" not in result.stderr

    as_json = run(
        tmp_path, "policy", "run", "support_en", "--message", message, "--json", nats_url=nats_url
    )
    assert 1 == as_json.returncode, outcome(as_json)
    body = json.loads(as_json.stdout)
    assert ("ValidatorBlocked", "pii_detected", "pii_guard") == (
        body["error"],
        body["reason"],
        body["extension_id"],
    )
    assert [("pre", "ok"), ("validator", "rejected")] == [
        (s["stage"], s["status"]) for s in body["steps"]
    ]


def test_run_of_a_disabled_policy_exits_1(db_url: str, tmp_path: Path) -> None:
    """A disabled policy is refused before anything is sent (NATS is a closed port here):
    exit 1, saying so."""
    import_samples(tmp_path, db_url)
    off = write(tmp_path / "off.json", {**ROUTE, "enabled": False})
    assert 0 == run(tmp_path, "policy", "apply", str(off), db=db_url).returncode
    result = run(tmp_path, "policy", "run", "route_b", "--message", "{}", db=db_url)
    assert 1 == result.returncode, outcome(result)
    assert "PolicyDisabled: policy is disabled" in result.stderr
    assert "error: policy route_b: policy is disabled" == last_line(result.stderr)


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("nope", "--message", "{}"), 2, "error: policy nope: no such policy"),
        (("support_en", "--message", "{nope"), 2, "error: --message is not valid JSON"),
        (("support_en", "--message", "[1]"), 2, "error: --message must be a JSON object"),
        (
            ("support_en", "--message", "{}", "--context", '"t"'),
            2,
            "error: --context must be a JSON object",
        ),
        (
            ("support_en", "--message", "{}", "--context", '{"tenant_id": ["acme"]}'),
            2,
            "error: --context: tenant_id: must be a string of at most 255 characters",
        ),
        (
            ("support_en", "--message", "{}", "--context", '{"dry_run": true}'),
            2,
            "error: --context: dry_run: not for a policy run",
        ),
        (("support_en",), 2, "Missing option '--message'"),
    ],
)
def test_run_bad_input_exits_2(
    tmp_path: Path, args: tuple[str, ...], code: int, message: str
) -> None:
    """An unknown policy, a message or context that is no JSON object, or no message at all,
    exit 2 with what is wrong and no traceback (nothing is sent: NATS is a closed port)."""
    result = run(tmp_path, "policy", "run", *args)
    assert (code, True) == (result.returncode, message in flat(result.stderr)), outcome(result)
    assert "Traceback" not in result.stderr


# -- through a server (--url) ------------------------------------------------------------


@pytest.fixture
def server(
    db_url: str, tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> Iterator[tuple[str, dict[str, str]]]:
    """A live server on `db_url` (holding the four samples) and the session's NATS; its URL
    and a token per role."""
    import_samples(tmp_path, db_url)
    tokens = asyncio.run(make_tokens(db_url))
    settings: Settings = make_settings(
        tmp_path, source="database", database_url=db_url, nats_url=nats_url
    )
    with InvokingServer(settings) as live:
        yield live.url, tokens


def test_policy_commands_through_the_server(
    server: tuple[str, dict[str, str]], db_url: str, tmp_path: Path
) -> None:
    """With --url/--token every policy command acts through the server: apply (created, then
    unchanged), list, show, run (a result, and a block that exits 1 with the validator's
    reason), delete; writes are audited with the token's name."""
    url, tokens = server

    def through(role: str, *args: str) -> subprocess.CompletedProcess[str]:
        return run(tmp_path, "policy", *args, "--url", url, "--token", tokens[role])

    file = write(tmp_path / "p.json", {**ROUTE, "validators": [{"id": "pii_guard"}]})
    created = through("admin", "apply", str(file))
    assert (0, "route_b: created") == (created.returncode, created.stdout.strip()), outcome(created)
    again = through("admin", "apply", str(file))
    assert (0, "route_b: unchanged") == (again.returncode, again.stdout.strip()), outcome(again)

    listed = through("viewer", "list", "--json")
    assert ["route_b"] == [p["policy_id"] for p in json.loads(listed.stdout)], outcome(listed)
    shown = through("viewer", "show", "route_b", "--json")
    assert ("acme", []) == (
        json.loads(shown.stdout)["tenant_id"],
        json.loads(shown.stdout)["unusable"],
    ), outcome(shown)
    local = run(tmp_path, "policy", "show", "route_b", "--json", db=db_url)
    assert json.loads(local.stdout) == {
        k: v for k, v in json.loads(shown.stdout).items() if k != "recent_runs"
    }, outcome(local)  # the same data either way, but the server's recent runs

    ran = through("operator", "run", "route_b", "--message", '{"payload": "Hi  THERE"}', "--json")
    assert 0 == ran.returncode, outcome(ran)
    answer = json.loads(ran.stdout)
    assert ("test_provider", "acme") == (answer["provider_id"], answer["context"]["tenant_id"])
    blocked = through("operator", "run", "route_b", "--message", json.dumps({"payload": CARD}))
    assert 1 == blocked.returncode, outcome(blocked)
    assert "ValidatorBlocked by pii_guard: pii_detected" in flat(blocked.stderr)
    assert "rejected" in blocked.stderr  # the steps table, of the steps the client rebuilt
    as_json = through(
        "operator", "run", "route_b", "--message", json.dumps({"payload": CARD}), "--json"
    )
    assert 1 == as_json.returncode, outcome(as_json)
    assert [("pre", "normalize_text", "ok"), ("validator", "pii_guard", "rejected")] == [
        (s["stage"], s["id"], s["status"]) for s in json.loads(as_json.stdout)["steps"]
    ]

    refused = through("viewer", "delete", "route_b")
    assert (1, True) == (refused.returncode, "403" in refused.stderr), outcome(refused)
    deleted = through("admin", "delete", "route_b")
    assert (0, "route_b deleted") == (deleted.returncode, deleted.stdout.strip()), outcome(deleted)
    gone = through("viewer", "show", "route_b")
    assert (2, "error: policy route_b: no such policy") == (gone.returncode, last_line(gone.stderr))
    admin = ROLE_TOKENS["admin"]
    assert [("policy_create", admin), ("policy_delete", admin)] == policy_audit(db_url, "route_b")
    trail = run(
        tmp_path,
        "audit",
        "--policy",
        "route_b",
        "--json",
        "--url",
        url,
        "--token",
        tokens["viewer"],
    )
    assert ["policy_delete", "policy_create"] == [r["action"] for r in json.loads(trail.stdout)], (
        outcome(trail)
    )
