"""Metrics of policy runs (`Metrics.observe_policy_run`, the pipeline runner's observer):
runs by outcome and their duration, the original router's per-step execution counter and
latency histogram (ms), the unusable-policies gauge, and bounded labels (an unknown policy
id adds no label value; a deleted policy's series go). Real NATS, values read from the
metrics' own prometheus_client registry."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families
from test_pipeline import answer_with, ext, respond, settings_for

from extreg import PolicyDisabled, PolicyNotFound, Registry, ValidatorBlocked
from extreg.invoke import Invoker
from extreg.metrics import UNKNOWN_POLICY, Metrics

MESSAGE = {"message_id": "m-1", "payload": "Hello", "metadata": {"channel": "web"}}


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


def label_values(metrics: Metrics, label: str) -> set[str]:
    text = metrics.render().decode()
    return {
        s.labels[label]
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if label in s.labels
    }


async def hook(name: str, message: dict[str, Any], context: dict[str, Any]) -> Any:
    return {"output": "answer"}


async def test_runs_and_steps_are_counted_and_timed(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """An ok run and a blocked one: runs by outcome, both timed; every listed step counted by
    its status and timed in ms; a skipped step counted but not timed."""
    pre, sms, guard = ext("pre", "pre"), ext("sms_only", "pre"), ext("guard", "validator")
    policy = {"policy_id": "p", "pre": [{"id": "pre"}, {"id": "sms_only", "when": {"channel": "sms"}}],
              "validators": [{"id": "guard"}], "providers": ["hook:m"]}  # fmt: skip
    settings = settings_for(tmp_path, nats_url, [pre, sms, guard], policy)
    verdicts = [b'{"status": "ok"}', b'{"status": "reject", "reason": "no"}']

    async def verdict(request: dict[str, Any]) -> bytes:
        return verdicts.pop(0)

    metrics = Metrics()
    async with (
        Registry.open(settings) as registry,
        Invoker.open(registry, settings) as inv,
        respond(nats_client, pre["subject"], answer_with({})),
        respond(nats_client, guard["subject"], verdict),
    ):
        metrics.watch_registry(registry)
        metrics.watch_invoker(inv)
        assert [metrics.observe_policy_run] == inv.pipeline.observers
        result = await inv.run_policy("p", MESSAGE, provider=hook)
        with pytest.raises(ValidatorBlocked):
            await inv.run_policy("p", MESSAGE, provider=hook)
    assert 1.0 == value(metrics, "extreg_policy_runs_total", policy_id="p", outcome="ok")
    assert 1.0 == value(metrics, "extreg_policy_runs_total", policy_id="p", outcome="blocked")
    assert 2.0 == value(metrics, "extreg_policy_run_duration_seconds_count", policy_id="p")
    assert value(metrics, "extreg_policy_run_duration_seconds_sum", policy_id="p") > 0.0

    def executed(ext_id: str, stage: str, status: str) -> float:
        return value(
            metrics,
            "router_extension_execution_total",
            extension_id=ext_id,
            extension_type=stage,
            status=status,
            policy_id="p",
        )

    def timed(ext_id: str, stage: str) -> float:
        labels = {"extension_id": ext_id, "extension_type": stage, "policy_id": "p"}
        return value(metrics, "router_extension_execution_latency_ms_count", **labels)

    assert (2.0, 2.0) == (executed("pre", "pre", "ok"), timed("pre", "pre"))
    assert (2.0, 0.0) == (executed("sms_only", "pre", "skipped"), timed("sms_only", "pre"))
    assert (1.0, 1.0) == (
        executed("guard", "validator", "ok"),
        executed("guard", "validator", "rejected"),
    )
    assert 2.0 == timed("guard", "validator")
    assert (1.0, 1.0) == (executed("hook:m", "provider", "ok"), timed("hook:m", "provider"))
    # milliseconds: the sum is the steps' own latency_ms
    pre_ms = value(
        metrics,
        "router_extension_execution_latency_ms_sum",
        extension_id="pre",
        extension_type="pre",
        policy_id="p",
    )
    assert pre_ms >= result.steps[0].latency_ms > 0.0


async def test_unknown_policy_ids_share_one_label_value(tmp_path: Path, nats_url: str) -> None:
    """Runs of ids no policy has count under UNKNOWN_POLICY: a caller making up ids makes no
    new series. A disabled policy's runs count under its own (stored, so bounded) id."""
    settings = settings_for(
        tmp_path, nats_url, [ext("x", "pre")], {"policy_id": "off", "enabled": False}
    )
    metrics = Metrics()
    async with Registry.open(settings) as registry, Invoker.open(registry, settings) as inv:
        metrics.watch_registry(registry)
        metrics.watch_invoker(inv)
        for made_up in ("nope-1", "nope-2", "nope-3"):
            with pytest.raises(PolicyNotFound):
                await inv.run_policy(made_up, MESSAGE)
        with pytest.raises(PolicyDisabled):
            await inv.run_policy("off", MESSAGE)
    assert 3.0 == value(
        metrics, "extreg_policy_runs_total", policy_id=UNKNOWN_POLICY, outcome="not_found"
    )
    assert 1.0 == value(metrics, "extreg_policy_runs_total", policy_id="off", outcome="disabled")
    assert {UNKNOWN_POLICY, "off"} == label_values(metrics, "policy_id")


