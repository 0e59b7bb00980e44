"""The HTTP admin API (SPEC.md, "HTTP admin API"), in-process over a real registry on a real
PostgreSQL: roles, audit, freshness, ETags, validation, errors, rate limiting, metrics, logs."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from api_helpers import ROLE_TOKENS, EchoInvoker, admin_token_file, database_api, sql
from helpers import make_settings, record
from prometheus_client.parser import text_string_to_metric_families
from structlog.testing import capture_logs

from extreg.api import create_app
from extreg.auth import ROLES, generate_token, hash_token
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.tokens import TokenStore, ensure_admin_token

# (method, path, body, minimal role, status with that role when no invoker is needed)
ROUTES: list[tuple[str, str, Any, str, int]] = [
    ("GET", "/admin/status", None, "viewer", 200),
    ("GET", "/admin/extensions", None, "viewer", 200),
    ("GET", "/admin/extensions/alpha", None, "viewer", 200),
    ("GET", "/admin/extensions/health", None, "viewer", 200),
    ("GET", "/admin/extensions/alpha/health", None, "viewer", 200),
    ("GET", "/admin/audit", None, "viewer", 200),
    ("GET", "/openapi.json", None, "viewer", 200),
    ("POST", "/admin/extensions/alpha/enable", None, "operator", 200),
    ("POST", "/admin/extensions/beta/disable", None, "operator", 200),
    ("POST", "/admin/reload", None, "operator", 200),
    ("POST", "/admin/extensions/alpha/circuit", {"action": "reset"}, "operator", 200),
    ("POST", "/admin/extensions/alpha/invoke", {"payload": {"text": "hi"}}, "operator", 200),
    ("POST", "/admin/extensions", record("gamma"), "admin", 201),
    ("PUT", "/admin/extensions/alpha", record("alpha", timeout_ms=250), "admin", 200),
    ("PATCH", "/admin/extensions/alpha", {"timeout_ms": 300}, "admin", 200),
    ("DELETE", "/admin/extensions/alpha", None, "admin", 204),
]
OPEN_ROUTES = ["/healthz", "/readyz", "/metrics"]
METRIC_NAMES = [
    "extension_registry_size",
    "extension_registry_enabled_count",
    "extension_registry_sync_duration_seconds",
    "extension_registry_sync_errors_total",
    "extension_health_success_rate",
    "extension_health_avg_latency_ms",
    "extension_circuit_breaker_state",
    "extension_circuit_breaker_failures_total",
    "extension_circuit_breaker_recoveries_total",
    "extension_invocation_latency_seconds",
]


async def call(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> httpx.Response:
    kwargs: dict[str, Any] = {"headers": headers or {}}
    if body is not None:
        kwargs["json"] = body
    return await client.request(method, path, **kwargs)


DEADLINE_S = 30.0  # generous: fails only a change that never arrives (notifications: ms)


async def assert_eventually(condition: Any, timeout: float = DEADLINE_S) -> float:
    started = time.perf_counter()
    while not await condition():
        if time.perf_counter() - started > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(0.01)
    return time.perf_counter() - started


# -- roles ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "role", "ok"), ROUTES, ids=[f"{m} {p}" for m, p, *_ in ROUTES]
)
async def test_route_roles(
    tmp_path: Path, db_url: str, method: str, path: str, body: Any, role: str, ok: int
) -> None:
    """Each route answers 401 without a token or with an unknown one (with a Bearer challenge),
    403 to every smaller role, and succeeds for its minimal role."""
    async with database_api(tmp_path, db_url, invoker=EchoInvoker()) as api:
        missing = await call(api.client, method, path, body)
        assert (401, "Bearer") == (
            missing.status_code,
            missing.headers.get("www-authenticate", "").split(" ")[0],
        )
        unknown = await call(
            api.client, method, path, body, {"Authorization": f"Bearer {generate_token()}"}
        )
        assert 401 == unknown.status_code
        for smaller in ROLES[: ROLES.index(role)]:
            refused = await call(api.client, method, path, body, api.auth(smaller))
            assert (smaller, 403) == (smaller, refused.status_code)
        answer = await call(api.client, method, path, body, api.auth(role))
        assert ok == answer.status_code, answer.text


async def test_open_routes_need_no_token(tmp_path: Path, db_url: str) -> None:
    """/healthz, /readyz and /metrics answer 200 without any token."""
    async with database_api(tmp_path, db_url) as api:
        statuses = [(await api.client.get(path)).status_code for path in OPEN_ROUTES]
    assert [200, 200, 200] == statuses


async def test_readyz_is_503_until_the_registry_loads(tmp_path: Path, db_url: str) -> None:
    """/readyz answers 503 for a registry that has not loaded yet, and says so."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    app = create_app(Runtime(settings, Registry(settings), metrics=Metrics()))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://t"
    ) as client:
        answer = await client.get("/readyz")
    assert (503, {"status": "not_ready"}) == (answer.status_code, answer.json())


