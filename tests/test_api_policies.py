"""The policy routes of the admin API (SPEC.md, "Routing policies and the pipeline", the HTTP
bullet) over a real registry on a real PostgreSQL, runs over a real NATS: CRUD with ETags,
roles, write-time validation that names field and item and writes nothing, unusable
policies, the dry run that sends nothing, the run's status mapping, freshness after plain SQL.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import (
    ROLE_TOKENS,
    Api,
    EchoInvoker,
    admin_token_file,
    database_api,
    live_server,
    make_tokens,
    policy_audit,
    seed,
    sql,
)
from helpers import make_settings, record
from invoke_helpers import Listener, listen
from nats.aio.client import Client
from nats.aio.msg import Msg

import extreg
from extreg.api import create_app
from extreg.api.errors import status_of
from extreg.api.policy_runs import RecentRuns
from extreg.errors import (
    CircuitOpen,
    ExtensionDisabled,
    ExtensionError,
    ExtensionNotFound,
    ExtensionTimeout,
    HealthRefused,
    InvalidResponse,
    InvocationError,
    MaxRetriesExceeded,
    NoProvider,
    PolicyDisabled,
    PolicyError,
    PolicyNotFound,
    StepFailed,
    TransportUnavailable,
    ValidatorBlocked,
)
from extreg.invoke import Invoker
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime

BUNDLED = Path(extreg.__file__).parent / "fixtures"
DEADLINE_S = 30.0  # generous: fails only what never happens


def stage_records(tag: str, **timeouts: int) -> list[dict[str, Any]]:
    """One extension per stage on subjects of this test only (`test.<tag>.<id>`):
    `norm` (pre), `guard` (validator), `prov` (provider), `mask` (post), and `late` (post,
    disabled)."""
    kinds = {"norm": "pre", "guard": "validator", "prov": "provider", "mask": "post"}
    found = [
        record(
            ext_id, type=kind, subject=f"test.{tag}.{ext_id}", timeout_ms=timeouts.get(ext_id, 2000)
        )
        for ext_id, kind in kinds.items()
    ]
    found.append(record("late", type="post", subject=f"test.{tag}.late", enabled=False))
    return found


FLOW: dict[str, Any] = {
    "policy_id": "flow",
    "pre": [{"id": "norm", "mode": "required"}],
    "validators": [{"id": "guard", "on_fail": "block"}],
    "providers": ["prov"],
    "post": [{"id": "mask", "mode": "optional"}],
}


@contextlib.asynccontextmanager
async def policy_api(
    tmp_path: Path,
    db_url: str,
    *,
    nats_url: str | None = None,
    tag: str | None = None,
    timeouts: dict[str, int] | None = None,
) -> AsyncIterator[Api]:
    """The API over a database registry holding `stage_records` (and a real Invoker when
    `nats_url` is given); `api.extras["tag"]` names the subjects."""
    tag = tag or uuid.uuid4().hex[:12]
    values: dict[str, Any] = {"circuit_breaker_enabled": True}
    if nats_url is not None:
        values["nats_url"] = nats_url
    settings = make_settings(tmp_path, source="database", database_url=db_url, **values)
    await seed(db_url, settings, *stage_records(tag, **(timeouts or {})))
    tokens = await make_tokens(db_url)
    async with contextlib.AsyncExitStack() as stack:
        registry = await stack.enter_async_context(Registry.open(settings))
        invoker = None
        if nats_url is not None:
            invoker = await stack.enter_async_context(Invoker.open(registry, settings))
        runtime = await stack.enter_async_context(
            Runtime.open(settings, registry, invoker, metrics=Metrics())
        )
        transport = httpx.ASGITransport(app=create_app(runtime))
        client = await stack.enter_async_context(
            httpx.AsyncClient(transport=transport, base_url="http://extreg.test")
        )
        yield Api(client, runtime, tokens, db_url, {"tag": tag})


def counts(db_url: str) -> tuple[int, int]:
    """(rows of routing_policies, rows of extension_audit_log)."""
    return (
        sql(db_url, "SELECT count(*) FROM routing_policies")[0][0],
        sql(db_url, "SELECT count(*) FROM extension_audit_log")[0][0],
    )


async def create(api: Api, body: dict[str, Any]) -> httpx.Response:
    answer = await api.client.post("/admin/policies", json=body, headers=api.auth("admin"))
    assert 201 == answer.status_code, answer.text
    return answer


# -- reads, writes, ETags ----------------------------------------------------------------------


async def test_crud_with_etags_audit_and_refresh(tmp_path: Path, db_url: str) -> None:
    """Create (201, ETag, Location, warnings), read back at once with the same ETag, replace,
    patch and delete under If-Match (a stale one 412, nothing changed), each audited with the
    token's name; a GET right after each write sees it."""
    async with policy_api(tmp_path, db_url) as api:
        created = await create(api, FLOW)
        assert "/admin/policies/flow" == created.headers["location"]
        assert [] == created.json()["warnings"]
        assert FLOW["pre"][0]["id"] == created.json()["pre"][0]["id"]
        tag = created.headers["etag"]
        read = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert 200 == read.status_code
        assert tag == read.headers["etag"]
        assert "warnings" not in read.json()
        assert ROLE_TOKENS["admin"] == read.json()["created_by"]

        replaced_body = {**FLOW, "post": []}
        replaced = await api.client.put(
            "/admin/policies/flow",
            json=replaced_body,
            headers={**api.auth("admin"), "If-Match": tag},
        )
        assert 200 == replaced.status_code, replaced.text
        assert [] == replaced.json()["post"]
        new_tag = replaced.headers["etag"]
        assert new_tag != tag

        stale = await api.client.put(
            "/admin/policies/flow", json=FLOW, headers={**api.auth("admin"), "If-Match": tag}
        )
        assert 412 == stale.status_code
        assert "StaleETag" == stale.json()["error"]
        stale_patch = await api.client.patch(
            "/admin/policies/flow",
            json={"enabled": False},
            headers={**api.auth("admin"), "If-Match": tag},
        )
        assert 412 == stale_patch.status_code
        stale_delete = await api.client.delete(
            "/admin/policies/flow", headers={**api.auth("admin"), "If-Match": tag}
        )
        assert 412 == stale_delete.status_code
        after_stale = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert new_tag == after_stale.headers["etag"]  # none of the stale writes changed it

        patched = await api.client.patch(
            "/admin/policies/flow",
            json={"tenant_id": "acme"},
            headers={**api.auth("admin"), "If-Match": new_tag},
        )
        assert 200 == patched.status_code, patched.text
        assert "acme" == patched.json()["tenant_id"]
        assert [] == patched.json()["post"]  # the other fields stay
        read = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert "acme" == read.json()["tenant_id"]

        deleted = await api.client.delete(
            "/admin/policies/flow",
            headers={**api.auth("admin"), "If-Match": patched.headers["etag"]},
        )
        assert 204 == deleted.status_code
        gone = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert 404 == gone.status_code
        assert "PolicyNotFound" == gone.json()["error"]
        admin = ROLE_TOKENS["admin"]
        assert [
            ("policy_create", admin),
            ("policy_update", admin),
            ("policy_update", admin),
            ("policy_delete", admin),
        ] == policy_audit(db_url, "flow"), policy_audit(db_url, "flow")
        assert 0 == counts(db_url)[0]