async def test_a_deleted_policys_series_go(
    tmp_path: Path, nats_url: str, nats_client: Client
) -> None:
    """Delete a policy's file and reload: its run and step series are removed, the other
    policy's and the unknown ones stay."""
    pre = ext("pre", "pre")
    doomed = {"policy_id": "doomed", "pre": [{"id": "pre"}]}
    kept = {"policy_id": "kept", "pre": [{"id": "pre"}]}
    settings = settings_for(tmp_path, nats_url, [pre], doomed, kept)
    metrics = Metrics()
    async with (
        Registry.open(settings) as registry,
        Invoker.open(registry, settings) as inv,
        respond(nats_client, pre["subject"], answer_with({})),
    ):
        metrics.watch_registry(registry)
        metrics.watch_invoker(inv)
        for policy_id in ("doomed", "kept"):
            await inv.run_policy(policy_id, MESSAGE)
        with pytest.raises(PolicyNotFound):
            await inv.run_policy("nope", MESSAGE)
        assert {"doomed", "kept", UNKNOWN_POLICY} == label_values(metrics, "policy_id")
        (settings.fixtures_dir / "policies" / "doomed.json").unlink()
        await registry.reload()
        assert registry.policy("doomed") is None
    assert {"kept", UNKNOWN_POLICY} == label_values(metrics, "policy_id")
    assert 1.0 == value(
        metrics,
        "router_extension_execution_total",
        extension_id="pre",
        extension_type="pre",
        status="ok",
        policy_id="kept",
    )


async def test_unusable_policies_gauge(tmp_path: Path, nats_url: str) -> None:
    """Beside the invalid-records gauge: the policies that name a disabled or deleted
    extension (`Snapshot.unusable_policies`)."""
    off = ext("off", "pre", enabled=False)
    broken = {"policy_id": "broken", "pre": [{"id": "off"}]}
    fine = {"policy_id": "fine", "providers": ["hook:m"]}
    settings = settings_for(tmp_path, nats_url, [off], broken, fine)
    metrics = Metrics()
    async with Registry.open(settings) as registry:
        metrics.watch_registry(registry)
        assert ["broken"] == list(registry.snapshot.unusable_policies)
        assert 1.0 == value(metrics, "extension_registry_unusable_policies")
        (settings.fixtures_dir / "policies" / "broken.json").write_text(
            json.dumps({"policy_id": "broken", "providers": ["hook:m"]}), "utf-8"
        )
        await registry.reload()
        assert 0.0 == value(metrics, "extension_registry_unusable_policies")


def test_observers_of_policy_runs_are_kept_and_metrics_join_once() -> None:
    """The pipeline tells every observer (metrics, the dashboard's recent runs); watching the
    same invoker twice does not count a run twice."""

    class Pipeline:
        def __init__(self) -> None:
            self.observers: list[Any] = [print]

    class FakeInvoker:
        observer = None

        def __init__(self) -> None:
            self.pipeline = Pipeline()

    invoker = FakeInvoker()
    metrics = Metrics()
    metrics.watch_invoker(invoker)
    metrics.watch_invoker(invoker)
    assert [print, metrics.observe_policy_run] == invoker.pipeline.observers
