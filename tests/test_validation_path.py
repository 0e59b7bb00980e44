"""One validation path: every record, from fixtures, the API, import or the database, goes
through the same rules, the per-extension overrides in `metadata` included. A bad row read
from PostgreSQL is left out with an error naming it, counted in status and in a metric; it
never fails a load nor empties the cache."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from api_helpers import database_api
from helpers import make_settings, record
from structlog.testing import capture_logs

from extreg.adapters.fixtures import load_fixtures
from extreg.core.model import parse_extension
from extreg.errors import FixtureError, InvalidRecord
from extreg.metrics import Metrics
from extreg.registry import Registry

BAD_OVERRIDES = {
    "circuit_breaker_failure_threshold": (
        {"circuit_breaker_failure_threshold": -1},
        "metadata.circuit_breaker_failure_threshold",
    ),
    "unknown_breaker_key": ({"circuit_breaker_colour": "red"}, "metadata.circuit_breaker_colour"),
    "max_payload_size": ({"max_payload_size": "big"}, "metadata.max_payload_size"),
}


def sql(url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute(statement, params)


def insert(url: str, ext_id: str, subject: str | None = None, metadata: object = None) -> None:
    sql(
        url,
        "INSERT INTO extensions (id, type, subject, timeout_ms, metadata)"
        " VALUES (%s, 'pre', %s, 100, %s)",
        (ext_id, subject or f"beamline.ext.pre.{ext_id}.v1", json.dumps(metadata or {})),
    )


@pytest.mark.parametrize("case", sorted(BAD_OVERRIDES))
def test_parse_refuses_unusable_overrides(case: str) -> None:
    metadata, field = BAD_OVERRIDES[case]
    with pytest.raises(InvalidRecord) as refused:
        parse_extension(record("x", metadata=metadata), max_timeout_ms=60_000, max_retries=10)
    assert field in [f for f, _ in refused.value.problems]


def test_fixtures_refuse_unusable_overrides(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(
        json.dumps(record("x", metadata={"circuit_breaker_timeout_seconds": 0}))
    )
    with pytest.raises(FixtureError) as refused:
        load_fixtures(tmp_path, max_timeout_ms=60_000, max_retries=10)
    text = str(refused.value)
    assert "x.json" in text and "metadata.circuit_breaker_timeout_seconds" in text


async def test_api_refuses_unusable_overrides(tmp_path: Path, db_url: str) -> None:
    async with database_api(tmp_path, db_url) as api:
        answer = await api.client.post(
            "/admin/extensions",
            headers=api.auth("admin"),
            json=record("x", metadata={"circuit_breaker_error_rate_threshold": 2}),
        )
        assert 422 == answer.status_code, answer.text
        assert [["body", "metadata", "circuit_breaker_error_rate_threshold"]] == [
            d["loc"] for d in answer.json()["detail"]
        ]
        assert api.runtime.registry.get("x") is None


async def test_bad_database_rows_are_left_out_named_and_counted(
    tmp_path: Path, db_url: str
) -> None:
    """Rows that break a rule the schema cannot enforce (a bad override, a wildcard subject,
    a timeout over the configured limit) are left out of a full load, each named with its
    reason in status and counted in a metric; the good rows are served."""
    insert(db_url, "good")
    insert(db_url, "bad_override", metadata={"circuit_breaker_failure_threshold": 0})
    insert(db_url, "bad_subject", subject="beamline.*.v1")
    sql(db_url, "UPDATE extensions SET timeout_ms = 999999 WHERE id = 'good'")
    insert(db_url, "fine")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    metrics = Metrics()
    with capture_logs() as events:
        async with Registry.open(settings) as reg:
            metrics.watch_registry(reg)
            assert ["fine"] == [e.id for e in reg.all()]
            invalid = reg.status.invalid_records
            assert ["bad_override", "bad_subject", "good"] == sorted(invalid)
            assert "metadata.circuit_breaker_failure_threshold" in invalid["bad_override"]
            assert "timeout_ms" in invalid["good"]
            assert 3.0 == metrics.registry.get_sample_value("extension_registry_invalid_records")
    skipped = sorted(e["extension_id"] for e in events if e["event"] == "invalid_record_skipped")
    assert ["bad_override", "bad_subject", "good"] == skipped


async def test_a_row_changed_to_bad_leaves_the_cache_and_returns_when_fixed(
    tmp_path: Path, db_url: str
) -> None:
    """Through notifications: a row made bad with plain SQL is left out (not kept stale, not
    crashing the follower), the rest stays; fixing it brings it back and clears the report."""
    insert(db_url, "a")
    insert(db_url, "b")
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    async with Registry.open(settings) as reg:
        sql(
            db_url,
            "UPDATE extensions SET metadata = %s WHERE id = 'a'",
            (json.dumps({"max_metadata_size": -5}),),
        )
        await until(lambda: reg.get("a") is None)
        assert ["b"] == [e.id for e in reg.all()]
        assert ["a"] == sorted(reg.status.invalid_records)
        sql(db_url, "UPDATE extensions SET metadata = '{}' WHERE id = 'a'")
        await until(lambda: reg.get("a") is not None)
        assert {} == reg.status.invalid_records


async def until(condition: object, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