async def test_audit_trails_of_an_extension_and_a_same_named_policy_stay_apart(
    tmp_path: Path, db_url: str
) -> None:
    """A policy named like an extension (`norm`): `GET /admin/audit?extension_id=norm` lists
    only the extension's rows, `?policy_id=norm` only the policy's `policy_*` rows, the
    unfiltered list both (each row's action says which kind); both filters at once is 422."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, {"policy_id": "norm", "pre": [{"id": "norm"}]})
        await api.client.post("/admin/extensions/norm/disable", headers=api.auth("operator"))
        await api.client.patch(
            "/admin/policies/norm", json={"enabled": False}, headers=api.auth("admin")
        )

        async def actions(**params: str) -> list[str]:
            answer = await api.client.get("/admin/audit", params=params, headers=api.auth("viewer"))
            assert 200 == answer.status_code, answer.text
            return [r["action"] for r in answer.json() if r["extension_id"] == "norm"]

        assert ["disable", "create"] == await actions(extension_id="norm")
        assert ["policy_disable", "policy_create"] == await actions(policy_id="norm")
        assert ["policy_disable", "disable", "policy_create", "create"] == await actions()
        both = await api.client.get(
            "/admin/audit",
            params={"extension_id": "norm", "policy_id": "norm"},
            headers=api.auth("viewer"),
        )
        assert (422, "ConfigError") == (both.status_code, both.json()["error"])


async def test_a_policy_row_broken_by_plain_sql_can_be_deleted(tmp_path: Path, db_url: str) -> None:
    """A row whose body plain SQL broke is left out of the cache and named in
    `invalid_records`; DELETE removes it all the same (204, audited), unless it carries an
    If-Match, which no unreadable row can match (412, the row stays); a second DELETE is 404."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, FLOW)
        sql(db_url, """UPDATE routing_policies SET body = '{"pre": [{"mode": "optional"}]}'""")
        registry = api.runtime.registry
        await registry.refresh([], policy_ids=["flow"])
        assert (None, ["policy:flow"]) == (
            registry.policy("flow"),
            sorted(registry.status.invalid_records),
        )
        conditional = await api.client.delete(
            "/admin/policies/flow", headers={**api.auth("admin"), "If-Match": '"x"'}
        )
        assert (412, "StaleETag") == (conditional.status_code, conditional.json()["error"])
        assert 1 == counts(db_url)[0]
        deleted = await api.client.delete("/admin/policies/flow", headers=api.auth("admin"))
        assert 204 == deleted.status_code, deleted.text
        assert 0 == counts(db_url)[0]
        assert "policy_delete" == policy_audit(db_url, "flow")[-1][0]
        assert [] == sorted(registry.status.invalid_records)
        again = await api.client.delete("/admin/policies/flow", headers=api.auth("admin"))
        assert (404, "PolicyNotFound") == (again.status_code, again.json()["error"])


