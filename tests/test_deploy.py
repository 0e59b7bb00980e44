"""Issue 13, item 3: the files of deploy/ (Grafana dashboard, Prometheus alert rules) and the
runbook they point at (docs/operations.md), and the registry metrics added for them.

Every metric a dashboard panel or an alert rule names must be exported, with samples, by a
live server like `extreg serve` (real PostgreSQL, NATS and sample extensions) after some
traffic, with every label the expression groups by or matches on; the rules must pass
`promtool check rules` (Debian's `prometheus` package, which scripts/test installs when it
may); every runbook_url must name a section of the runbook.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import httpx
import yaml
from api_helpers import SUPPORT_EN, samples_server
from helpers import make_settings, record
from prometheus_client.parser import text_string_to_metric_families

from extreg.adapters.migrate import migrate
from extreg.core.model import parse_extension
from extreg.metrics import Metrics
from extreg.registry import Registry
from testsupport.pgprocess import PostgresProcess

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "alerts.yml"
RUNBOOK = ROOT / "docs" / "operations.md"
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")
# Words of PromQL that are not metric names: aggregation operators (`sum by (...) (...)`
# puts one before a keyword), vector-matching keywords, set operators, modifiers and the
# special values (functions are told apart by their "(").
PROMQL_WORDS = {
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "bool",
    "and",
    "or",
    "unless",
    "offset",
    "inf",
    "nan",
}
# Labels Prometheus adds to every series it scrapes: no exporter has them.
TARGET_LABELS = {"instance", "job"}
IDENTIFIER = re.compile(r"(?<![\w$.:])([a-zA-Z_:][a-zA-Z0-9_:]*)(?=\s*(?:[{\[)\s+\-*/%^<>=!,]|$))")


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: identifiers followed by `{`, `[`, an
    operator or the end, once strings, label matchers, range selectors and label lists are
    taken out, minus PromQL's keywords; a function is an identifier followed by `(`."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", "{}", text)
    text = re.sub(r"\[[^\]]*\]", "[]", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", r"\1 ", text)
    return {m for m in IDENTIFIER.findall(text) if m.lower() not in PROMQL_WORDS}


def label_names(expr: str) -> set[str]:
    """The label names a PromQL expression groups by (`by`, `without`, `on`, ... lists) or
    matches on (`{name="..."}`), but the target labels Prometheus adds."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    lists = re.findall(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)", text)
    names = {name.strip() for found in lists for name in found.split(",") if name.strip()}
    for matchers in re.findall(r"\{([^}]*)\}", text):
        names |= set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))
    return names - TARGET_LABELS


def dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        query = variable.get("query")
        if isinstance(query, dict):
            query = query.get("query")
        found = re.fullmatch(r"label_values\((\w+)\s*,\s*(\w+)\)", query or "")
        if found:
            exprs.append(f'{found.group(1)}{{{found.group(2)}!=""}}')
    return exprs


def alert_rules() -> list[dict[str, Any]]:
    rules = yaml.safe_load(ALERTS.read_text("utf-8"))
    return [rule for group in rules["groups"] for rule in group["rules"]]


def test_metric_names_are_read_out_of_promql() -> None:
    """The extractor itself: names come out, functions, keywords, labels and durations do not."""
    expr = (
        'histogram_quantile(0.99, sum by (extension_id, le) (rate(foo_bucket{outcome!="ok",'
        ' extension_id=~"$extension_id"}[$__rate_interval]))) > 1 and on (instance)'
        " time() - bar_seconds > 900 unless baz"
    )
    assert {"foo_bucket", "bar_seconds", "baz"} == metric_names(expr)
    assert {"extension_id", "le", "outcome"} == label_names(expr)


def test_the_dashboard_parses_and_every_panel_has_a_title_and_a_target() -> None:
    dashboard = json.loads(DASHBOARD.read_text("utf-8"))
    assert 39 == dashboard["schemaVersion"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert "prometheus" == variables["datasource"]["query"]
    assert variables["extension_id"]["definition"].startswith("label_values(")
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len(panels) >= 10
    for panel in panels:
        assert panel.get("title"), panel
        assert panel["targets"] and all(t["expr"].strip() for t in panel["targets"]), panel
        assert "${datasource}" == panel["datasource"]["uid"]
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))


def test_promtool_checks_the_alert_rules() -> None:
    promtool = shutil.which("promtool")
    assert promtool is not None, "promtool is missing: scripts/test installs Debian's prometheus"
    done = subprocess.run(
        [promtool, "check", "rules", str(ALERTS)], capture_output=True, text=True, check=False
    )
    assert 0 == done.returncode, done.stdout + done.stderr


def test_every_rule_has_severity_summary_description_and_a_runbook_section() -> None:
    """Each alert carries `for`-able fields and a runbook_url whose anchor is a heading of
    docs/operations.md (GitHub's anchors: lower case, spaces to hyphens, punctuation out)."""
    headings = re.findall(r"^#+\s+(.+?)\s*$", RUNBOOK.read_text("utf-8"), flags=re.MULTILINE)
    anchors = {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}
    rules = alert_rules()
    assert len(rules) >= 6
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        notes = rule["annotations"]
        assert notes["summary"] and notes["description"], rule["alert"]
        path, _, anchor = notes["runbook_url"].partition("#")
        assert path.endswith("docs/operations.md"), rule["alert"]
        assert anchor in anchors, (rule["alert"], anchor)