# -- writes: audit, freshness, ETags ------------------------------------------------------------


async def test_every_write_is_audited_with_the_token_name(tmp_path: Path, db_url: str) -> None:
    """Create, replace, patch, disable, enable and delete through the API are each audited with
    the token's name as `changed_by`."""
    async with database_api(tmp_path, db_url) as api:
        admin = api.auth("admin")
        steps = [
            ("POST", "/admin/extensions", record("delta")),
            ("PUT", "/admin/extensions/delta", record("delta", timeout_ms=400)),
            ("PATCH", "/admin/extensions/delta", {"retry": 2}),
            ("POST", "/admin/extensions/delta/disable", None),
            ("POST", "/admin/extensions/delta/enable", None),
            ("DELETE", "/admin/extensions/delta", None),
        ]
        statuses = [(await call(api.client, m, p, b, admin)).status_code for m, p, b in steps]
    assert [201, 200, 200, 200, 200, 204] == statuses
    rows = sql(
        db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'delta' ORDER BY changed_at, action",
    )
    admin_name = ROLE_TOKENS["admin"]
    expected = [
        ("create", admin_name),
        ("update", admin_name),
        ("update", admin_name),
        ("disable", admin_name),
        ("enable", admin_name),
        ("delete", admin_name),
    ]
    assert expected == rows


async def test_operator_enable_is_audited_as_the_operator(tmp_path: Path, db_url: str) -> None:
    """An operator's enable is recorded with the operator token's name."""
    async with database_api(tmp_path, db_url) as api:
        answer = await api.client.post(
            "/admin/extensions/beta/enable", headers=api.auth("operator")
        )
    assert (200, True) == (answer.status_code, answer.json()["enabled"])
    rows = sql(
        db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'beta' AND action = 'enable'",
    )
    assert [("enable", ROLE_TOKENS["operator"])] == rows


async def test_a_write_is_readable_right_after_it_returns(tmp_path: Path, db_url: str) -> None:
    """A GET right after a write returns what was written, with the same ETag."""
    async with database_api(tmp_path, db_url) as api:
        written = await api.client.patch(
            "/admin/extensions/alpha", json={"timeout_ms": 777}, headers=api.auth("admin")
        )
        read = await api.client.get("/admin/extensions/alpha", headers=api.auth("viewer"))
    assert (777, written.headers["etag"]) == (read.json()["timeout_ms"], read.headers["etag"])


