"""Issue 9, item 5: /metrics is bounded. Series of deleted extensions go; the exposition is
rendered at most once per interval (off the event loop) and served from the cache meanwhile;
`metrics_token` guards the endpoint when set."""

from __future__ import annotations

from pathlib import Path

import httpx
from api_helpers import EchoInvoker, database_api, make_tokens, seed
from helpers import make_settings, record
from prometheus_client.parser import text_string_to_metric_families

from extreg.api import create_app
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime


def series_ids(text: str) -> set[str]:
    """Every extension_id label value of an exposition."""
    return {
        s.labels["extension_id"]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if "extension_id" in s.labels
    }


def labelled_families(text: str) -> set[str]:
    return {
        family.name
        for family in text_string_to_metric_families(text)
        if any("extension_id" in s.labels for s in family.samples)
    }


async def test_series_of_a_deleted_extension_are_removed(tmp_path: Path, db_url: str) -> None:
    """Create, invoke, open and reset the circuit of, then delete an extension through the API
    on a database registry: before the delete every labelled metric has its series, after it
    none has (the other extensions' series stay)."""
    async with database_api(tmp_path, db_url, invoker=EchoInvoker()) as api:
        operator, admin = api.auth("operator"), api.auth("admin")
        created = await api.client.post("/admin/extensions", headers=admin, json=record("doomed"))
        assert 201 == created.status_code, created.text
        for ext_id in ("doomed", "alpha"):
            invoked = await api.client.post(
                f"/admin/extensions/{ext_id}/invoke", json={"payload": {}}, headers=operator
            )
            assert 200 == invoked.status_code, invoked.text
        for action in ("open", "reset"):
            forced = await api.client.post(
                "/admin/extensions/doomed/circuit", json={"action": action}, headers=operator
            )
            assert 200 == forced.status_code, forced.text
        before = api.runtime.metrics.render().decode()
        deleted = await api.client.delete("/admin/extensions/doomed", headers=admin)
        assert deleted.status_code in (200, 204), deleted.text
        after = api.runtime.metrics.render().decode()
    assert {"doomed", "alpha", "beta"} == series_ids(before)
    assert {
        "extension_invocation_latency_seconds",
        "extension_circuit_breaker_failures",
        "extension_circuit_breaker_recoveries",
        "extension_health_success_rate",
        "extension_health_avg_latency_ms",
        "extension_circuit_breaker_state",
    } == {name.removesuffix("_created") for name in labelled_families(before)}
    assert {"alpha", "beta"} == series_ids(after)
    assert (
        'extension_invocation_latency_seconds_count{extension_id="alpha",extension_type="pre",'
        'version="v1",outcome="ok"} 1.0' in after
    )


async def test_the_exposition_is_cached_for_its_interval() -> None:
    """Within `cache_s` every scrape gets the same bytes, even after a change; once the clock
    passes it, the next scrape renders again and shows the change."""
    now = [100.0]
    metrics = Metrics(cache_s=2.0, clock=lambda: now[0])
    metrics.observe_invocation("alpha", "pre", "v1", "ok", 0.01)
    first = await metrics.scrape()
    metrics.observe_invocation("alpha", "pre", "v1", "ok", 0.01)
    now[0] += 1.9
    second = await metrics.scrape()
    now[0] += 0.2
    third = await metrics.scrape()
    count = (
        "extension_invocation_latency_seconds_count"
        '{extension_id="alpha",extension_type="pre",version="v1",outcome="ok"}'
    )
    assert first == second
    assert f"{count} 1.0".encode() in second
    assert f"{count} 2.0".encode() in third


async def test_concurrent_scrapers_share_one_render() -> None:
    """Scrapers arriving together while no fresh exposition exists wait for one render."""
    import asyncio

    renders = []
    metrics = Metrics(cache_s=60.0)
    original = metrics.render

    def counting() -> bytes:
        renders.append(1)
        return original()

    metrics.exposition._render = counting  # the render the cache calls
    bodies = await asyncio.gather(*(metrics.scrape() for _ in range(8)))
    assert (1, 1) == (len(renders), len(set(bodies)))


async def test_metrics_token_is_required_when_set(tmp_path: Path, db_url: str) -> None:
    """With `metrics_token` set, /metrics answers 401 without it or with another token (an
    admin API token included) and 200 with it; without the setting it needs none."""
    secret = "metrics-" + "s3cret"
    settings = make_settings(tmp_path, source="database", database_url=db_url, metrics_token=secret)
    await seed(db_url, settings, record("alpha"))
    tokens = await make_tokens(db_url)
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = [
                await client.get("/metrics", headers=headers)
                for headers in (
                    {},
                    {"Authorization": "Bearer wrong"},
                    {"Authorization": f"Bearer {tokens['admin']}"},
                    {"Authorization": f"Bearer {secret}"},
                )
            ]
    assert [401, 401, 401, 200] == [a.status_code for a in answers]
    assert "extension_registry_size" in answers[3].text
    assert all(secret not in a.text for a in answers)
    assert "metrics token" in answers[0].json()["detail"]
    assert make_settings(tmp_path).metrics_token is None


async def test_wrong_metrics_tokens_are_limited(tmp_path: Path, db_url: str) -> None:
    """Guessing the metrics token is a failed authentication: after 10 from one address, 429;
    the right token still works, and no token at all is never counted."""
    settings = make_settings(
        tmp_path, source="database", database_url=db_url, metrics_token="right"
    )
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            bare = [(await client.get("/metrics")).status_code for _ in range(12)]
            guesses = [
                (
                    await client.get("/metrics", headers={"Authorization": f"Bearer g{i}"})
                ).status_code
                for i in range(11)
            ]
            right = await client.get("/metrics", headers={"Authorization": "Bearer right"})
    assert [401] * 12 == bare
    assert ([401] * 10, 429) == (guesses[:10], guesses[10])
    assert 200 == right.status_code
