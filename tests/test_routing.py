"""Routing rules, version selection, instance choice, caps and size limits (pure, no I/O)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import msgspec
import pytest

from extreg.core.envelope import encode_envelope, headers
from extreg.core.model import Extension, Instance, Version, limit_problems
from extreg.core.routing import (
    Limits,
    Route,
    Rule,
    Target,
    choose_weighted,
    rules_match,
    select_version,
)
from extreg.errors import PayloadTooLarge


def ext(**values: Any) -> Extension:
    base: dict[str, Any] = {"id": "x", "type": "pre", "subject": "ext.x.v1", "timeout_ms": 100}
    return msgspec.convert({**base, **values}, type=Extension)


def version(name: str, rules: dict[str, Any], **values: Any) -> Version:
    base = {
        "version": name,
        "subject": f"ext.x.{name}",
        "timeout_ms": 100,
        "retry": 0,
        "routing_rules": rules,
    }
    return msgspec.convert({**base, **values}, type=Version)


def instance(name: str, weight: int, **values: Any) -> Instance:
    return msgspec.convert(
        {"instance_id": name, "subject": f"ext.x.{name}", "weight": weight, **values}, type=Instance
    )


def ctx(**values: Any) -> Any:
    return values.get


@pytest.mark.parametrize(
    ("rules", "context", "expected"),
    [
        ({}, {}, True),
        ({}, {"tenant_id": "a"}, True),
        ({"tenant_id": ["t1", "t2"]}, {"tenant_id": "t2"}, True),
        ({"tenant_id": ["t1", "t2"]}, {"tenant_id": "t3"}, False),
        ({"tenant_id": ["t1"]}, {}, False),
        ({"environment": "prod"}, {"environment": "prod"}, True),
        ({"environment": "prod"}, {"environment": "production"}, False),
        (
            {"environment": "prod", "tenant_id": ["t1"]},
            {"environment": "prod", "tenant_id": "t1"},
            True,
        ),
        (
            {"environment": "prod", "tenant_id": ["t1"]},
            {"environment": "prod", "tenant_id": "t2"},
            False,
        ),
        ({"shard": ["7"]}, {"shard": 7}, True),
    ],
)
def test_rules_match(rules: dict[str, Any], context: dict[str, Any], expected: bool) -> None:
    """The contract's rules: {} matches all, a list means one-of, a string equality, all keys
    must match, a missing key never matches, non-string context values compare as text."""
    assert expected == rules_match(rules, context.get)


def test_first_matching_version_wins() -> None:
    """Versions are tried in order; the first match wins; no match gives None."""
    a, b, c = (Target(f"s.{n}", 0.1, 0, n, "x") for n in ("a", "b", "c"))
    versions = [
        (Rule({"tenant_id": ["t1"]}), a),
        (Rule({"tenant_id": ["t1", "t2"]}), b),
        (Rule({"env": "x"}), c),
    ]
    assert a == select_version(versions, ctx(tenant_id="t1"))
    assert b == select_version(versions, ctx(tenant_id="t2"))
    assert select_version(versions, ctx(tenant_id="t9")) is None


def test_route_uses_version_then_row() -> None:
    """Enabled versions are routed by their rules; disabled ones are skipped; no match means
    the extension's own row."""
    record = ext(
        versions=[
            version("v2", {"tenant_id": ["t1"]}, timeout_ms=300, retry=2),
            version("v3", {}, enabled=False),
        ]
    )
    route = Route(record, Limits())
    assert Target("ext.x.v2", 0.3, 2, "v2", "x@v2") == route.pick(ctx(tenant_id="t1"))
    assert Target("ext.x.v1", 0.1, 0, "v1", "x") == route.pick(ctx(tenant_id="t2"))


def test_route_caps_timeout_and_retries() -> None:
    """timeout_ms is capped by extension_max_timeout_ms and retry by extension_max_retries."""
    route = Route(ext(timeout_ms=9000, retry=5), Limits(max_timeout_ms=2000, max_retries=2))
    assert (2.0, 2) == (route.default.timeout_s, route.default.retries)


def test_usable_instances_only() -> None:
    """Disabled, unhealthy and zero-weight instances are never chosen; with none usable the
    extension's subject is used; with one, always that one."""
    unusable = [
        instance("a", 50, enabled=False),
        instance("b", 50, health_status="unhealthy"),
        instance("c", 0),
    ]
    assert "ext.x.v1" == Route(ext(instances=unusable), Limits()).pick(ctx()).subject
    one = Route(ext(instances=[*unusable, instance("d", 10, health_status="degraded")]), Limits())
    assert (False, "ext.x.d") == (one.dynamic, one.pick(ctx()).subject)


def test_weighted_choice_follows_weights() -> None:
    """Over 20,000 draws, each instance is chosen in proportion to its weight (within 2%)."""
    route = Route(
        ext(instances=[instance("a", 60), instance("b", 30), instance("c", 10)]), Limits()
    )
    rng = random.Random(7)
    counts = Counter(route.pick(ctx(), rng.random).subject for _ in range(20_000))
    shares = {k: round(v / 20_000, 2) for k, v in counts.items()}
    for name, share in {"ext.x.a": 0.6, "ext.x.b": 0.3, "ext.x.c": 0.1}.items():
        assert share == pytest.approx(shares[name], abs=0.02)