async def test_a_plain_sql_write_appears_in_the_api(tmp_path: Path, db_url: str) -> None:
    """A record inserted and then changed with plain SQL is served by the API (by notification;
    how fast is a benchmark's figure)."""
    async with database_api(tmp_path, db_url) as api:
        viewer = api.auth("viewer")
        sql(
            db_url,
            "INSERT INTO extensions (id, type, subject, timeout_ms)"
            " VALUES ('from_sql', 'validator', 'beamline.ext.validate.from_sql.v1', 120)",
        )

        async def visible() -> bool:
            answer = await api.client.get("/admin/extensions/from_sql", headers=viewer)
            return answer.status_code == 200

        await assert_eventually(visible)
        sql(db_url, "UPDATE extensions SET timeout_ms = 130 WHERE id = 'from_sql'")

        async def changed() -> bool:
            answer = await api.client.get("/admin/extensions/from_sql", headers=viewer)
            return bool(answer.json()["timeout_ms"] == 130)

        await assert_eventually(changed)


async def test_stale_etag_gets_412(tmp_path: Path, db_url: str) -> None:
    """Two operators PATCH with the ETag they both read, at once: exactly one wins and the
    other gets 412; a later PATCH with that old ETag also gets 412, and nothing is lost."""
    async with database_api(tmp_path, db_url) as api:
        admin = api.auth("admin")
        etag = (await api.client.get("/admin/extensions/alpha", headers=admin)).headers["etag"]
        first, second = await asyncio.gather(
            api.client.patch(
                "/admin/extensions/alpha",
                json={"timeout_ms": 111},
                headers={**admin, "If-Match": etag},
            ),
            api.client.patch(
                "/admin/extensions/alpha", json={"retry": 3}, headers={**admin, "If-Match": etag}
            ),
        )
        assert [200, 412] == sorted([first.status_code, second.status_code])
        late = await api.client.put(
            "/admin/extensions/alpha", json=record("alpha"), headers={**admin, "If-Match": etag}
        )
        assert 412 == late.status_code
        winner = first if first.status_code == 200 else second
        current = await api.client.get("/admin/extensions/alpha", headers=admin)
        assert winner.json() == current.json()
        fresh = await api.client.patch(
            "/admin/extensions/alpha",
            json={"retry": 1},
            headers={**admin, "If-Match": current.headers["etag"]},
        )
        assert 200 == fresh.status_code


async def test_put_replaces_and_patch_merges(tmp_path: Path, db_url: str) -> None:
    """PATCH keeps the fields it does not name; PUT resets them to their defaults."""
    async with database_api(tmp_path, db_url) as api:
        admin = api.auth("admin")
        await api.client.patch(
            "/admin/extensions/alpha", json={"config": {"mode": "strict"}}, headers=admin
        )
        patched = await api.client.patch(
            "/admin/extensions/alpha", json={"retry": 2}, headers=admin
        )
        assert ({"mode": "strict"}, 2) == (patched.json()["config"], patched.json()["retry"])
        replaced = await api.client.put(
            "/admin/extensions/alpha", json={"type": "pre", "subject": "a.b"}, headers=admin
        )
        body = replaced.json()
        assert ({}, 0, 5000, "a.b") == (
            body["config"],
            body["retry"],
            body["timeout_ms"],
            body["subject"],
        )