async def test_put_creates_or_replaces_and_the_answer_round_trips(
    tmp_path: Path, db_url: str
) -> None:
    """PUT of a missing policy creates it (201: `extreg policy apply` is one idempotent
    request), unless If-Match names a version (412, nothing written); what a write answers
    (with its `warnings` and stamps) can be sent back as is."""
    async with policy_api(tmp_path, db_url) as api:
        conditional = await api.client.put(
            "/admin/policies/flow", json=FLOW, headers={**api.auth("admin"), "If-Match": '"x"'}
        )
        assert 412 == conditional.status_code
        assert (0, 0) == (counts(db_url)[0], len(policy_audit(db_url, "flow")))
        first = await api.client.put("/admin/policies/flow", json=FLOW, headers=api.auth("admin"))
        assert 201 == first.status_code, first.text
        again = await api.client.put(
            "/admin/policies/flow", json=first.json(), headers=api.auth("admin")
        )
        assert 200 == again.status_code, again.text
        assert first.headers["etag"] == again.headers["etag"]  # unchanged: not even stamped
        assert ["policy_create"] == [a for a, _ in policy_audit(db_url, "flow")]


async def test_duplicate_create_is_409_and_long_policies_get_warnings(
    tmp_path: Path, db_url: str
) -> None:
    """A second create of an id answers 409 and writes nothing; a policy longer than the
    original's recommendation is stored with `warnings` saying so."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, FLOW)
        before = counts(db_url)
        again = await api.client.post("/admin/policies", json=FLOW, headers=api.auth("admin"))
        assert 409 == again.status_code
        assert "Conflict" == again.json()["error"]
        assert before == counts(db_url)
        long = {
            "policy_id": "long",
            "pre": [{"id": "norm"}] * 3,
            "validators": [{"id": "guard"}] * 2,
        }
        answer = await create(api, long)
        warnings = answer.json()["warnings"]
        assert any("pre: 3 items" in w for w in warnings), warnings
        assert any("5 pre, validator and post items" in w for w in warnings), warnings


async def test_list_shows_every_policy_with_what_makes_it_unusable(
    tmp_path: Path, db_url: str
) -> None:
    """GET /admin/policies lists every policy, disabled ones too, each with `unusable` (empty
    while it can run as written) and `recent_runs`; disabling an extension it names makes it
    unusable at once, and /admin/status and the policy read by id say so too; `?enabled=`
    filters."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, FLOW)
        await create(api, {"policy_id": "off", "enabled": False, "pre": [{"id": "norm"}]})
        listed = await api.client.get("/admin/policies", headers=api.auth("viewer"))
        assert 200 == listed.status_code
        by_id = {p["policy_id"]: p for p in listed.json()}
        assert ["flow", "off"] == sorted(by_id)
        assert [] == by_id["flow"]["unusable"]
        assert 0 == by_id["flow"]["recent_runs"]["total"]
        only_enabled = await api.client.get(
            "/admin/policies", params={"enabled": "true"}, headers=api.auth("viewer")
        )
        assert ["flow"] == [p["policy_id"] for p in only_enabled.json()]

        disabled = await api.client.post(
            "/admin/extensions/guard/disable", headers=api.auth("operator")
        )
        assert 200 == disabled.status_code
        listed = await api.client.get("/admin/policies", headers=api.auth("viewer"))
        flow = next(p for p in listed.json() if p["policy_id"] == "flow")
        assert ["validators[0].id: extension 'guard' is disabled"] == flow["unusable"]
        status = await api.client.get("/admin/status", headers=api.auth("viewer"))
        assert {"flow": flow["unusable"]} == status.json()["unusable_policies"]
        one = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert flow == one.json()  # read by id, as listed