def test_choose_weighted_edges() -> None:
    """A draw maps onto the cumulative weights: [0, 60) -> 0, [60, 90) -> 1, [90, 100) -> 2."""
    cumulative = (60, 90, 100)
    assert [0, 0, 1, 2] == [choose_weighted(cumulative, d) for d in (0.0, 0.59, 0.6, 0.999)]


def test_size_limits_from_metadata() -> None:
    """metadata.max_payload_size / max_metadata_size replace the global limits; bad values are
    ignored by the route and reported by limit_problems."""
    good = Route(ext(metadata={"max_payload_size": 10, "max_metadata_size": 20}), Limits())
    assert (10, 20) == (good.max_payload_size, good.max_metadata_size)
    bad = Route(ext(metadata={"max_payload_size": -1, "max_metadata_size": "big"}), Limits())
    assert (1_048_576, 65_536) == (bad.max_payload_size, bad.max_metadata_size)
    assert [
        ("metadata.max_payload_size", "must be a positive integer (got -1)"),
        ("metadata.max_metadata_size", "must be a positive integer (got 'big')"),
    ] == limit_problems({"max_payload_size": -1, "max_metadata_size": "big"})


def test_envelope_bytes_and_limits() -> None:
    """The envelope is the contract's JSON object; the limits apply to the encoded payload and
    metadata (a payload of exactly the limit passes, one byte more does not)."""
    request = {"payload": {"text": "héllo"}, "metadata": {"lang": "en"}}
    data = encode_envelope("x", request, "t-1", "acme", 1000, 1000)
    assert {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "payload": {"text": "héllo"},
        "metadata": {"lang": "en"},
    } == msgspec.json.decode(data)
    size = len(msgspec.json.encode(request["payload"]))
    encode_envelope("x", request, None, None, size, 1000)
    with pytest.raises(PayloadTooLarge) as caught:
        encode_envelope("x", request, None, None, size - 1, 1000)
    assert ("x", f"payload is {size} bytes, the limit is {size - 1}", 0) == (
        caught.value.extension_id,
        caught.value.reason,
        caught.value.attempts,
    )
    with pytest.raises(PayloadTooLarge, match="metadata is 13 bytes, the limit is 12"):
        encode_envelope("x", request, None, None, 1000, 12)


def test_envelope_defaults_and_headers() -> None:
    """A missing payload is null and missing metadata {}; headers carry only the ids set."""
    assert {
        "trace_id": None,
        "tenant_id": None,
        "payload": None,
        "metadata": {},
    } == msgspec.json.decode(encode_envelope("x", {}, None, None, 10, 10))
    assert headers(None, None) is None
    assert {"trace_id": "t", "tenant_id": "42"} == headers("t", 42)
    assert {"tenant_id": "a"} == headers(None, "a")


def test_versions_newest_first_by_created_at() -> None:
    """Versions are tried newest first by created_at, whatever their order in the record: a
    `{}` default created first and a tenant-list canary created later send the canary's
    tenants to the canary and everyone else to the default."""
    default = version("v2", {}, created_at="2026-01-01T00:00:00Z")
    canary = version("v3", {"tenant_id": ["t1"]}, created_at="2026-02-01T00:00:00Z")
    for listed in ([default, canary], [canary, default]):
        route = Route(ext(versions=listed), Limits())
        assert ["v3", "v2"] == [
            route.pick(ctx(tenant_id=tenant)).version for tenant in ("t1", "t2")
        ]


def test_versions_without_created_at_later_in_list_is_newer() -> None:
    """Without created_at (fixtures), a version later in the record counts as newer; a dated
    version is newer than an undated one; equal times fall back to the record's order too."""
    default, canary = version("v2", {}), version("v3", {"tenant_id": ["t1"]})
    assert (
        "v3" == Route(ext(versions=[default, canary]), Limits()).pick(ctx(tenant_id="t1")).version
    )
    assert (
        "v2" == Route(ext(versions=[canary, default]), Limits()).pick(ctx(tenant_id="t1")).version
    )
    dated = version("v3", {"tenant_id": ["t1"]}, created_at="2026-01-01T00:00:00Z")
    assert "v3" == Route(ext(versions=[dated, default]), Limits()).pick(ctx(tenant_id="t1")).version
    same = "2026-01-01T00:00:00+00:00"
    tied = [
        version("v2", {}, created_at=same),
        version("v3", {"tenant_id": ["t1"]}, created_at=same),
    ]
    assert "v3" == Route(ext(versions=tied), Limits()).pick(ctx(tenant_id="t1")).version
    naive = version("v4", {"tenant_id": ["t1"]}, created_at="2026-03-01T00:00:00")
    assert "v4" == Route(ext(versions=[naive, dated]), Limits()).pick(ctx(tenant_id="t1")).version


def test_extreg_never_draws_from_the_shared_random_generator() -> None:
    """Jitter and instance choice use extreg's own generator, so an application that seeds
    `random` for reproducible runs gets the same sequence with extreg as without it."""
    from extreg.core.chance import jitter
    from extreg.invoke.invoker import backoff_s

    route = Route(ext(instances=[instance("a", 50), instance("b", 50)]), Limits())
    random.seed(1234)
    state = random.getstate()
    for attempt in range(1, 50):
        backoff_s(attempt)
        jitter(1.0)
        route.pick(ctx())
    assert random.getstate() == state