# -- bad input and missing records ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "body", "loc"),
    [
        ("POST", "/admin/extensions", record("bad", timeout_ms=-1), ["body", "timeout_ms"]),
        ("POST", "/admin/extensions", record("bad", timeout_ms=999_999), ["body", "timeout_ms"]),
        ("POST", "/admin/extensions", record("bad", subject="a.>"), ["body", "subject"]),
        ("POST", "/admin/extensions", record("bad", colour="red"), ["body", "colour"]),
        ("POST", "/admin/extensions", {"id": "bad", "type": "pre"}, ["body", "subject"]),
        ("POST", "/admin/extensions", record("-bad"), ["body", "id"]),
        (
            "POST",
            "/admin/extensions",
            record("bad", config={"k": "a\x00b"}),
            ["body", "config", "k"],
        ),
        ("PUT", "/admin/extensions/alpha", record("alpha", type="sideways"), ["body", "type"]),
        ("PUT", "/admin/extensions/alpha", record("other"), ["body", "id"]),
        ("PATCH", "/admin/extensions/alpha", {"retry": 11}, ["body", "retry"]),
        (
            "PATCH",
            "/admin/extensions/alpha",
            {"versions": [{"version": "v2", "subject": "x.y", "timeout_ms": 0}]},
            ["body", "versions", 0, "timeout_ms"],
        ),
    ],
    ids=[
        "negative timeout",
        "timeout over max",
        "wildcard subject",
        "unknown field",
        "missing subject",
        "bad id",
        "NUL in config",
        "bad type",
        "id mismatch",
        "retry over max",
        "bad version",
    ],
)
async def test_bad_input_is_422_naming_the_field_and_writes_nothing(
    tmp_path: Path, db_url: str, method: str, path: str, body: Any, loc: list[Any]
) -> None:
    """Bad records answer 422 with `loc` naming the field at fault, and nothing is written."""
    async with database_api(tmp_path, db_url) as api:
        before = sql(db_url, "SELECT count(*) FROM extension_audit_log")
        answer = await call(api.client, method, path, body, api.auth("admin"))
        after = sql(db_url, "SELECT count(*) FROM extension_audit_log")
    assert 422 == answer.status_code, answer.text
    assert loc in [item["loc"] for item in answer.json()["detail"]]
    assert before == after


async def test_a_body_that_is_not_a_json_object_is_422(tmp_path: Path, db_url: str) -> None:
    """A body that is not JSON, or not an object, answers 422 pointing at the body."""
    async with database_api(tmp_path, db_url) as api:
        admin = {**api.auth("admin"), "Content-Type": "application/json"}
        broken = await api.client.post("/admin/extensions", content=b"{nope", headers=admin)
        listed = await api.client.post("/admin/extensions", content=b"[1]", headers=admin)
    assert [(422, ["body"]), (422, ["body"])] == [
        (r.status_code, r.json()["detail"][0]["loc"]) for r in (broken, listed)
    ]


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", "/admin/extensions/nope", None),
        ("GET", "/admin/extensions/nope/health", None),
        ("PUT", "/admin/extensions/nope", record("nope")),
        ("PATCH", "/admin/extensions/nope", {"retry": 1}),
        ("DELETE", "/admin/extensions/nope", None),
        ("POST", "/admin/extensions/nope/enable", None),
        ("POST", "/admin/extensions/nope/disable", None),
        ("POST", "/admin/extensions/nope/circuit", {"action": "open"}),
        ("POST", "/admin/extensions/nope/invoke", {"payload": {}}),
    ],
)
async def test_missing_extension_is_404(
    tmp_path: Path, db_url: str, method: str, path: str, body: Any
) -> None:
    """Every route about one extension answers 404 for an id that does not exist."""
    async with database_api(tmp_path, db_url, invoker=EchoInvoker()) as api:
        answer = await call(api.client, method, path, body, api.auth("admin"))
    assert (404, "ExtensionNotFound") == (answer.status_code, answer.json()["error"])


async def test_duplicate_create_is_409(tmp_path: Path, db_url: str) -> None:
    """Creating an id that exists answers 409 and leaves the record as it was."""
    async with database_api(tmp_path, db_url) as api:
        answer = await api.client.post(
            "/admin/extensions", json=record("alpha", timeout_ms=999), headers=api.auth("admin")
        )
        kept = await api.client.get("/admin/extensions/alpha", headers=api.auth("viewer"))
    assert (409, 100) == (answer.status_code, kept.json()["timeout_ms"])


