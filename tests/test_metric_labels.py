"""Issue 13, item 4: the labels of the invocation metrics. A call is counted under its
extension's id and type, the version it was routed to and its outcome; a series goes when its
extension, its type or its version leaves the registry; and no label of any family ever holds
a tenant or trace id (unbounded: one series per tenant or per message)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest
from helpers import make_settings, record
from invoke_helpers import constant, fixture_settings, listen, open_invoker, subject
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from extreg import ExtensionTimeout, Registry
from extreg.api import create_app
from extreg.metrics import Metrics
from extreg.runtime import Runtime

LATENCY = "extension_invocation_latency_seconds"
TENANT = "tenant-5f1e0c"  # routes to v2; must never be a label value
TRACE = "trace-a93c7d"


def counts(text: str) -> dict[tuple[str, str, str, str], float]:
    """The invocation counts of an exposition by (extension id, type, version, outcome)."""
    return {
        (s.labels["extension_id"], s.labels["extension_type"], s.labels["version"],
         s.labels["outcome"]): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == f"{LATENCY}_count"
    }  # fmt: skip


def versioned(ext_id: str, kind: str, on: str, on_v2: str, **values: Any) -> dict[str, Any]:
    """A record whose calls from TENANT go to version v2 on `on_v2`, the others to its own v1."""
    v2 = {"version": "v2", "subject": on_v2, "routing_rules": {"tenant_id": [TENANT]}}
    return record(ext_id, type=kind, subject=on, version="v1", versions=[v2], **values)


async def test_a_call_is_labelled_with_its_type_and_routed_version(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Through the real Invoker, Runtime and /metrics: a call from TENANT counts under
    version v2, the others under the record's own v1, each with the record's type."""
    on, on_v2 = subject(), subject()
    settings = fixture_settings(tmp_path, nats_url, versioned("x", "post", on, on_v2))
    async with (
        listen(nats_client, on, constant(b"{}")),
        listen(nats_client, on_v2, constant(b"{}")),
        open_invoker(settings) as inv,
        Runtime.open(settings, inv.registry, inv, metrics=Metrics(cache_s=0.0)) as runtime,
    ):
        await inv.invoke("x", {"payload": 1}, {"tenant_id": TENANT})
        for _ in range(2):
            await inv.invoke("x", {"payload": 1})
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            text = (await client.get("/metrics")).text
    assert {("x", "post", "v2", "ok"): 1.0, ("x", "post", "v1", "ok"): 2.0} == counts(text)
    assert (
        f'{LATENCY}_count{{extension_id="x",extension_type="post",version="v2",outcome="ok"}} 1.0'
        in text
    )


async def test_series_of_a_removed_version_or_a_changed_type_go(tmp_path: Path) -> None:
    """On a registry change a series stays while its extension still has its type and its
    version (its own or one of `versions`): dropping a version, renaming the record's own
    and retyping another extension each remove exactly the series they describe."""
    folder = tmp_path / "fixtures"
    folder.mkdir()

    def serve(*records: dict[str, Any]) -> None:
        (folder / "records.json").write_text(json.dumps(list(records)), "utf-8")

    v3 = {"version": "v3", "subject": "ext.x.v3"}
    x = versioned("x", "pre", "ext.x", "ext.x.v2")
    serve({**x, "versions": [*x["versions"], v3]}, record("y"))
    metrics = Metrics(cache_s=0.0)
    async with Registry.open(
        make_settings(tmp_path, source="fixtures", fixtures_dir=folder)
    ) as registry:
        metrics.watch_registry(registry)
        for series in [("x", "pre", "v1", "ok"), ("x", "pre", "v2", "ok"),
                       ("x", "pre", "v3", "timeout"), ("y", "pre", "v1", "ok")]:  # fmt: skip
            metrics.observe_invocation(*series, 0.01)
        serve({**x, "versions": [v3]}, record("y"))
        await registry.reload()
        without_v2 = set(counts(metrics.render().decode()))
        serve({**x, "version": "v4", "versions": [v3]}, record("y", type="post"))
        await registry.reload()
        renamed_and_retyped = set(counts(metrics.render().decode()))
    assert {
        ("x", "pre", "v1", "ok"),
        ("x", "pre", "v3", "timeout"),
        ("y", "pre", "v1", "ok"),
    } == without_v2
    assert {("x", "pre", "v3", "timeout")} == renamed_and_retyped


async def test_no_label_holds_a_tenant_or_trace_id(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Calls and a policy run given a tenant and a trace id (in the context and in the
    request), one call timing out: the invocation, step and run families have their series,
    and neither id is anywhere in the exposition, as a label (name or value) or otherwise."""
    on, on_v2, silent = subject(), subject(), subject()
    records = [versioned("x", "pre", on, on_v2), record("slow", subject=silent, timeout_ms=50)]
    settings = fixture_settings(tmp_path, nats_url, *records)
    policy = {"policy_id": "p", "pre": [{"id": "x"}], "providers": ["hook:m"]}
    (settings.fixtures_dir / "policies").mkdir()
    (settings.fixtures_dir / "policies" / "p.json").write_text(json.dumps(policy), "utf-8")
    ids = {"tenant_id": TENANT, "trace_id": TRACE}

    async def hook(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
        return {"output": "answer"}

    metrics = Metrics(cache_s=0.0)
    async with (
        listen(nats_client, on, constant(b"{}")),
        listen(nats_client, on_v2, constant(b"{}")),
        listen(nats_client, silent),
        open_invoker(settings) as inv,
    ):
        metrics.watch_registry(inv.registry)
        metrics.watch_invoker(inv)
        await inv.invoke("x", {"payload": 1}, ids)
        await inv.invoke("x", {"payload": 1, **ids})
        with pytest.raises(ExtensionTimeout):
            await inv.invoke("slow", {"payload": 1}, ids)
        await inv.run_policy("p", {"payload": "hi", **ids}, ids, provider=hook)
        text = metrics.render().decode()
    families = list(text_string_to_metric_families(text))
    values = {v for f in families for s in f.samples for v in s.labels.values()}
    assert {"x", "slow", "p", "v2", "timeout"} <= values
    assert 1.0 == metrics.registry.get_sample_value(
        "router_extension_execution_total",
        {"extension_id": "x", "extension_type": "pre", "status": "ok", "policy_id": "p"},
    )
    assert {("x", "pre", "v2", "ok"), ("slow", "pre", "v1", "timeout")} <= set(counts(text))
    assert TENANT not in text
    assert TRACE not in text
    assert not {"tenant_id", "trace_id"} & {
        k for f in families for s in f.samples for k in s.labels
    }
