"""The CLI acting through a running server (`--url`/`--token` or EXTREG_URL/EXTREG_TOKEN), and
the token commands: real `extreg serve` and `extreg` processes on a real PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from api_helpers import ROLE_TOKENS, make_tokens, sql
from cli_helpers import extreg, flat, start_server, stop_server

from extreg.adapters.migrate import migrate
from extreg.auth import hash_token
from testsupport.pgprocess import PostgresProcess, free_port


@dataclass
class Server:
    url: str
    db_url: str
    tokens: dict[str, str]
    proc: subprocess.Popen[str]
    stdout: Path

    def opts(self, role: str) -> list[str]:
        return ["--url", self.url, "--token", self.tokens[role]]


@pytest.fixture(scope="module")
def server(
    pg_server: PostgresProcess, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """One `extreg serve` on a database holding `alpha` (enabled) and `beta` (disabled), with
    a token per role."""
    tmp = tmp_path_factory.mktemp("cli-client")
    db_url = pg_server.create_database(f"cli_client_{uuid.uuid4().hex[:8]}")
    migrate(db_url)
    for ext_id, enabled in (("alpha", True), ("beta", False)):
        sql(
            db_url,
            "INSERT INTO extensions (id, type, subject, timeout_ms, enabled)"
            " VALUES (%s, 'pre', %s, 100, %s)",
            (ext_id, f"beamline.ext.pre.{ext_id}.v1", enabled),
        )
    tokens = asyncio.run(make_tokens(db_url))
    proc, url, out = start_server(tmp, "--database-url", db_url)
    yield Server(url, db_url, tokens, proc, out)
    assert 0 == stop_server(proc)


def test_disable_and_enable_through_the_server(server: Server, tmp_path: Path) -> None:
    """`disable`/`enable --url --token` change the record through the server, audited with
    the token's name, and say what they did."""
    disabled = extreg(tmp_path, "disable", "alpha", *server.opts("operator"))
    assert (0, "alpha disabled") == (disabled.returncode, disabled.stdout.strip()), disabled.stderr
    assert [(False,)] == sql(server.db_url, "SELECT enabled FROM extensions WHERE id = 'alpha'")
    enabled = extreg(tmp_path, "enable", "alpha", *server.opts("operator"))
    assert (0, "alpha enabled") == (enabled.returncode, enabled.stdout.strip())
    rows = sql(
        server.db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'alpha' ORDER BY changed_at",
    )
    operator = ROLE_TOKENS["operator"]
    assert [("disable", operator), ("enable", operator)] == rows[-2:]


def test_disable_twice_through_the_server_says_already(server: Server, tmp_path: Path) -> None:
    """Through the server too, a second `disable` says the extension already was (JSON
    outcome "unchanged") and writes no audit row; the first says "updated"."""
    opts = server.opts("operator")
    count = "SELECT count(*) FROM extension_audit_log WHERE extension_id = 'alpha'"
    before = sql(server.db_url, count)[0][0]
    first = extreg(tmp_path, "disable", "alpha", *opts, "--json")
    again = extreg(tmp_path, "disable", "alpha", *opts, "--json")
    text = extreg(tmp_path, "disable", "alpha", *opts)
    assert ["updated", "unchanged"] == [json.loads(r.stdout)["outcome"] for r in (first, again)]
    assert (0, "alpha already disabled") == (text.returncode, text.stdout.strip()), text.stderr
    assert before + 1 == sql(server.db_url, count)[0][0]
    assert 0 == extreg(tmp_path, "enable", "alpha", *opts).returncode


def test_reload_through_the_server(server: Server, tmp_path: Path) -> None:
    """`reload --url` reloads the server and reports what it loaded."""
    result = extreg(tmp_path, "reload", *server.opts("operator"))
    assert (0, "reloaded: 2 extensions from database") == (result.returncode, result.stdout.strip())


def test_audit_and_health_through_the_server_with_environment(
    server: Server, tmp_path: Path
) -> None:
    """EXTREG_URL/EXTREG_TOKEN work like the flags: `audit --json` and `health --json` answer
    from the server."""
    env = {"EXTREG_URL": server.url, "EXTREG_TOKEN": server.tokens["viewer"]}
    extreg(tmp_path, "disable", "beta", *server.opts("admin"))  # already disabled: no audit row
    extreg(tmp_path, "enable", "beta", *server.opts("admin"))
    audit = extreg(tmp_path, "audit", "beta", "--json", **env)
    assert 0 == audit.returncode, audit.stderr
    assert [("enable", ROLE_TOKENS["admin"])] == [
        (r["action"], r["changed_by"]) for r in json.loads(audit.stdout)
    ][:1]
    health = extreg(tmp_path, "health", "--json", **env)
    assert 0 == health.returncode, health.stderr
    report = json.loads(health.stdout)
    assert (["alpha", "beta"], 2) == (
        [e["id"] for e in report["extensions"]],
        report["summary"]["total"],
    )
    one = extreg(tmp_path, "health", "alpha", "--json", **env)
    assert ("alpha", "disabled") == (
        json.loads(one.stdout)["id"],
        json.loads(one.stdout)["health"]["circuit_breaker_state"],
    )


