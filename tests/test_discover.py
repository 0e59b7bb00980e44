"""`extreg discover` and its adapter (`extreg.adapters.nats_services`) over real NATS servers:
the sample extensions' micro service and its endpoints with their request counts, the
registry's records flagged served or not, the exact --json shape of SPEC.md ("Discovery"),
NATS out of reach, and a malformed `$SRV` reply skipped with a note."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.micro
import pytest
from cli_helpers import outcome, run, run_in_thread
from nats.aio.msg import Msg
from nats.micro.request import Request

from extreg.adapters.nats_services import (
    SERVICE_TYPES,
    DiscoveredEndpoint,
    DiscoveredService,
    Discovery,
    RecordServed,
    discover,
    records_served,
    subject_matches,
)
from extreg.core.model import Extension, parse_extension
from extreg.local.natsserver import NatsServer, free_port
from extreg.local.samples import SAMPLE_EXTENSIONS, SAMPLES_BY_ID, SampleRunner, run_samples
from extreg.local.samples.runner import SERVICE_NAME

WAIT_S = 1.0  # generous: the CLI runs in a thread sharing 2 busy cores with the servers
WAIT = ("--wait", str(WAIT_S))
SECRET = "s3cret"
GHOST: dict[str, Any] = {
    "id": "ghost",
    "type": "pre",
    "subject": "beamline.ext.pre.ghost.v1",
    "timeout_ms": 100,
}
ENVELOPE = msgspec.json.encode(
    {"trace_id": "t-1", "tenant_id": "acme", "payload": {"payload": "Hi"}, "metadata": {}}
)
ENDPOINT_KEYS = {"name", "subject", "num_requests", "num_errors", "average_processing_time"}


def subject(extension_id: str) -> str:
    return SAMPLES_BY_ID[extension_id].subject


def extension(data: dict[str, Any]) -> Extension:
    return parse_extension(data, max_timeout_ms=60_000, max_retries=10)


def fixtures(tmp_path: Path) -> Path:
    """A fixtures folder with every sample's record and `ghost`, whose subject nobody serves."""
    folder = tmp_path / "fixtures"
    folder.mkdir()
    records = [s.record() for s in SAMPLE_EXTENSIONS] + [GHOST]
    (folder / "records.json").write_text(json.dumps(records), encoding="utf-8")
    return folder


# ---- the adapter ---------------------------------------------------------------------------