async def test_writes_on_fixtures_are_409_and_tokens_come_from_the_tokens_file(
    tmp_path: Path,
) -> None:
    """On a fixtures registry (no database) tokens come from `api_tokens_file`; reads work and
    every write answers 409 saying the fixtures are read-only."""
    folder = tmp_path / "fx"
    folder.mkdir()
    (folder / "ext.json").write_text(json.dumps([record("fx_a")]), encoding="utf-8")
    tokens_file, token = admin_token_file(tmp_path)
    settings = make_settings(
        tmp_path, source="fixtures", fixtures_dir=folder, api_tokens_file=tokens_file
    )
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            admin = {"Authorization": f"Bearer {token}"}
            read = await client.get("/admin/extensions", headers=admin)
            writes = [
                await call(client, "POST", "/admin/extensions", record("fx_b"), admin),
                await call(client, "PUT", "/admin/extensions/fx_a", record("fx_a"), admin),
                await call(client, "PATCH", "/admin/extensions/fx_a", {"retry": 1}, admin),
                await call(client, "DELETE", "/admin/extensions/fx_a", None, admin),
                await call(client, "POST", "/admin/extensions/fx_a/disable", None, admin),
                await call(client, "POST", "/admin/extensions/fx_a/enable", None, admin),
            ]
    assert (200, ["fx_a"]) == (read.status_code, [e["id"] for e in read.json()])
    assert [409] * 6 == [w.status_code for w in writes]
    assert all(
        "fixtures" in w.json()["detail"] and "read-only" in w.json()["detail"] for w in writes
    )


# -- auth: rate limit, revocation, first start ---------------------------------------------------


async def test_failed_auth_is_rate_limited_per_address(tmp_path: Path, db_url: str) -> None:
    """After 10 failed authentications from one address, its wrong tokens get 429 with
    Retry-After, while a valid token still works (tests/test_lockouts.py has more); other
    addresses are unaffected."""
    async with database_api(tmp_path, db_url) as api:
        bad = {"Authorization": "Bearer extreg_wrong"}
        failures = [
            (await api.client.get("/admin/status", headers=bad)).status_code for _ in range(10)
        ]
        blocked = await api.client.get("/admin/status", headers=bad)
        valid = await api.client.get("/admin/status", headers=api.auth("viewer"))
        other = httpx.ASGITransport(
            app=api.client._transport.app,  # type: ignore[attr-defined]
            client=("127.0.0.2", 5000),
        )
        async with httpx.AsyncClient(transport=other, base_url="http://t") as elsewhere:
            fine = await elsewhere.get("/admin/status", headers=bad)
    assert [401] * 10 == failures
    assert 429 == blocked.status_code
    assert 1 <= int(blocked.headers["retry-after"]) <= 60
    assert (200, 401) == (valid.status_code, fine.status_code)


async def test_a_revoked_token_stops_working(tmp_path: Path, db_url: str) -> None:
    """`TokenStore.revoke` reaches a running server by notification: 401."""
    async with database_api(tmp_path, db_url) as api:
        viewer = api.auth("viewer")
        assert 200 == (await api.client.get("/admin/status", headers=viewer)).status_code
        await TokenStore(db_url).revoke(ROLE_TOKENS["viewer"])

        async def refused() -> bool:
            return (await api.client.get("/admin/status", headers=viewer)).status_code == 401

        await assert_eventually(refused)


async def test_a_token_created_while_serving_works(tmp_path: Path, db_url: str) -> None:
    """A token created in the database while the server runs is accepted."""
    async with database_api(tmp_path, db_url) as api:
        token = await TokenStore(db_url).create("late", "viewer", "test")

        async def accepted() -> bool:
            answer = await api.client.get(
                "/admin/status", headers={"Authorization": f"Bearer {token}"}
            )
            return answer.status_code == 200

        await assert_eventually(accepted)


async def test_ensure_admin_token_creates_one_admin_token_once(db_url: str) -> None:
    """The first call creates the `admin` token and returns it; later calls return None; only
    its SHA-256 digest is stored."""
    store = TokenStore(db_url)
    first = await ensure_admin_token(store)
    second = await ensure_admin_token(store)
    assert first is not None and first.startswith("extreg_")
    assert second is None
    assert [("admin", "admin", hash_token(first))] == sql(
        db_url, "SELECT name, role, token_hash FROM extreg_api_tokens"
    )