@pytest.mark.parametrize(
    ("token", "message"),
    [
        (
            "extreg_not-a-real-token",
            "the server refused the token (401 unauthorized): check --token",
        ),
        ("", "no token given: pass --token or set EXTREG_TOKEN"),
    ],
)
def test_a_bad_token_exits_1_with_a_clear_message(
    server: Server, tmp_path: Path, token: str, message: str
) -> None:
    """A wrong or missing token exits 1, says what is wrong, and never prints the token."""
    result = extreg(tmp_path, "disable", "alpha", "--url", server.url, "--token", token)
    assert (1, True) == (result.returncode, message in flat(result.stderr)), result.stderr
    assert "not-a-real-token" not in result.stdout + result.stderr


def test_a_too_small_role_exits_1(server: Server, tmp_path: Path) -> None:
    """A viewer's `disable` exits 1 with the server's 403 reason."""
    result = extreg(tmp_path, "disable", "alpha", *server.opts("viewer"))
    expected = (
        "not allowed (403 forbidden): token 'vera-viewer' has role viewer; this needs operator"
    )
    assert (1, expected) == (result.returncode, flat(result.stderr).removeprefix("error: "))


def test_a_missing_extension_exits_2(server: Server, tmp_path: Path) -> None:
    """An unknown id exits 2 (bad input), naming it."""
    result = extreg(tmp_path, "enable", "nope", *server.opts("operator"))
    assert (2, "error: nope: no such extension") == (result.returncode, flat(result.stderr))


def test_invoke_without_an_invoker_exits_1(server: Server, tmp_path: Path) -> None:
    """`invoke --url` on a server without NATS exits 1 saying invocation is unavailable."""
    result = extreg(
        tmp_path,
        "invoke",
        "alpha",
        "--payload",
        '{"payload": {"text": "hi"}}',
        "--tenant",
        "acme",
        *server.opts("operator"),
    )
    assert (1, True) == (result.returncode, "without an invoker" in flat(result.stderr))


def test_unreachable_server_exits_1(tmp_path: Path) -> None:
    """A URL where nothing listens exits 1 saying the server cannot be reached."""
    result = extreg(tmp_path, "reload", "--url", f"http://127.0.0.1:{free_port()}", "--token", "x")
    assert (1, True) == (result.returncode, "cannot reach the extreg server" in result.stderr)


# -- token commands ----------------------------------------------------------------------------


def test_token_create_list_revoke(pg_server: PostgresProcess, tmp_path: Path) -> None:
    """`token create` prints the token as its last line and stores only its hash; `token list`
    shows names and roles but no secret; `token revoke` marks it revoked; an unknown name
    exits 2."""
    db_url = pg_server.create_database(f"tokens_{uuid.uuid4().hex[:8]}")
    migrate(db_url)
    created = extreg(
        tmp_path, "--database-url", db_url, "token", "create", "ci", "--role", "operator"
    )
    assert 0 == created.returncode, created.stderr
    token = created.stdout.strip().splitlines()[-1]
    assert [("ci", "operator", hash_token(token))] == sql(
        db_url, "SELECT name, role, token_hash FROM extreg_api_tokens"
    )
    listed = extreg(tmp_path, "--database-url", db_url, "token", "list", "--json")
    rows = json.loads(listed.stdout)
    assert [("ci", "operator", None)] == [(r["name"], r["role"], r["revoked_at"]) for r in rows]
    assert token not in listed.stdout and hash_token(token) not in listed.stdout
    assert 0 == extreg(tmp_path, "--database-url", db_url, "token", "revoke", "ci").returncode
    assert [(True,)] == sql(db_url, "SELECT revoked_at IS NOT NULL FROM extreg_api_tokens")
    unknown = extreg(tmp_path, "--database-url", db_url, "token", "revoke", "nobody")
    assert (2, "error: no token named 'nobody'") == (unknown.returncode, flat(unknown.stderr))
    bad_role = extreg(tmp_path, "--database-url", db_url, "token", "create", "x", "--role", "god")
    assert 2 == bad_role.returncode


def test_token_create_into_a_tokens_file(tmp_path: Path) -> None:
    """`token create --file` adds the token's hash to a JSON tokens file (no database)."""
    file = tmp_path / "tokens.json"
    created = extreg(
        tmp_path,
        "--source",
        "fixtures",
        "token",
        "create",
        "dev",
        "--role",
        "admin",
        "--file",
        str(file),
    )
    token = created.stdout.strip().splitlines()[-1]
    assert {"tokens": {"dev": {"role": "admin", "sha256": hash_token(token)}}} == json.loads(
        file.read_text()
    )


