"""Outlier ejection of instances (`core/outliers.py` on an injected clock; then through the
real Invoker, NATS and PostgreSQL): a failing instance is taken out after its run of
failures, no call reaches it while it is out, at most the allowed share is out, it returns
after base x times ejected, and its `health_status` is written for the other nodes."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from api_helpers import seed
from helpers import make_settings
from invoke_helpers import FakeClock, constant, listen, open_invoker, subject, wait_for
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from extreg import Registry
from extreg.core.outliers import OutlierConfig, OutlierDetector
from extreg.metrics import Metrics

CONFIG = OutlierConfig(consecutive_failures=3, base_ejection_s=30.0, max_ejection_percent=50.0)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def fail(detector: OutlierDetector, instance: str, times: int, instances: int = 4) -> Any:
    found = None
    for _ in range(times):
        found = detector.record("x", instance, False, instances) or found
    return found


def test_a_run_of_failures_ejects_and_a_success_resets_the_run() -> None:
    clock = Clock()
    detector = OutlierDetector(CONFIG, clock)
    assert fail(detector, "a", 2) is None
    detector.record("x", "a", True, 4)
    assert fail(detector, "a", 2) is None  # the run started again
    ejection = fail(detector, "a", 1)
    assert ("a", 1, 130.0) == (ejection.instance_id, ejection.times, ejection.returns_at)
    assert frozenset({"a"}) == detector.ejected("x")


def test_the_ejection_ends_after_base_times_ejected() -> None:
    """Back after 30 s the first time, after 60 s the second."""
    clock = Clock()
    detector = OutlierDetector(CONFIG, clock)
    fail(detector, "a", 3)
    clock.now += 29.9
    assert [] == detector.returns()
    clock.now += 0.1
    [back] = detector.returns()
    assert ("a", None) == (back.instance_id, back.returns_at)
    assert frozenset() == detector.ejected("x")
    second = fail(detector, "a", 3)
    assert (2, clock.now + 60.0) == (second.times, second.returns_at)


def test_instances_the_record_marks_unhealthy_count_as_out() -> None:
    """Another node ejected b (the record says unhealthy): with 4 at 50 %, only one more may
    go; an instance already out is not counted twice."""
    detector = OutlierDetector(CONFIG, Clock())
    marked = frozenset({"b"})
    assert fail_marked(detector, "a", marked) is not None
    assert fail_marked(detector, "c", marked | {"a"}) is None
    assert frozenset({"a"}) == detector.ejected("x")


def fail_marked(detector: OutlierDetector, instance: str, marked: frozenset[str]) -> Any:
    found = None
    for _ in range(3):
        found = detector.record("x", instance, False, 4, marked) or found
    return found


def test_never_more_than_the_allowed_share_is_out() -> None:
    """4 instances at 50 %: two may be out; the third failing one stays in. One instance at
    50 %: none may be out (rounded down), so an extension never loses its only instance."""
    detector = OutlierDetector(CONFIG, Clock())
    assert fail(detector, "a", 3) is not None
    assert fail(detector, "b", 3) is not None
    assert fail(detector, "c", 10) is None
    assert frozenset({"a", "b"}) == detector.ejected("x")
    alone = OutlierDetector(CONFIG, Clock())
    assert fail(alone, "only", 10, instances=1) is None


async def test_an_ejected_instance_gets_no_calls_and_other_nodes_see_it_unhealthy(
    tmp_path: Path, db_url: str, nats_url: str, nats_client: Client
) -> None:
    """Four instances, one answering garbage: after 3 failures in a row it is ejected; the
    next 300 calls all go to the other three; another registry on the database sees it
    `unhealthy`; after 30 s (the invoker's clock) it is back and `healthy` again; the
    ejection and the return are counted in the metrics."""
    subjects = {name: subject() for name in ("i1", "i2", "i3", "bad")}
    record = {
        "id": "x",
        "type": "pre",
        "subject": subject(),
        "timeout_ms": 1000,
        "instances": [{"instance_id": n, "subject": s} for n, s in subjects.items()],
    }
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=db_url,
        nats_url=nats_url,
        outlier_detection_enabled=True,
        outlier_consecutive_failures=3,
        outlier_base_ejection_seconds=30,
    )
    await seed(db_url, settings, record)
    clock = FakeClock()
    ejections: list[Any] = []
    async with (
        listen(nats_client, subjects["i1"], constant(b"{}")),
        listen(nats_client, subjects["i2"], constant(b"{}")),
        listen(nats_client, subjects["i3"], constant(b"{}")),
        listen(nats_client, subjects["bad"], constant(b"[]")) as bad,
        open_invoker(settings, clock=clock) as inv,
        Registry.open(settings) as other,
    ):
        assert inv.ejections is not None
        inv.ejections.observers.append(ejections.append)
        metrics = Metrics()
        metrics.watch_invoker(inv)
        for _ in range(1000):
            if ejections:
                break
            await asyncio.gather(inv.invoke("x", {"payload": 1}), return_exceptions=True)
        assert ["bad"] == [e.instance_id for e in ejections]
        reached = bad.count
        for _ in range(300):
            assert {} == await inv.invoke("x", {"payload": 1})
        assert reached == bad.count
        await wait_for(lambda: status(other, "bad") == "unhealthy", timeout=30)
        clock.advance(30)  # no call needed: the ejection ends on time by itself
        await wait_for(lambda: status(other, "bad") == "healthy", timeout=30)
        await wait_for(lambda: status(inv.registry, "bad") == "healthy", timeout=30)
        assert [None] == [e.returns_at for e in ejections[1:]]
        for _ in range(200):
            await asyncio.gather(inv.invoke("x", {"payload": 1}), return_exceptions=True)
            if bad.count > reached:
                break
        assert bad.count > reached, "the instance never came back"
    counted = {
        s.name: s.value
        for family in text_string_to_metric_families(metrics.render().decode())
        for s in family.samples
        if s.labels.get("instance_id") == "bad" and s.name.endswith("_total")
    }
    assert {
        "extension_instance_ejections_total": 1.0,
        "extension_instance_returns_total": 1.0,
    } == counted


def status(registry: Registry, instance_id: str) -> str:
    ext = registry.get("x")
    assert ext is not None
    return next(i.health_status for i in ext.instances if i.instance_id == instance_id)