# -- health, circuit, invoke ----------------------------------------------------------------------


async def test_health_without_an_invoker_reads_every_extension_as_new(
    tmp_path: Path, db_url: str
) -> None:
    """Without an invoker, health has the contract's shape with zero counts and `disabled`
    circuits (breakers are off by default); circuit and invoke answer 503 saying there is no
    invoker."""
    async with database_api(tmp_path, db_url) as api:
        viewer, operator = api.auth("viewer"), api.auth("operator")
        report = (await api.client.get("/admin/extensions/health", headers=viewer)).json()
        circuit = await api.client.post(
            "/admin/extensions/alpha/circuit", json={"action": "open"}, headers=operator
        )
        invoke = await api.client.post(
            "/admin/extensions/alpha/invoke", json={"payload": {}}, headers=operator
        )
    alpha = report["extensions"][0]
    assert ("alpha", "pre") == (alpha["id"], alpha["type"])
    assert {
        "success_count": 0,
        "failure_count": 0,
        "success_rate": 1.0,
        "avg_latency_ms": 0.0,
        "p50_latency_ms": 0.0,
        "p95_latency_ms": 0.0,
        "p99_latency_ms": 0.0,
        "circuit_breaker_state": "disabled",
        "last_success": None,
        "last_failure": None,
        "status": "unknown",
    }.items() <= alpha["health"].items()
    assert {
        "total": 2,
        "enabled": 1,
        "healthy": 0,
        "degraded": 0,
        "unhealthy": 0,
        "unknown": 1,  # alpha; beta is disabled
        "avg_success_rate": 1.0,
        "avg_latency_ms": 0.0,
    } == report["summary"]
    assert [503, 503] == [circuit.status_code, invoke.status_code]
    assert "without an invoker" in circuit.json()["detail"]


async def test_invoke_circuit_and_health_with_an_invoker(tmp_path: Path, db_url: str) -> None:
    """With an invoker: a test invocation returns the reply and counts in health; an operator
    opens the circuit (health shows it, invocations answer 503) and resets it."""
    invoker = EchoInvoker()
    async with database_api(tmp_path, db_url, invoker=invoker) as api:
        operator = api.auth("operator")
        reply = await api.client.post(
            "/admin/extensions/alpha/invoke",
            json={"payload": {"text": "hi"}, "tenant_id": "acme", "trace_id": "t-1"},
            headers=operator,
        )
        health = (await api.client.get("/admin/extensions/alpha/health", headers=operator)).json()
        opened = await api.client.post(
            "/admin/extensions/alpha/circuit", json={"action": "open"}, headers=operator
        )
        refused = await api.client.post(
            "/admin/extensions/alpha/invoke", json={"payload": {}}, headers=operator
        )
        state = (await api.client.get("/admin/extensions/alpha/health", headers=operator)).json()
        reset = await api.client.post(
            "/admin/extensions/alpha/circuit", json={"action": "reset"}, headers=operator
        )
    assert (200, {"payload": {"text": "hi"}, "metadata": {}}, "t-1") == (
        reply.status_code,
        reply.json()["reply"],
        reply.json()["trace_id"],
    )
    assert {"trace_id": "t-1", "tenant_id": "acme"} == invoker.calls[0][2]
    assert (1, 1.0) == (health["health"]["success_count"], health["health"]["success_rate"])
    assert (200, "open") == (opened.status_code, opened.json()["circuit_breaker_state"])
    assert (503, "CircuitOpen") == (refused.status_code, refused.json()["error"])
    assert "open" == state["health"]["circuit_breaker_state"]
    assert "closed" == reset.json()["circuit_breaker_state"]