async def test_discovery_shows_the_samples_service_and_request_counts(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """The samples answer as one micro service, an endpoint per sample on its subject (echo
    aside: a plain subscription, the benchmarks' hot path), each with its own counts."""
    server = nats_server_factory()
    async with SampleRunner(server.url) as runner:
        for _ in range(3):
            await runner.connection.request(subject("normalize_text"), ENVELOPE, timeout=1)
        found = await discover(server.url, wait_s=WAIT_S)
    assert [] == found.skipped
    [service] = found.services
    assert (SERVICE_NAME, True) == (service.name, bool(service.id and service.version))
    endpoints = {e.name: e for e in service.endpoints}
    assert {s.id for s in SAMPLE_EXTENSIONS} - {"echo"} == set(endpoints)
    assert {subject(name) for name in endpoints} == {e.subject for e in endpoints.values()}
    counted = endpoints["normalize_text"]
    assert (3, 0, True) == (
        counted.num_requests,
        counted.num_errors,
        (counted.average_processing_time or 0) > 0,
    )
    assert 0 == endpoints["pii_guard"].num_requests


async def test_no_service_means_an_empty_answer_and_no_note(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """With no service on the server, NATS answers "no responders": that is no service, not a
    malformed reply."""
    assert Discovery([], []) == await discover(nats_server_factory().url, wait_s=WAIT_S)


async def test_stopped_samples_leave_discovery(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """A runner on a connection it was given stops its service with its samples, leaving the
    connection open."""
    url = nats_server_factory().url
    nc = await nats.connect(url)
    try:
        runner = await run_samples(url, names=["pii_guard"], connection=nc)
        found = await discover(url, wait_s=WAIT_S)
        assert [["pii_guard"]] == [[e.name for e in s.endpoints] for s in found.services]
        await runner.stop()
        assert ([], True) == ((await discover(url, wait_s=WAIT_S)).services, nc.is_connected)
    finally:
        await nc.close()


async def test_a_malformed_reply_is_skipped_with_a_note(
    nats_server_factory: Callable[..., NatsServer],
) -> None:
    """A reply that is not JSON, or not of the service API's schema, is left out and named in
    `skipped`; the real service beside it is listed all the same."""
    url = nats_server_factory().url
    nc = await nats.connect(url)

    async def not_json(msg: Msg) -> None:
        await msg.respond(b"\xffnot json")

    async def wrong_type(msg: Msg) -> None:
        body = {"type": SERVICE_TYPES["INFO"], "name": 5, "id": "x", "version": "1.0.0"}
        await msg.respond(msgspec.json.encode(body))

    async def answer(request: Request) -> None:
        await request.respond(b"{}")

    try:
        await nc.subscribe("$SRV.PING", cb=not_json)
        await nc.subscribe("$SRV.INFO", cb=wrong_type)
        service = await nats.micro.add_service(nc, name="real", version="1.2.3")
        await service.add_endpoint(name="a", subject="x.a", handler=answer)
        found = await discover(url, wait_s=WAIT_S)
        await service.stop()
    finally:
        await nc.close()
    assert [("real", "1.2.3", ["x.a"])] == [
        (s.name, s.version, [e.subject for e in s.endpoints]) for s in found.services
    ]
    assert 2 == len(found.skipped), found.skipped
    notes = sorted(found.skipped)
    assert ["a reply to $SRV.INFO: ", "a reply to $SRV.PING: "] == [n[:22] for n in notes]
    assert "`$.name`" in notes[0], notes


@pytest.mark.parametrize(
    ("pattern", "subject", "matches"),
    [
        ("a.b.c", "a.b.c", True),
        ("a.b.c", "a.b", False),
        ("a.*.c", "a.b.c", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        (">", "a", True),
        ("a.b", "a.b.c", False),
    ],
)
def test_subject_matches_as_nats_routes(pattern: str, subject: str, matches: bool) -> None:
    """An endpoint on a wildcard subject serves every subject NATS would route to it."""
    assert matches == subject_matches(pattern, subject)


def test_records_served_names_each_service_once() -> None:
    """Two instances of one service on a record's subject name it once; with no endpoint on
    its subject, a record is flagged, with no service."""
    endpoint = DiscoveredEndpoint("e", "beamline.ext.pre.*.v1", 0, 0, 0)
    services = [DiscoveredService("s", str(i), "1.0.0", [endpoint]) for i in range(2)]
    records = [extension(SAMPLES_BY_ID["echo"].record()), extension(GHOST)]
    assert [
        RecordServed("echo", subject("echo"), True, ["s"]),
        RecordServed("ghost", GHOST["subject"], True, ["s"]),
    ] == records_served(records, services)
    assert [RecordServed("echo", subject("echo"), False, [])] == records_served(records[:1], [])


# ---- the command ---------------------------------------------------------------------------


async def test_discover_json_is_the_spec_shape_and_flags_unserved_records(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """`--json`: exactly {"services": [...], "records": [...]} with SPEC.md's keys; a record
    served through the service API names the service, `ghost` (nobody listens) and `echo` (a
    plain subscription, not probed) are `served: false`. Nothing on stderr."""
    server = nats_server_factory()
    folder = str(fixtures(tmp_path))
    async with SampleRunner(server.url) as runner:
        await runner.connection.request(subject("mask_pii"), ENVELOPE, timeout=1)
        result = await run_in_thread(
            tmp_path, "--fixtures-dir", folder, "discover", *WAIT, "--json", nats_url=server.url
        )
    assert (0, "") == (result.returncode, result.stderr), outcome(result)
    report = json.loads(result.stdout)
    assert {"services", "records"} == set(report)
    [service] = report["services"]
    assert ({"name", "id", "version", "endpoints"}, SERVICE_NAME) == (set(service), service["name"])
    assert [ENDPOINT_KEYS] == list({frozenset(e) for e in service["endpoints"]})
    counts = {e["name"]: e["num_requests"] for e in service["endpoints"]}
    assert (1, 0) == (counts["mask_pii"], counts["pii_guard"])
    records = {r["id"]: r for r in report["records"]}
    assert {s.id for s in SAMPLE_EXTENSIONS} | {"ghost"} == set(records)
    assert {
        "id": "normalize_text",
        "subject": subject("normalize_text"),
        "served": True,
        "services": [SERVICE_NAME],
    } == records["normalize_text"]
    assert {"id": "ghost", "subject": GHOST["subject"], "served": False, "services": []} == (
        records["ghost"]
    )
    assert (False, []) == (records["echo"]["served"], records["echo"]["services"])


async def test_discover_in_a_pipe_prints_two_tab_separated_tables(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """Without --json and a terminal: the endpoints with their stats, a blank line, then the
    records with served yes or no and by which service, each table with its header line."""
    server = nats_server_factory()
    folder = str(fixtures(tmp_path))
    async with SampleRunner(server.url):
        result = await run_in_thread(
            tmp_path, "--fixtures-dir", folder, "discover", *WAIT, nats_url=server.url
        )
    assert (0, "") == (result.returncode, result.stderr), outcome(result)
    endpoints, records = (
        [line.split("\t") for line in part.splitlines()] for part in result.stdout.split("\n\n")
    )
    header = ["service", "id", "version", "endpoint", "subject", "requests", "errors", "avg ms"]
    assert header == endpoints[0]
    row = next(row for row in endpoints if row[3] == "pii_guard")
    assert [SERVICE_NAME, "pii_guard", subject("pii_guard"), "0", "0", "0.000"] == [
        row[0],
        *row[3:],
    ]
    assert ["id", "subject", "served", "services"] == records[0]
    assert ["ghost", GHOST["subject"], "no", ""] in records
    assert ["mask_pii", subject("mask_pii"), "yes", SERVICE_NAME] in records


async def test_discover_warns_of_a_skipped_reply(
    nats_server_factory: Callable[..., NatsServer], tmp_path: Path
) -> None:
    """A malformed `$SRV` reply is a warning on stderr; the command still answers, exit 0."""
    url = nats_server_factory().url
    nc = await nats.connect(url)

    async def not_json(msg: Msg) -> None:
        await msg.respond(b"{")

    try:
        await nc.subscribe("$SRV.STATS", cb=not_json)
        result = await run_in_thread(tmp_path, "discover", *WAIT, "--json", nats_url=url)
    finally:
        await nc.close()
    assert 0 == result.returncode, outcome(result)
    assert [] == json.loads(result.stdout)["services"]
    [line] = result.stderr.splitlines()
    assert line.startswith("warning: skipped a reply to $SRV.STATS: "), line


@pytest.mark.parametrize("as_json", [False, True], ids=["text", "json"])
def test_unreachable_nats_is_a_clear_error(tmp_path: Path, as_json: bool) -> None:
    """NATS out of reach: exit 1, `NatsUnavailable` naming the server without its password,
    no traceback."""
    url = f"nats://extreg:{SECRET}@127.0.0.1:{free_port()}"
    result = run(tmp_path, "discover", *(["--json"] if as_json else []), nats_url=url)
    assert 1 == result.returncode, outcome(result)
    shown = result.stdout + result.stderr
    assert (False, False) == (SECRET in shown, "Traceback" in shown), outcome(result)
    if as_json:
        answer = json.loads(result.stdout)
        assert "NatsUnavailable" == answer["error"]
        assert answer["detail"].startswith("cannot connect to NATS at nats://extreg:")
    else:
        assert result.stderr.startswith("error: cannot connect to NATS at nats://extreg:")