async def test_roles(tmp_path: Path, db_url: str) -> None:
    """Viewers read and dry-run; operators also run but cannot write; only admins write;
    no token is 401. A refused write writes nothing."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, FLOW)
        writes: list[tuple[str, str, Any]] = [
            ("POST", "/admin/policies", {**FLOW, "policy_id": "other"}),
            ("PUT", "/admin/policies/flow", FLOW),
            ("PATCH", "/admin/policies/flow", {"enabled": False}),
            ("DELETE", "/admin/policies/flow", None),
        ]
        before = counts(db_url)
        for role in ("viewer", "operator"):
            for method, path, body in writes:
                answer = await api.client.request(method, path, json=body, headers=api.auth(role))
                assert 403 == answer.status_code, (role, method, answer.text)
        assert before == counts(db_url)
        run_body = {"message": {"payload": "hi"}, "context": {}}
        viewer_run = await api.client.post(
            "/admin/policies/flow/run", json=run_body, headers=api.auth("viewer")
        )
        assert 403 == viewer_run.status_code
        operator_run = await api.client.post(
            "/admin/policies/flow/run", json=run_body, headers=api.auth("operator")
        )
        assert 503 == operator_run.status_code  # past the role check: no invoker here
        assert "NatsUnavailable" == operator_run.json()["error"]
        for path in ("/admin/policies", "/admin/policies/flow"):
            assert 200 == (await api.client.get(path, headers=api.auth("viewer"))).status_code
            assert 401 == (await api.client.get(path)).status_code
        dry = await api.client.post(
            "/admin/policies/flow/dry-run", json=run_body, headers=api.auth("viewer")
        )
        assert 200 == dry.status_code


async def test_fixtures_mode_serves_the_bundled_policy_and_refuses_writes(
    tmp_path: Path,
) -> None:
    """On the bundled fixtures the API serves support_en (normalize_text -> pii_guard ->
    test_provider -> mask_pii) and its ETag; every write answers 409 saying the fixtures are
    read-only."""
    tokens_file, token = admin_token_file(tmp_path)
    settings = make_settings(
        tmp_path, source="fixtures", fixtures_dir=BUNDLED, api_tokens_file=tokens_file
    )
    admin = {"Authorization": f"Bearer {token}"}
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            listed = await client.get("/admin/policies", headers=admin)
            one = await client.get("/admin/policies/support_en", headers=admin)
            body = {"policy_id": "support_en", "pre": [{"id": "normalize_text"}]}
            writes = [
                await client.post(
                    "/admin/policies", json={**body, "policy_id": "x"}, headers=admin
                ),
                await client.put("/admin/policies/support_en", json=body, headers=admin),
                await client.patch("/admin/policies/support_en", json={}, headers=admin),
                await client.delete("/admin/policies/support_en", headers=admin),
            ]
    support = next(p for p in listed.json() if p["policy_id"] == "support_en")
    assert [] == support["unusable"]
    assert (["normalize_text"], ["pii_guard"], ["test_provider"], ["mask_pii"]) == (
        [i["id"] for i in support["pre"]],
        [i["id"] for i in support["validators"]],
        support["providers"],
        [i["id"] for i in support["post"]],
    )
    assert 200 == one.status_code and one.headers["etag"]
    assert [409] * 4 == [w.status_code for w in writes]
    assert all("fixtures" in w.json()["detail"] for w in writes)


# -- write-time validation ---------------------------------------------------------------------

BAD_CREATES: list[tuple[str, dict[str, Any] | str, list[Any]]] = [
    ("a mode no one knows", {**FLOW, "pre": [{"id": "norm", "mode": "sometimes"}]},
     ["body", "pre", 0, "mode"]),
    ("an on_fail no one knows", {**FLOW, "validators": [{"id": "guard", "on_fail": "shrug"}]},
     ["body", "validators", 0, "on_fail"]),
    ("an unknown field of an item", {**FLOW, "post": [{"id": "mask", "on_fail": "warn"}]},
     ["body", "post", 0, "on_fail"]),
    ("an unknown top-level field", {**FLOW, "stages": []}, ["body", "stages"]),
    ("no policy_id", {k: v for k, v in FLOW.items() if k != "policy_id"}, ["body", "policy_id"]),
    ("a bad policy_id", {**FLOW, "policy_id": "no spaces"}, ["body", "policy_id"]),
    ("an item without id", {**FLOW, "pre": [{"mode": "required"}]}, ["body", "pre", 0, "id"]),
    ("a provider name with a space", {**FLOW, "providers": ["prov", "open ai:x"]},
     ["body", "providers", 1]),
    ("a when that is no mapping of strings", {**FLOW, "pre": [{"id": "norm", "when": {"c": 1}}]},
     ["body", "pre", 0, "when"]),
    ("more pre items than extension_max_pre_count", {**FLOW, "pre": [{"id": "norm"}] * 6},
     ["body", "pre"]),
    ("a validator naming no extension",
     {**FLOW, "validators": [{"id": "guard"}, {"id": "nope"}]}, ["body", "validators", 1, "id"]),
    ("a pre naming a post extension", {**FLOW, "pre": [{"id": "mask"}]}, ["body", "pre", 0, "id"]),
    ("a provider naming a pre extension", {**FLOW, "providers": ["norm"]},
     ["body", "providers", 0]),
    ("a post naming no extension", {**FLOW, "post": [{"id": "mask"}, {"id": "ghost"}]},
     ["body", "post", 1, "id"]),
    ("a NUL character in a config", {**FLOW, "pre": [{"id": "norm", "config": {"k": "a\x00"}}]},
     ["body", "pre", 0, "config", "k"]),
    ("a body that is no object", "[1, 2]", ["body"]),
]  # fmt: skip


@pytest.mark.parametrize(("case", "body", "loc"), BAD_CREATES, ids=[c[0] for c in BAD_CREATES])
async def test_a_bad_create_is_422_naming_field_and_item_and_writes_nothing(
    tmp_path: Path, db_url: str, case: str, body: dict[str, Any] | str, loc: list[Any]
) -> None:
    """Each rule a policy breaks answers 422 InvalidRecord whose `loc` names the field and
    the item (`pre[0].mode` -> ["body", "pre", 0, "mode"]); no row, no audit row."""
    async with policy_api(tmp_path, db_url) as api:
        before = counts(db_url)
        content = body if isinstance(body, str) else json.dumps(body)
        answer = await api.client.post(
            "/admin/policies",
            content=content,
            headers={**api.auth("admin"), "Content-Type": "application/json"},
        )
        assert 422 == answer.status_code, answer.text
        found = answer.json()
        assert "InvalidRecord" == found["error"]
        assert loc in [d["loc"] for d in found["detail"]], found
        assert before == counts(db_url)


BAD_CHANGES: list[tuple[str, str, dict[str, Any], list[Any]]] = [
    ("PUT", "a validator of the wrong type", {**FLOW, "validators": [{"id": "norm"}]},
     ["body", "validators", 0, "id"]),
    ("PUT", "another policy_id than the URL's", {**FLOW, "policy_id": "other"},
     ["body", "policy_id"]),
    ("PATCH", "a mode no one knows", {"post": [{"id": "mask", "mode": "maybe"}]},
     ["body", "post", 0, "mode"]),
    ("PATCH", "a provider naming no extension", {"providers": ["prov", "ghost"]},
     ["body", "providers", 1]),
    ("PATCH", "a disabled-extension reference of the wrong type", {"pre": [{"id": "late"}]},
     ["body", "pre", 0, "id"]),
]  # fmt: skip


@pytest.mark.parametrize(
    ("method", "case", "body", "loc"), BAD_CHANGES, ids=[f"{c[0]} {c[1]}" for c in BAD_CHANGES]
)
async def test_a_bad_change_is_422_and_leaves_the_policy_as_it_was(
    tmp_path: Path, db_url: str, method: str, case: str, body: dict[str, Any], loc: list[Any]
) -> None:
    """A PUT or PATCH that breaks a rule answers 422 naming field and item; the stored
    policy, its ETag and the audit log stay as they were."""
    async with policy_api(tmp_path, db_url) as api:
        tag = (await create(api, FLOW)).headers["etag"]
        before = counts(db_url)
        answer = await api.client.request(
            method, "/admin/policies/flow", json=body, headers=api.auth("admin")
        )
        assert 422 == answer.status_code, answer.text
        assert loc in [d["loc"] for d in answer.json()["detail"]], answer.json()
        assert before == counts(db_url)
        read = await api.client.get("/admin/policies/flow", headers=api.auth("viewer"))
        assert tag == read.headers["etag"]


# -- dry run -----------------------------------------------------------------------------------


async def listeners(
    stack: contextlib.AsyncExitStack,
    nc: Client,
    tag: str,
    answers: dict[str, Callable[[Msg], bytes | None] | None],
) -> dict[str, Listener]:
    return {
        ext_id: await stack.enter_async_context(listen(nc, f"test.{tag}.{ext_id}", answer))
        for ext_id, answer in answers.items()
    }


def echo(msg: Msg) -> bytes:
    """A pre/post reply: the message back as the new message."""
    request = json.loads(msg.data)
    return json.dumps({"payload": request["payload"], "metadata": {}}).encode()


def ok(msg: Msg) -> bytes:
    return b'{"status": "ok"}'


def provider_reply(msg: Msg) -> bytes:
    return json.dumps({"provider_id": "prov", "output": "an answer", "metadata": {}}).encode()


HAPPY: dict[str, Callable[[Msg], bytes | None] | None] = {
    "norm": echo,
    "guard": ok,
    "prov": provider_reply,
    "mask": echo,
}


async def test_dry_run_plans_by_the_context_and_sends_nothing(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """The dry run answers each step `would_run` or `skipped` by its `when` on the context
    given (the policy's tenant filling a context without one), and no message reaches any
    extension: a real run afterwards is the witness (its messages, one per step, arrive and
    are the only ones)."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        tag = api.extras["tag"]
        await create(
            api,
            {
                **FLOW,
                "tenant_id": "acme",
                "pre": [{"id": "norm", "when": {"channel": ["web"]}}],
                "post": [{"id": "mask", "when": {"tenant_id": "acme"}}],
            },
        )
        async with contextlib.AsyncExitStack() as stack:
            heard = await listeners(stack, nats_client, tag, HAPPY)
            dry = await api.client.post(
                "/admin/policies/flow/dry-run",
                json={"message": {"payload": "hi"}, "context": {"channel": "telegram"}},
                headers=api.auth("viewer"),
            )
            assert 200 == dry.status_code, dry.text
            assert [
                ("pre", "norm", "skipped"),
                ("validator", "guard", "would_run"),
                ("provider", "prov", "would_run"),
                ("post", "mask", "would_run"),
            ] == [(s["stage"], s["id"], s["status"]) for s in dry.json()["steps"]]
            run = await api.client.post(
                "/admin/policies/flow/run",
                json={"message": {"payload": "hi"}, "context": {"channel": "web"}},
                headers=api.auth("operator"),
            )
            assert 200 == run.status_code, run.text
            await nats_client.flush()
            assert {"norm": 1, "guard": 1, "prov": 1, "mask": 1} == {
                ext_id: listener.count for ext_id, listener in heard.items()
            }


async def test_dry_run_of_a_missing_or_disabled_policy(tmp_path: Path, db_url: str) -> None:
    """A dry run predicts a run: 404 PolicyNotFound, 409 PolicyDisabled."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, {**FLOW, "enabled": False})
        missing = await api.client.post(
            "/admin/policies/nope/dry-run", json={}, headers=api.auth("viewer")
        )
        assert (404, "PolicyNotFound") == (missing.status_code, missing.json()["error"])
        off = await api.client.post(
            "/admin/policies/flow/dry-run", json={}, headers=api.auth("viewer")
        )
        assert (409, "PolicyDisabled") == (off.status_code, off.json()["error"])


# -- runs --------------------------------------------------------------------------------------


def reject(msg: Msg) -> bytes:
    return json.dumps(
        {"status": "reject", "reason": "pii_detected", "details": {"kind": "card"}}
    ).encode()


def not_json(msg: Msg) -> bytes:
    return b"not json"


async def run(api: Api, context: dict[str, Any] | None = None) -> httpx.Response:
    return await api.client.post(
        "/admin/policies/flow/run",
        json={"message": {"payload": "Hello"}, "context": context or {"trace_id": "t-1"}},
        headers=api.auth("operator"),
    )


async def test_a_run_answers_the_result(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A run through real responders answers the final message, the context, the provider
    and every step `ok`, in policy order; the list then counts it in `recent_runs`."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        async with contextlib.AsyncExitStack() as stack:
            await listeners(stack, nats_client, api.extras["tag"], HAPPY)
            answer = await run(api)
        assert 200 == answer.status_code, answer.text
        result = answer.json()
        assert "prov" == result["provider_id"]
        assert "an answer" == result["message"]["payload"]
        assert "t-1" == result["context"]["trace_id"]
        assert [("pre", "ok"), ("validator", "ok"), ("provider", "ok"), ("post", "ok")] == [
            (s["stage"], s["status"]) for s in result["steps"]
        ]
        listed = await api.client.get("/admin/policies", headers=api.auth("viewer"))
        runs = listed.json()[0]["recent_runs"]
        assert (1, {"ok": 1}, "ok") == (runs["total"], runs["outcomes"], runs["last_outcome"])


async def test_apps_over_one_invoker_share_one_recent_runs_observer(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    """Every `create_app` over the same runtime reuses the one recent-runs observer of its
    invoker's pipeline (the observer list does not grow with the apps), so a run made
    through one app shows in the others' `recent_runs`."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, {**FLOW, "enabled": False})
        assert api.runtime.invoker is not None
        observers = api.runtime.invoker.pipeline.observers
        before = len(observers)
        other = create_app(api.runtime)
        create_app(api.runtime)
        assert before == len(observers)
        transport = httpx.ASGITransport(app=other)
        async with httpx.AsyncClient(transport=transport, base_url="http://other") as client:
            off = await client.post(
                "/admin/policies/flow/run", json={}, headers=api.auth("operator")
            )
        assert 409 == off.status_code, off.text
        listed = await api.client.get("/admin/policies", headers=api.auth("viewer"))
        assert {"disabled": 1} == listed.json()[0]["recent_runs"]["outcomes"]


async def test_a_run_goes_to_whatever_invoker_the_runtime_has(tmp_path: Path, db_url: str) -> None:
    """The run route asks the runtime's invoker for `run_policy`, whichever it is: here the
    echoing test double, whose real runner calls `alpha` (pre) and answers its echo."""
    invoker = EchoInvoker()
    async with database_api(tmp_path, db_url, invoker=invoker) as api:
        await create(api, {"policy_id": "echo", "pre": [{"id": "alpha"}]})
        answer = await api.client.post(
            "/admin/policies/echo/run",
            json={"message": {"payload": "hi"}},
            headers=api.auth("operator"),
        )
    assert 200 == answer.status_code, answer.text
    assert ("hi", [("pre", "alpha", "ok")]) == (
        answer.json()["message"]["payload"],
        [(s["stage"], s["id"], s["status"]) for s in answer.json()["steps"]],
    )
    assert ["alpha"] == [ext_id for ext_id, _, _ in invoker.calls]


async def test_a_blocking_validator_answers_403_with_its_reason(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A validator's reject answers 403 ValidatorBlocked with its `reason` and `details`
    top-level and the steps so far; nothing after it runs."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        async with contextlib.AsyncExitStack() as stack:
            heard = await listeners(
                stack, nats_client, api.extras["tag"], {**HAPPY, "guard": reject}
            )
            answer = await run(api)
            await nats_client.flush()
            assert 0 == heard["prov"].count
        assert 403 == answer.status_code, answer.text
        body = answer.json()
        assert ("ValidatorBlocked", "pii_detected", {"kind": "card"}) == (
            body["error"],
            body["reason"],
            body["details"],
        )
        assert "guard" == body["extension_id"]
        assert isinstance(body["detail"], str)
        assert [("pre", "ok"), ("validator", "rejected")] == [
            (s["stage"], s["status"]) for s in body["steps"]
        ]


async def test_a_failed_required_step_answers_502(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A required pre answering no JSON stops the run: 502 StepFailed naming the cause."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        async with contextlib.AsyncExitStack() as stack:
            await listeners(stack, nats_client, api.extras["tag"], {**HAPPY, "norm": not_json})
            answer = await run(api)
        assert 502 == answer.status_code, answer.text
        body = answer.json()
        assert ("StepFailed", "InvalidResponse") == (body["error"], body["cause"]["error"])
        assert [("pre", "norm", "failed")] == [
            (s["stage"], s["id"], s["status"]) for s in body["steps"]
        ]


async def test_no_provider_answers_502(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """Every provider failing (here a hook provider without a hook, then one answering no
    JSON) answers 502 NoProvider with a step per provider tried."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, {**FLOW, "providers": ["openai:gpt-4.1-mini", "prov"]})
        async with contextlib.AsyncExitStack() as stack:
            await listeners(stack, nats_client, api.extras["tag"], {**HAPPY, "prov": not_json})
            answer = await run(api)
        assert 502 == answer.status_code, answer.text
        body = answer.json()
        assert "NoProvider" == body["error"]
        assert [("openai:gpt-4.1-mini", "failed"), ("prov", "failed")] == [
            (s["id"], s["status"]) for s in body["steps"] if s["stage"] == "provider"
        ]


async def test_an_open_circuit_answers_503(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """The required pre's circuit forced open: 503 StepFailed whose cause is CircuitOpen,
    and the pre's subject hears nothing."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        forced = await api.client.post(
            "/admin/extensions/norm/circuit", json={"action": "open"}, headers=api.auth("operator")
        )
        assert 200 == forced.status_code, forced.text
        async with contextlib.AsyncExitStack() as stack:
            heard = await listeners(stack, nats_client, api.extras["tag"], HAPPY)
            answer = await run(api)
            await nats_client.flush()
            assert 0 == heard["norm"].count
        assert 503 == answer.status_code, answer.text
        body = answer.json()
        assert ("StepFailed", "CircuitOpen") == (body["error"], body["cause"]["error"])
        assert ["failed"] == [s["status"] for s in body["steps"]]


async def test_every_provider_circuit_open_answers_503(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """NoProvider because the last provider's circuit is open: 503, not 502."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        await api.client.post(
            "/admin/extensions/prov/circuit", json={"action": "open"}, headers=api.auth("operator")
        )
        async with contextlib.AsyncExitStack() as stack:
            await listeners(stack, nats_client, api.extras["tag"], HAPPY)
            answer = await run(api)
        assert (503, "NoProvider") == (answer.status_code, answer.json()["error"])


async def test_a_timed_out_step_answers_504(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """A required pre that never answers (within its 200 ms timeout): 504 StepFailed whose
    cause is ExtensionTimeout."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url, timeouts={"norm": 200}) as api:
        await create(api, FLOW)
        async with contextlib.AsyncExitStack() as stack:
            heard = await listeners(stack, nats_client, api.extras["tag"], {**HAPPY, "norm": None})
            answer = await run(api)
            assert 1 <= heard["norm"].count  # it was asked, and kept silent
        assert 504 == answer.status_code, answer.text
        body = answer.json()
        assert ("StepFailed", "ExtensionTimeout") == (body["error"], body["cause"]["error"])


async def test_runs_of_missing_and_disabled_policies(
    tmp_path: Path, db_url: str, nats_url: str
) -> None:
    """404 PolicyNotFound and 409 PolicyDisabled, each with `steps` (none ran)."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, {**FLOW, "enabled": False})
        missing = await api.client.post(
            "/admin/policies/nope/run", json={}, headers=api.auth("operator")
        )
        assert (404, "PolicyNotFound", []) == (
            missing.status_code,
            missing.json()["error"],
            missing.json()["steps"],
        )
        off = await run(api)
        assert (409, "PolicyDisabled") == (off.status_code, off.json()["error"])


async def test_a_bad_run_body_is_422(tmp_path: Path, db_url: str, nats_url: str) -> None:
    """An unknown key, a context that is no object, or a trace_id that is no string: 422."""
    async with policy_api(tmp_path, db_url, nats_url=nats_url) as api:
        await create(api, FLOW)
        bodies: list[dict[str, Any]] = [
            {"mesage": {}},
            {"context": []},
            {"context": {"trace_id": 5}},
        ]
        for body in bodies:
            for route in ("run", "dry-run"):
                answer = await api.client.post(
                    f"/admin/policies/flow/{route}", json=body, headers=api.auth("operator")
                )
                assert 422 == answer.status_code, (route, body, answer.text)
                assert "InvalidRecord" == answer.json()["error"]


async def test_a_run_context_is_checked_as_the_runner_checks_it(
    tmp_path: Path, db_url: str
) -> None:
    """A context the runner refuses (`dry_run`, a tenant_id that is no short string) is 422
    naming the field, on the run route before it needs an invoker (none here) and on the dry
    run, which predicts the run; the answer names the policy and the context."""
    async with policy_api(tmp_path, db_url) as api:
        await create(api, FLOW)
        contexts: list[tuple[dict[str, Any], list[Any]]] = [
            ({"dry_run": True}, ["body", "context", "dry_run"]),
            ({"tenant_id": "t" * 256}, ["body", "context", "tenant_id"]),
        ]
        for context, loc in contexts:
            for route in ("run", "dry-run"):
                answer = await api.client.post(
                    f"/admin/policies/flow/{route}",
                    json={"context": context},
                    headers=api.auth("operator"),
                )
                assert 422 == answer.status_code, (route, context, answer.text)
                body = answer.json()
                assert ("InvalidRecord", "flow", "context") == (
                    body["error"],
                    body["record"],
                    body["kind"],
                )
                assert [loc] == [d["loc"] for d in body["detail"]]


# -- freshness ---------------------------------------------------------------------------------


async def test_a_policy_changed_with_plain_sql_is_served_soon(tmp_path: Path, db_url: str) -> None:
    """A running server serves a policy inserted, then changed, with plain SQL (the
    notification brings it; no upper bound asserted, the deadline is generous)."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    await seed(db_url, settings, *stage_records("sql"))
    tokens = await make_tokens(db_url)
    headers = {"Authorization": f"Bearer {tokens['viewer']}"}
    with live_server(settings) as server:
        async with httpx.AsyncClient(base_url=server.url, headers=headers) as client:
            assert 404 == (await client.get("/admin/policies/by_sql")).status_code
            sql(
                db_url,
                "INSERT INTO routing_policies (policy_id, body) VALUES (%s, %s)",
                ("by_sql", json.dumps({"pre": [{"id": "norm"}]})),
            )
            await until(client, lambda p: p is not None and p["pre"][0]["id"] == "norm")
            sql(
                db_url,
                "UPDATE routing_policies SET tenant_id = 'acme', body = %s WHERE policy_id = %s",
                (json.dumps({"pre": [], "post": [{"id": "mask"}]}), "by_sql"),
            )
            await until(client, lambda p: p is not None and p["tenant_id"] == "acme")
            read = (await client.get("/admin/policies/by_sql")).json()
            assert ([], "mask") == (read["pre"], read["post"][0]["id"])
            sql(db_url, "DELETE FROM routing_policies WHERE policy_id = 'by_sql'")
            await until(client, lambda p: p is None)


async def until(client: httpx.AsyncClient, shown: Callable[[dict[str, Any] | None], bool]) -> None:
    """Poll the policy until `shown` holds; the deadline is generous, not a speed check."""
    async with asyncio.timeout(DEADLINE_S):
        while True:
            answer = await client.get("/admin/policies/by_sql")
            if shown(answer.json() if answer.status_code == 200 else None):
                return
            await asyncio.sleep(0.05)


# -- OpenAPI -----------------------------------------------------------------------------------


def test_openapi_lists_the_policy_routes_with_summaries(tmp_path: Path) -> None:
    """Every policy route is in the OpenAPI document with a summary and a description, the
    write bodies as components."""
    settings = make_settings(tmp_path, source="fixtures")
    document = create_app(Runtime(settings, Registry(settings), metrics=Metrics())).openapi()
    paths = document["paths"]
    wanted = {
        "/admin/policies": {"get", "post"},
        "/admin/policies/{policy_id}": {"get", "put", "patch", "delete"},
        "/admin/policies/{policy_id}/run": {"post"},
        "/admin/policies/{policy_id}/dry-run": {"post"},
    }
    for path, methods in wanted.items():
        assert methods <= set(paths[path]), path
        for method in methods:
            operation = paths[path][method]
            assert operation["summary"] and operation["description"], (path, method)
            assert ["policies"] == operation["tags"]
    for name in ("Policy", "PolicyCreate", "PolicyReplace", "PolicyPatch", "PolicyWritten"):
        assert name in document["components"]["schemas"]


# -- the pieces, without I/O -------------------------------------------------------------------

CAUSES: list[tuple[type[PolicyError], ExtensionError | None, int]] = [
    (StepFailed, CircuitOpen("x"), 503),
    (StepFailed, HealthRefused("x"), 503),
    (StepFailed, ExtensionDisabled("x"), 503),
    (StepFailed, ExtensionNotFound("x"), 503),
    (StepFailed, TransportUnavailable("x"), 503),
    (StepFailed, ExtensionTimeout("x"), 504),
    (NoProvider, MaxRetriesExceeded("x"), 504),
    (StepFailed, InvalidResponse("x"), 502),
    (NoProvider, InvocationError("x", "no responders on s"), 502),
    (NoProvider, None, 502),
    (PolicyNotFound, None, 404),
    (PolicyDisabled, None, 409),
    (PolicyError, None, 502),  # a bare one: a run gave no result, as for its subclasses
]


@pytest.mark.parametrize(("cls", "cause", "status"), CAUSES)
def test_the_status_of_a_failed_run_follows_its_cause(
    cls: type[PolicyError], cause: ExtensionError | None, status: int
) -> None:
    """A failed step or no provider is 503 when the extension could not be called, 504 when
    it timed out, else 502; a validator's block is 403 whatever its cause."""
    assert status == status_of(cls("p", None, [], cause))
    assert 403 == status_of(ValidatorBlocked("p", "v", "r", {}, [], cause))


def test_the_statuses_of_policy_errors_are_the_documented_ones() -> None:
    """Each PolicyError class answers the status the errors table of docs/usage.md gives it
    first (the base class 502, not the 500 of an unmapped error)."""
    table = (Path(__file__).parents[1] / "docs" / "usage.md").read_text("utf-8")
    documented = {
        m[1]: int(m[2]) for m in re.finditer(r"^\| `(\w+)` \|.*\| (\d{3})\b[^|]*\|$", table, re.M)
    }
    samples: list[PolicyError] = [
        cls("p") for cls in (PolicyError, PolicyNotFound, PolicyDisabled, StepFailed, NoProvider)
    ]
    samples.append(ValidatorBlocked("p", "v"))
    assert {type(e).__name__: documented[type(e).__name__] for e in samples} == {
        type(e).__name__: status_of(e) for e in samples
    }


def test_recent_runs_stay_bounded() -> None:
    """The ring keeps the last `per_policy` outcomes of at most `policies` policies (the least
    recently run dropped first), and no ring for a run of an unknown id."""
    runs = RecentRuns(per_policy=3, policies=2)
    for outcome in ("ok", "blocked", "ok", "ok"):
        runs.record("a", outcome)
    assert (3, {"ok": 2, "blocked": 1}) == (
        runs.summary("a")["total"],
        runs.summary("a")["outcomes"],
    )
    runs.record("ghost", "not_found")
    assert 0 == runs.summary("ghost")["total"]
    runs.record("b", "ok")
    runs.record("c", "ok")
    assert 0 == runs.summary("a")["total"]  # the least recently run, dropped
    assert (1, 1) == (runs.summary("b")["total"], runs.summary("c")["total"])