async def test_audit_route_lists_rows_newest_first(tmp_path: Path, db_url: str) -> None:
    """GET /admin/audit?extension_id= returns that extension's rows, newest first, limited."""
    async with database_api(tmp_path, db_url) as api:
        await api.client.post("/admin/extensions/alpha/disable", headers=api.auth("operator"))
        await api.client.post("/admin/extensions/alpha/enable", headers=api.auth("operator"))
        rows = (
            await api.client.get(
                "/admin/audit",
                params={"extension_id": "alpha", "limit": 2},
                headers=api.auth("viewer"),
            )
        ).json()
    assert [("enable", "otto-operator"), ("disable", "otto-operator")] == [
        (r["action"], r["changed_by"]) for r in rows
    ]


# -- metrics and logs ---------------------------------------------------------------------------


async def test_metrics_parse_and_carry_every_name(tmp_path: Path, db_url: str) -> None:
    """/metrics parses with Prometheus' text parser and carries every contract name, with the
    registry's size and enabled count, the invocation the invoker reported, a circuit that
    opened and recovered, and a sync."""
    async with database_api(tmp_path, db_url, invoker=EchoInvoker()) as api:
        operator = api.auth("operator")
        await api.client.post(
            "/admin/extensions/alpha/invoke", json={"payload": {}}, headers=operator
        )
        await api.runtime.registry.sync()
        await api.client.post(
            "/admin/extensions/alpha/circuit", json={"action": "open"}, headers=operator
        )
        await api.client.post(
            "/admin/extensions/alpha/circuit", json={"action": "reset"}, headers=operator
        )
        text = (await api.client.get("/metrics")).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    names = set(families) | {f"{name}_total" for name, f in families.items() if f.type == "counter"}
    assert [] == [name for name in METRIC_NAMES if name not in names]

    def value(family: str, sample: str, **labels: str) -> float:
        return next(
            s.value
            for s in families[family].samples
            if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert (2.0, 1.0) == (
        value("extension_registry_size", "extension_registry_size"),
        value("extension_registry_enabled_count", "extension_registry_enabled_count"),
    )
    assert 1.0 == value(
        "extension_invocation_latency_seconds",
        "extension_invocation_latency_seconds_count",
        extension_id="alpha",
        outcome="ok",
    )
    assert (1.0, 1.0) == (
        value(
            "extension_circuit_breaker_failures",
            "extension_circuit_breaker_failures_total",
            extension_id="alpha",
        ),
        value(
            "extension_circuit_breaker_recoveries",
            "extension_circuit_breaker_recoveries_total",
            extension_id="alpha",
        ),
    )
    assert 0.0 == value(
        "extension_circuit_breaker_state", "extension_circuit_breaker_state", extension_id="alpha"
    )
    assert 1.0 == value(
        "extension_registry_sync_duration_seconds", "extension_registry_sync_duration_seconds_count"
    )


async def test_logs_are_structured_and_never_carry_a_token(tmp_path: Path, db_url: str) -> None:
    """Requests log `http_request` events with status, duration, the path's extension id and
    the token's *name*; no token (valid or not) appears anywhere in any log event."""
    wrong = generate_token()
    async with database_api(tmp_path, db_url) as api:
        with capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events:
            await api.client.patch(
                "/admin/extensions/alpha", json={"retry": 1}, headers=api.auth("admin")
            )
            await api.client.get("/admin/status", headers={"Authorization": f"Bearer {wrong}"})
            await api.client.get("/admin/status?token=" + api.tokens["viewer"])
    text = repr(events)
    assert [] == [t for t in [*api.tokens.values(), wrong] if t in text]
    requests = [e for e in events if e["event"] == "http_request"]
    assert [(200, "ada-admin", "alpha"), (401, None, None), (401, None, None)] == [
        (e["status"], e.get("actor"), e.get("extension_id")) for e in requests
    ]
    assert all(isinstance(e["duration_ms"], float) for e in requests)
    written = [e for e in events if e["event"] == "extension_written"]
    assert [("alpha", "updated")] == [(e["extension_id"], e["action"]) for e in written]