def test_embedded_first_start_prints_the_admin_token_once(tmp_path: Path) -> None:
    """On the embedded default, the first `extreg serve` prints the URL and a working admin
    token; the second start prints the URL but no token. Ctrl-C stops it (exit 0)."""
    proc, url, out = start_server(tmp_path)
    try:
        deadline = time.monotonic() + 10
        while "extreg_" not in out.read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        token = out.read_text().strip().splitlines()[-1]
        status = httpx.get(url + "/admin/status", headers={"Authorization": f"Bearer {token}"})
    finally:
        first_exit = stop_server(proc)
    assert (0, 200, True) == (first_exit, status.status_code, token.startswith("extreg_"))
    assert f"dashboard {url}/" in out.read_text()
    proc, url, out = start_server(tmp_path)
    try:
        time.sleep(0.5)
        second = out.read_text()
    finally:
        assert 0 == stop_server(proc)
    assert (True, False) == (f"dashboard {url}/" in second, "extreg_" in second)


def test_health_and_audit_directly_on_the_database(
    pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """Without --url, `health` reads `extension_health` rows and `audit` the audit log, straight
    from the database, in the same shapes as the API; a row the seed's writers wrote (mean and
    percentiles, no sum or sketch) shows its mean and percentiles."""
    db_url = pg_server.create_database(f"direct_{uuid.uuid4().hex[:8]}")
    migrate(db_url)
    sql(
        db_url,
        "INSERT INTO extensions (id, type, subject) VALUES ('alpha', 'pre', 'a.b'),"
        " ('beta', 'post', 'c.d')",
    )
    sql(
        db_url,
        "INSERT INTO extension_health (extension_id, success_count, failure_count,"
        " avg_latency_ms, p95_latency_ms, circuit_breaker_state)"
        " VALUES ('alpha', 3, 1, 12.5, 30, 'open')",
    )
    on = {"EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED": "true"}  # off, every circuit: disabled
    health = extreg(tmp_path, "--database-url", db_url, "health", "--json", **on)
    assert 0 == health.returncode, health.stderr
    report = json.loads(health.stdout)
    alpha = report["extensions"][0]["health"]
    assert (3, 1, 0.75, 12.5, "open", "unhealthy") == (
        alpha["success_count"],
        alpha["failure_count"],
        alpha["success_rate"],
        alpha["avg_latency_ms"],
        alpha["circuit_breaker_state"],
        alpha["status"],
    )
    assert 30.0 == pytest.approx(alpha["p95_latency_ms"], rel=0.01)  # the sketch's accuracy
    assert {
        "total": 2,
        "enabled": 2,
        "healthy": 0,
        "degraded": 0,
        "unhealthy": 1,  # alpha: its circuit is open
        "unknown": 1,  # beta: no recent call (the seed's rows have no intervals)
        "avg_success_rate": 1.0,
        "avg_latency_ms": 0.0,
    } == report["summary"]
    table = extreg(tmp_path, "--database-url", db_url, "health", **on)
    assert (0, True) == (table.returncode, "alpha" in table.stdout and "open" in table.stdout)
    missing = extreg(tmp_path, "--database-url", db_url, "health", "nope")
    assert 2 == missing.returncode
    assert 0 == extreg(tmp_path, "--database-url", db_url, "disable", "beta").returncode
    audit = extreg(tmp_path, "--database-url", db_url, "audit", "beta", "--json")
    assert ["disable", "create"] == [row["action"] for row in json.loads(audit.stdout)]
    listing = extreg(tmp_path, "--database-url", db_url, "audit")
    shown = "disable" in listing.stdout and "enabled" in listing.stdout  # the changed field
    assert (0, True) == (listing.returncode, shown)


async def test_serve_gets_its_invoker_when_nats_comes_up(
    pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """`extreg serve` started while NATS is down serves the registry with invoke answering 503;
    once NATS and the extension come up it attaches an invoker by itself (no restart) and
    the same invoke succeeds."""
    from extreg.local.natsserver import NatsServer
    from extreg.local.samples import run_samples

    db_url = pg_server.create_database(f"late_nats_{uuid.uuid4().hex[:8]}")
    migrate(db_url)
    sql(
        db_url,
        "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES"
        " ('normalize_text', 'pre', 'beamline.ext.pre.normalize_text.v1', 1000)",
    )
    tokens = await make_tokens(db_url)
    nats = NatsServer()
    proc, url, _ = start_server(
        tmp_path, "--database-url", db_url, EXTENSION_REGISTRY_NATS_URL=nats.url
    )
    headers = {"Authorization": f"Bearer {tokens['operator']}"}
    body = {"payload": {"payload": "  Hello   WORLD "}, "metadata": {}}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers) as client:
            before = await client.post("/admin/extensions/normalize_text/invoke", json=body)
            assert 503 == before.status_code
            await nats.astart()
            samples = await run_samples(nats.url, names=["normalize_text"])
            try:
                deadline = time.monotonic() + 30
                while not (await client.get("/admin/status")).json()["invoker"]:
                    assert time.monotonic() < deadline, "no invoker 30 s after NATS came up"
                    await asyncio.sleep(0.2)
                after = await client.post("/admin/extensions/normalize_text/invoke", json=body)
            finally:
                await samples.stop()
        assert 200 == after.status_code, after.text
        assert "hello world" == after.json()["reply"]["payload"]["payload"]
    finally:
        assert 0 == stop_server(proc)
        await nats.astop()
