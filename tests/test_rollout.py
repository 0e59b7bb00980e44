"""Percentage rollout with sticky hashing (SPEC.md, "Progressive delivery and overload"; issue
14, item 1): a version's `routing_rules` may say `"percent": P` and `"hash_on": KEY`, and the
version then takes the contexts whose stable hash of (extension id, version, key value) falls
below P, the same in every process; combined with the other rule keys and with the canary
recipe; validated where every record is; shown by `extreg versions ID`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from hashlib import blake2b
from pathlib import Path
from typing import Any

import msgspec
import pytest
from api_helpers import seed
from cli_helpers import extreg, outcome
from helpers import make_settings, record
from invoke_helpers import constant, listen, open_invoker, subject
from nats.aio.client import Client

from extreg.core.model import Extension, parse_extension, record_problems
from extreg.core.routing import Limits, Route, rollout_point
from extreg.errors import InvalidRecord

KEYS = [f"tenant-{n}" for n in range(3_000)]


def routed(*versions: dict[str, Any], ext_id: str = "x") -> Route:
    """The route of extension `ext_id` with `versions` (later in the list = newer)."""
    data = record(ext_id, subject=f"ext.{ext_id}.v1", versions=list(versions))
    return Route(parse_extension(data, max_timeout_ms=60_000, max_retries=10), Limits())


def version(name: str, rules: dict[str, Any], **values: Any) -> dict[str, Any]:
    return {"version": name, "subject": f"ext.x.{name}", "routing_rules": rules, **values}


def ctx(**values: Any) -> Callable[[str], Any]:
    return values.get


def documented_point(ext_id: str, version_name: str, value: str) -> float:
    """The hash as docs/usage.md states it, written out here so that a change of algorithm
    (which would move contexts between versions on upgrade) fails this suite: BLAKE2b with
    an 8-byte digest of `id NUL version NUL value` in UTF-8, big-endian, scaled to [0, 100)."""
    data = f"{ext_id}\x00{version_name}\x00{value}".encode()
    return int.from_bytes(blake2b(data, digest_size=8).digest(), "big") * 100 / 2**64


# -- the split ---------------------------------------------------------------------------------


@pytest.mark.parametrize("percent", [1, 10, 12.5, 33.3, 50, 90])
def test_share_is_within_two_points_over_3000_keys(percent: float) -> None:
    """The version takes P% of 3,000 tenants, within ±2 points; the rest reach the row."""
    route = routed(version("v2", {"percent": percent}))
    taken = sum(route.pick(ctx(tenant_id=key)).version == "v2" for key in KEYS)
    assert percent == pytest.approx(100 * taken / len(KEYS), abs=2)


def test_assignment_is_the_documented_hash() -> None:
    """A context is taken exactly when its documented hash falls below P: the split can be
    reproduced by another process, another node or another language from the docs alone."""
    route = routed(version("v2", {"percent": 25}))
    for key in KEYS:
        expected = "v2" if documented_point("x", "v2", key) < 25 else "v1"
        assert expected == route.pick(ctx(tenant_id=key)).version, key
        assert documented_point("x", "v2", key) == rollout_point("x", "v2", key)


CHILD = """
import json, sys
from extreg.core.model import parse_extension
from extreg.core.routing import Limits, Route
data, keys = json.loads(sys.stdin.read())
route = Route(parse_extension(data, max_timeout_ms=60_000, max_retries=10), Limits())
print(json.dumps([route.pick({"tenant_id": k}.get).version for k in keys]))
"""


def test_another_process_assigns_every_key_alike() -> None:
    """A second Python process (another PYTHONHASHSEED, so Python's `hash()` would differ)
    routes the 3,000 keys exactly as this one does."""
    versions = [version("v2", {}), version("v3", {"percent": 40}), version("v4", {"percent": 5})]
    data = record("x", subject="ext.x.v1", versions=versions)
    here = [routed(*versions).pick(ctx(tenant_id=k)).version for k in KEYS]
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run(
        [sys.executable, "-c", CHILD],
        input=json.dumps([data, KEYS]),
        capture_output=True,
        text=True,
        env=env,
        check=True,
        timeout=60,
    )
    assert here == json.loads(there.stdout)
    assert {"v2", "v3", "v4"} == set(here)


def test_raising_the_percent_keeps_the_contexts_already_in() -> None:
    """Sticky: going from 10% to 20% adds contexts and moves none of the 10% back out."""
    at_10, at_20 = (
        {k for k in KEYS if routed(version("v2", {"percent": p})).pick(ctx(tenant_id=k)).version
         == "v2"}
        for p in (10, 20)
    )  # fmt: skip
    assert at_10 < at_20


def test_each_version_draws_its_own_contexts() -> None:
    """The version is part of the hash: a v3 at 10% after a v2 at 10% takes other tenants,
    not the same ones again (so a rollout's next step starts from a fresh sample)."""
    v2 = {k for k in KEYS if rollout_point("x", "v2", k) < 10}
    v3 = {k for k in KEYS if rollout_point("x", "v3", k) < 10}
    assert len(v2 & v3) < len(v2) / 3


def test_zero_takes_nothing_and_hundred_takes_every_keyed_context() -> None:
    """0 takes no context; 100 every context that has the key."""
    none, every = routed(version("v2", {"percent": 0})), routed(version("v2", {"percent": 100}))
    assert {"v1"} == {none.pick(ctx(tenant_id=k)).version for k in KEYS}
    assert {"v2"} == {every.pick(ctx(tenant_id=k)).version for k in KEYS}


# -- which key ---------------------------------------------------------------------------------


def test_default_key_is_the_tenant_else_the_trace() -> None:
    """Without hash_on the tenant decides (whatever the trace id); a context without a tenant
    is hashed on its trace id."""
    route = routed(version("v2", {"percent": 50}))
    for key in KEYS[:200]:
        by_tenant = {route.pick(ctx(tenant_id=key, trace_id=t)).version for t in ("a", "b", "c")}
        assert {"v2" if rollout_point("x", "v2", key) < 50 else "v1"} == by_tenant
        by_trace = route.pick(ctx(tenant_id=None, trace_id=key)).version
        assert ("v2" if rollout_point("x", "v2", key) < 50 else "v1") == by_trace


def test_hash_on_names_the_context_key() -> None:
    """hash_on: user_id hashes the context's user_id, not its tenant."""
    route = routed(version("v2", {"percent": 50, "hash_on": "user_id"}))
    for key in KEYS[:200]:
        expected = "v2" if rollout_point("x", "v2", key) < 50 else "v1"
        assert expected == route.pick(ctx(user_id=key, tenant_id="same")).version


def test_a_context_without_the_key_falls_through() -> None:
    """No tenant and no trace id (or no value for hash_on): the percent rule does not match,
    so the next version, else the row, takes the call; even at 100%."""
    route = routed(version("v2", {}), version("v3", {"percent": 100}))
    assert "v2" == route.pick(ctx()).version
    assert "v2" == route.pick(ctx(tenant_id="", trace_id=None)).version
    explicit = routed(version("v2", {"percent": 100, "hash_on": "user_id"}))
    assert "v1" == explicit.pick(ctx(tenant_id="acme", trace_id="t-1")).version


def test_percent_combines_with_the_other_rule_keys() -> None:
    """Every other key must match too: half of the listed tenants in the eu region."""
    listed = KEYS[:400]
    route = routed(version("v2", {"tenant_id": listed, "region": "eu", "percent": 50}))
    for key in KEYS[:800]:
        wanted = key in listed and rollout_point("x", "v2", key) < 50
        assert ("v2" if wanted else "v1") == route.pick(ctx(tenant_id=key, region="eu")).version
        assert "v1" == route.pick(ctx(tenant_id=key, region="us")).version
    taken = sum(route.pick(ctx(tenant_id=k, region="eu")).version == "v2" for k in listed)
    assert 0 < taken < len(listed)


def test_a_non_string_key_value_is_hashed_as_text() -> None:
    """A context value that is not a string is hashed as `str(value)`, as rules compare it."""
    route = routed(version("v2", {"percent": 50, "hash_on": "shard"}))
    assert [route.pick(ctx(shard=n)).version for n in range(100)] == [
        route.pick(ctx(shard=str(n))).version for n in range(100)
    ]


# -- validation (one path: parse_extension and record_problems) ------------------------------


def problems_of(*rules: dict[str, Any]) -> list[tuple[str, str]]:
    versions = [version(f"v{n + 2}", r) for n, r in enumerate(rules)]
    with pytest.raises(InvalidRecord) as caught:
        parse_extension(record("x", versions=versions), max_timeout_ms=60_000, max_retries=10)
    return caught.value.problems


@pytest.mark.parametrize(
    ("rules", "problems"),
    [
        (
            {"percent": 101},
            [("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got 101)")],
        ),
        (
            {"percent": -0.5},
            [("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got -0.5)")],
        ),
        (
            {"percent": "10"},
            [("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got '10')")],
        ),
        (
            {"percent": ["10"]},
            [("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got ['10'])")],
        ),
        (
            {"percent": 5, "hash_on": ""},
            [("versions[0].routing_rules.hash_on", "must be a non-empty string (got '')")],
        ),
        (
            {"percent": 5, "hash_on": ["user_id"]},
            [("versions[0].routing_rules.hash_on", "must be a non-empty string (got ['user_id'])")],
        ),
        (
            {"hash_on": "user_id"},
            [
                (
                    "versions[0].routing_rules.hash_on",
                    "needs percent: it names the context key percent is drawn on",
                )
            ],
        ),
        (
            {"tenant_id": 7},
            [
                (
                    "versions[0].routing_rules",
                    "'tenant_id': Expected str | array, got int (a number only goes under"
                    " 'percent')",
                )
            ],
        ),
    ],
)
def test_bad_rollout_rules_name_the_field(
    rules: dict[str, Any], problems: list[tuple[str, str]]
) -> None:
    """percent a number from 0 to 100, hash_on a non-empty string and only with percent, a
    number under no other key: each problem names the version and the key."""
    assert problems == problems_of(rules)


def test_a_boolean_percent_is_refused_by_its_type() -> None:
    """true is no number: refused by the record's types, at the version's rules."""
    [(field, message)] = problems_of({"percent": True})
    assert ("versions[0].routing_rules[...]", "got bool") == (field, message[-8:])


def test_every_version_is_checked() -> None:
    """Problems of several versions are all reported, each at its own index."""
    assert [
        ("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got 200)"),
        ("versions[1].routing_rules.hash_on", "must be a non-empty string (got '')"),
    ] == problems_of({"percent": 200}, {"percent": 1, "hash_on": ""})


def test_a_row_decoded_from_the_database_is_checked_too() -> None:
    """A record msgspec decodes straight from PostgreSQL (a version written with plain SQL)
    meets the same rules through record_problems."""
    row = record("x", versions=[version("v2", {"percent": 150})])
    ext = msgspec.json.decode(msgspec.json.encode(row), type=Extension)
    assert [
        ("versions[0].routing_rules.percent", "must be a number from 0 to 100 (got 150)")
    ] == record_problems(ext, max_timeout_ms=60_000, max_retries=10)


@pytest.mark.parametrize(
    "rules",
    [
        {"percent": 0},
        {"percent": 100},
        {"percent": 0.25, "hash_on": "user_id"},
        {"percent": 12.5, "tenant_id": ["a", "b"], "region": "eu"},
    ],
)
def test_good_rollout_rules_are_kept_as_given(rules: dict[str, Any]) -> None:
    ext = parse_extension(
        record("x", versions=[version("v2", rules)]), max_timeout_ms=60_000, max_retries=10
    )
    assert rules == ext.versions[0].routing_rules


# -- extreg versions ---------------------------------------------------------------------------


def fixtures_folder(tmp_path: Path) -> Path:
    """A folder with `canaried`: a `{}` default, a disabled v3, a 10% v4 (newest last)."""
    folder = tmp_path / "fixtures"
    folder.mkdir()
    versions = [
        version("v2", {}),
        version("v3", {"tenant_id": ["beta"]}, enabled=False),
        version("v4", {"tenant_id": ["a", "b"], "percent": 10}),
        version("v5", {"percent": 2.5, "hash_on": "user_id"}),
    ]
    data = record("canaried", subject="ext.canaried.v1", versions=versions)
    (folder / "canaried.json").write_text(json.dumps(data), encoding="utf-8")
    return folder


def versions_cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    folder = fixtures_folder(tmp_path)
    return extreg(tmp_path, "--source", "fixtures", "--fixtures-dir", str(folder), *args)


def test_versions_json_lists_the_order_tried_and_the_fallback(tmp_path: Path) -> None:
    """Newest first, disabled ones in place and marked, each with its rules and its split
    (percent, and the keys hashed: hash_on, else tenant_id then trace_id); the row last."""
    result = versions_cli(tmp_path, "versions", "canaried", "--json")
    assert (0, "") == (result.returncode, result.stderr), outcome(result)
    shown = json.loads(result.stdout)
    assert {"id": "canaried", "enabled": True} == {k: shown[k] for k in ("id", "enabled")}
    assert [
        ("v5", True, {"percent": 2.5, "hash_on": "user_id"}, 2.5, ["user_id"], False),
        ("v4", True, {"tenant_id": ["a", "b"], "percent": 10}, 10, ["tenant_id", "trace_id"],
         False),
        ("v3", False, {"tenant_id": ["beta"]}, None, None, False),
        ("v2", True, {}, None, None, False),
        ("v1", True, None, None, None, True),
    ] == [
        (v["version"], v["enabled"], v["routing_rules"], v["percent"], v["hash_on"], v["fallback"])
        for v in shown["versions"]
    ]  # fmt: skip
    assert ["ext.x.v5", "ext.canaried.v1"] == [shown["versions"][i]["subject"] for i in (0, -1)]


def test_versions_in_a_pipe_is_tab_separated(tmp_path: Path) -> None:
    """Without a terminal: a header line, then one whole line per version, the row last."""
    result = versions_cli(tmp_path, "versions", "canaried")
    assert 0 == result.returncode, outcome(result)
    lines = [line.split("\t") for line in result.stdout.splitlines()]
    assert ["version", "enabled", "subject", "routing_rules", "percent", "hash_on"] == lines[0]
    assert ["v5", "yes", "ext.x.v5", '{"percent": 2.5, "hash_on": "user_id"}', "2.5%",
            "user_id"] == lines[1]  # fmt: skip
    assert ["v4", "10%", "tenant_id, else trace_id"] == [lines[2][0], *lines[2][4:]]
    assert ["v3", "no"] == lines[3][:2]
    assert ["v1", "yes", "ext.canaried.v1", "fallback: the extension's own row", "", ""] == lines[5]


def test_versions_of_an_unknown_extension_exits_2(tmp_path: Path) -> None:
    """An id the registry does not have: exit 2, the error as the API answers it."""
    result = versions_cli(tmp_path, "versions", "nosuch", "--json")
    assert (2, "ExtensionNotFound") == (result.returncode, json.loads(result.stdout)["error"])


# -- the canary recipe, through PostgreSQL, the registry and the invoker --------------------


async def test_canary_recipe_with_a_percent(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """The original's recipe (a `{}` default written first, a canary written later) with the
    canary on 30% of the tenants, plus a later version for half of two listed beta tenants:
    each call reaches the version the documented hash says; a call with neither tenant nor
    trace id falls through the percent rules to the default; the row gets nothing."""
    row, default_on, canary_on, beta_on = subject(), subject(), subject(), subject()
    settings = make_settings(tmp_path, source="database", database_url=db_url, nats_url=nats_url)
    default = {"version": "v2", "subject": default_on, "timeout_ms": 500, "routing_rules": {}}
    canary = {**default, "version": "v3", "subject": canary_on, "routing_rules": {"percent": 30}}
    beta_rules = {"tenant_id": ["beta-1", "beta-2"], "percent": 50}
    beta = {**default, "version": "v4", "subject": beta_on, "routing_rules": beta_rules}
    await seed(db_url, settings, record("canaried", subject=row, versions=[default]))
    await seed(db_url, settings, record("canaried", subject=row, versions=[canary, default]))
    await seed(db_url, settings, record("canaried", subject=row, versions=[beta, canary, default]))
    tenants = [f"t{n}" for n in range(40)] + ["beta-1", "beta-2"]

    def expected(tenant: str) -> str:
        if tenant.startswith("beta") and rollout_point("canaried", "v4", tenant) < 50:
            return "beta"
        return "canary" if rollout_point("canaried", "v3", tenant) < 30 else "default"

    async with listen(nats_client, row, constant(b'{"from": "row"}')) as at_row, \
            listen(nats_client, default_on, constant(b'{"from": "default"}')), \
            listen(nats_client, canary_on, constant(b'{"from": "canary"}')), \
            listen(nats_client, beta_on, constant(b'{"from": "beta"}')), \
            open_invoker(settings) as inv:  # fmt: skip
        got = {
            tenant: (await inv.invoke("canaried", {"payload": 1}, {"tenant_id": tenant}))["from"]
            for tenant in tenants
        }
        keyless = (await inv.invoke("canaried", {"payload": 1}, {}))["from"]
    assert {t: expected(t) for t in tenants} == got
    assert {"beta", "canary", "default"} == set(got.values())  # beta-1 is in v4's half
    assert ("default", 0) == (keyless, at_row.count)