async def test_every_metric_named_by_a_panel_or_a_rule_is_exported_by_a_live_server(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: Any
) -> None:
    """After invocations, a forced open and close of a circuit and a policy run, /metrics of
    a live server over the sample extensions has samples of every metric that the dashboard
    and the alert rules name (a histogram's _bucket, _sum and _count are its own), and each
    expression's labels are on the samples of the metrics it names (a label no sample has
    would group everything under one empty value, silently)."""
    live, tokens = await samples_server(tmp_path, db_url, nats_url)
    exprs = dashboard_exprs() + [r["expr"] for r in alert_rules()]
    named = {n for e in exprs for n in metric_names(e)}
    with live:
        async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
            operator = {"Authorization": f"Bearer {tokens['operator']}"}
            admin = {"Authorization": f"Bearer {tokens['admin']}"}
            created = await client.post("/admin/policies", json=SUPPORT_EN, headers=admin)
            assert 201 == created.status_code, created.text
            for _ in range(3):
                called = await client.post(
                    "/admin/extensions/echo/invoke", json={"payload": {"n": 1}}, headers=operator
                )
                assert 200 == called.status_code, called.text
            ran = await client.post(
                "/admin/policies/support_en/run",
                json={"message": {"payload": "Hello   World"}, "context": {"trace_id": "t-1"}},
                headers=operator,
            )
            assert 200 == ran.status_code, ran.text
            for action in ("open", "close"):
                forced = await client.post(
                    "/admin/extensions/echo/circuit", json={"action": action}, headers=operator
                )
                assert 200 == forced.status_code, forced.text
            await asyncio.sleep(2.1)  # the exposition is cached for 2 s
            text = (await client.get("/metrics")).text
    labels: dict[str, set[str]] = {}  # sample name (and a histogram's own) -> label names
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels.setdefault(sample.name, set()).update(sample.labels)
            if family.type == "histogram":
                labels.setdefault(family.name, set()).update(sample.labels)
    missing = {n for n in named if n not in labels}
    assert set() == missing
    unlabelled = {
        (expr, name)
        for expr in exprs
        for name in label_names(expr)
        if not any(name in labels[metric] for metric in metric_names(expr))
    }
    assert set() == unlabelled
    assert {
        "extension_invocation_latency_seconds_bucket",
        "extension_circuit_breaker_recoveries_total",
        "extreg_policy_runs_total",
        "extension_registry_last_sync_success_timestamp_seconds",
    } <= named


def gauge(metrics: Metrics, name: str) -> float:
    text = metrics.render().decode()
    values = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    return values[name]


async def test_freshness_and_snapshot_file_metrics(tmp_path: Path, own_pg: PostgresProcess) -> None:
    """The time of the last good sync is set by a load or sync; `extension_registry_stale`
    reads 1 once the database has gone away and 0 again once it is back; a snapshot file that
    cannot be written (its folder is a file) counts write errors."""
    url = own_pg.create_database("deploy")
    migrate(url)
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("", encoding="utf-8")
    settings = make_settings(
        tmp_path,
        source="database",
        database_url=url,
        snapshot_file=blocker / "snapshot.json",
        sync_interval_seconds=0.2,
    )
    metrics = Metrics(cache_s=0.0)
    async with Registry.open(settings) as registry:
        metrics.watch_registry(registry)
        assert 0.0 == gauge(metrics, "extension_registry_stale")
        alpha = parse_extension(record("alpha"), max_timeout_ms=60_000, max_retries=10)
        await registry.database.upsert_extension(alpha, "test")
        await registry.sync()
        synced = gauge(metrics, "extension_registry_last_sync_success_timestamp_seconds")
        assert synced > 0
        for _ in range(100):
            if gauge(metrics, "extension_registry_snapshot_file_write_errors_total") >= 1:
                break
            await asyncio.sleep(0.05)
        assert gauge(metrics, "extension_registry_snapshot_file_write_errors_total") >= 1
        own_pg.stop()
        try:
            for _ in range(200):
                if registry.status.stale:
                    break
                await asyncio.sleep(0.05)
            assert 1.0 == gauge(metrics, "extension_registry_stale")
            last = gauge(metrics, "extension_registry_last_sync_success_timestamp_seconds")
            await asyncio.sleep(0.6)  # three sync intervals: none succeeds meanwhile
            assert last == gauge(metrics, "extension_registry_last_sync_success_timestamp_seconds")
        finally:
            own_pg.start()
        for _ in range(200):
            if not registry.status.stale:
                break
            await asyncio.sleep(0.05)
        assert 0.0 == gauge(metrics, "extension_registry_stale")
        assert last < gauge(metrics, "extension_registry_last_sync_success_timestamp_seconds")
