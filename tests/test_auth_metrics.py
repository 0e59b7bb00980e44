"""The pieces under the API: token hashing and checking, the tokens file, the failed-auth
limiter, and the metrics fed by the registry's sync hook (on a PostgreSQL that goes away)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from helpers import make_settings, record
from prometheus_client.parser import text_string_to_metric_families

from extreg.adapters.migrate import migrate
from extreg.api.ratelimit import FailedAuthLimiter
from extreg.auth import (
    TokenBook,
    add_to_tokens_file,
    generate_token,
    hash_token,
    load_tokens_file,
    role_allows,
)
from extreg.core.model import parse_extension
from extreg.errors import ConfigError, SourceUnavailable
from extreg.metrics import Metrics
from extreg.registry import Registry
from testsupport.pgprocess import PostgresProcess


def test_roles_nest() -> None:
    """admin may do what operator may, operator what viewer may; not the other way round."""
    table = [
        (held, needed, role_allows(held, needed))
        for held in ("viewer", "operator", "admin", "root")
        for needed in ("viewer", "operator", "admin")
    ]
    allowed = [(held, needed) for held, needed, ok in table if ok]
    assert [
        ("viewer", "viewer"),
        ("operator", "viewer"),
        ("operator", "operator"),
        ("admin", "viewer"),
        ("admin", "operator"),
        ("admin", "admin"),
    ] == allowed


def test_token_book_checks_tokens_by_their_hash() -> None:
    """A book accepts the tokens it holds, under their names and roles, and nothing else."""
    book = TokenBook()
    token = generate_token()
    book.add("ci", "operator", token)
    assert (("ci", "operator"), None, None) == (
        (book.check(token).name, book.check(token).role),  # type: ignore[union-attr]
        book.check(token + "x"),
        book.check(""),
    )
    assert 64 == len(hash_token(token)) and token.startswith("extreg_")


def test_tokens_file_round_trip_and_rejections(tmp_path: Path) -> None:
    """`add_to_tokens_file` writes entries `load_tokens_file` reads back; a malformed file is
    a ConfigError naming the file; TOML files are read too."""
    path = tmp_path / "tokens.json"
    add_to_tokens_file(path, "dev", "admin", hash_token("t"))
    assert [("dev", "admin")] == [(e.name, e.role) for e in load_tokens_file(path)]
    toml = tmp_path / "tokens.toml"
    toml.write_text(f'[tokens.ci]\nrole = "viewer"\nsha256 = "{hash_token("u")}"\n')
    assert [("ci", "viewer")] == [(e.name, e.role) for e in load_tokens_file(toml)]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"tokens": {"x": {"role": "god", "sha256": hash_token("v")}}}))
    with pytest.raises(ConfigError, match=r"bad.json.*role 'god' is invalid"):
        load_tokens_file(bad)


def test_failed_auth_limiter_blocks_then_forgets() -> None:
    """After `limit` failures in the window an address is blocked until the oldest failure
    leaves the window; other addresses are not affected."""
    now = [1000.0]
    limiter = FailedAuthLimiter(limit=3, window_s=60, clock=lambda: now[0])
    for _ in range(3):
        assert None is limiter.retry_after("a")
        limiter.failed("a")
        now[0] += 10
    assert (30.0, None) == (limiter.retry_after("a"), limiter.retry_after("b"))
    now[0] += 30
    assert None is limiter.retry_after("a")


def test_failed_auth_limiter_says_when_a_failure_is_over_the_limit() -> None:
    """`failed` answers None (401) for the first `limit` failures, then the wait (429); each
    further failure extends the block, so a client that keeps guessing stays refused."""
    now = [1000.0]
    limiter = FailedAuthLimiter(limit=2, window_s=60, clock=lambda: now[0])
    answers = []
    for _ in range(4):
        answers.append(limiter.failed("a"))
        now[0] += 10
    assert [None, None, 50.0, 50.0] == answers
    now[0] += 50
    assert None is limiter.failed("a")


async def test_sync_metrics_count_durations_and_errors(
    tmp_path: Path, own_pg: PostgresProcess
) -> None:
    """Every sync is timed; a sync that fails because the database went away counts as a sync
    error, and the registry gauges keep the cached counts."""
    url = own_pg.create_database("metrics")
    migrate(url)
    settings = make_settings(tmp_path, source="database", database_url=url)
    metrics = Metrics()
    async with Registry.open(settings) as registry:
        metrics.watch_registry(registry)
        alpha = parse_extension(record("alpha"), max_timeout_ms=60_000, max_retries=10)
        await registry.database.upsert_extension(alpha, "test")
        await registry.sync()
        own_pg.stop()
        with pytest.raises(SourceUnavailable):
            await registry.sync()
        own_pg.start()
        text = metrics.render().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    assert (2.0, 1.0, 1.0) == (
        values["extension_registry_sync_duration_seconds_count"],
        values["extension_registry_sync_errors_total"],
        values["extension_registry_size"],
    )
