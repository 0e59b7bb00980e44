"""`extreg invoke` (direct, without --url) and `extreg sample-extensions`, run as the installed
console script, against real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import nats
import psycopg
import pytest
from cli_helpers import EXTREG, environment, flat, last_line, run_in_thread
from helpers import make_settings

from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLE_EXTENSIONS, SampleRunner


async def test_invoke_prints_the_reply(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """`extreg invoke ID --payload BODY --tenant T --json` sends the body's payload and
    metadata, as the API's invoke route does, and prints the extension's reply as JSON."""
    payload = json.dumps({"payload": {"payload": "  Hello   There ", "metadata": {}}})
    result = await run_in_thread(
        tmp_path,
        "invoke",
        "normalize_text",
        "--payload",
        payload,
        "--tenant",
        "acme",
        "--json",
        nats_url=nats_url,
    )
    assert 0 == result.returncode, result.stderr
    assert {
        "payload": {"payload": "hello there", "metadata": {"normalized": "true"}},
        "metadata": {"detected_lang": "en"},
    } == json.loads(result.stdout)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{nope", "--payload is not valid JSON"),
        ('{"payload": NaN}', "--payload is not valid JSON"),
        ('{"payload": 1, "payload": 2}', "key payload appears twice in one object"),
        ('"just text"', "--payload must be a JSON object"),
        ('{"text": "hi"}', "--payload: text: Extra inputs are not permitted"),
        ('{"metadata": []}', "--payload: metadata: Input should be a valid dictionary"),
    ],
    ids=["not-json", "nan", "twice", "not-object", "unknown-field", "wrong-type"],
)
async def test_invoke_refuses_what_the_api_refuses(
    tmp_path: Path, nats_url: str, body: str, message: str
) -> None:
    """A --payload the API's invoke route would refuse (not strict JSON, not an object, an
    unknown or mistyped field) exits 2 naming the problem, before anything is sent; with
    --json the same as a `ConfigError` answer on stdout."""
    args = ("invoke", "normalize_text", "--payload", body)
    text = await run_in_thread(tmp_path, *args, nats_url=nats_url)
    assert (2, "", True) == (text.returncode, text.stdout, message in flat(text.stderr)), text
    as_json = await run_in_thread(tmp_path, *args, "--json", nats_url=nats_url)
    answer = json.loads(as_json.stdout)
    assert (2, "ConfigError", True) == (
        as_json.returncode,
        answer["error"],
        message in answer["detail"],
    ), as_json


async def test_invoke_errors_exit_1_with_the_reason(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """An unknown extension is bad input (exit 2, as through --url); NATS out of reach
    exits 1; both say why, as JSON on stdout with --json."""
    unknown = await run_in_thread(tmp_path, "invoke", "nope", "--payload", "{}", nats_url=nats_url)
    assert (2, "error: nope: no such extension") == (
        unknown.returncode,
        last_line(unknown.stderr),
    ), unknown
    as_json = await run_in_thread(tmp_path, "invoke", "nope", "--json", nats_url=nats_url)
    assert (2, "ExtensionNotFound", "nope") == (
        as_json.returncode,
        json.loads(as_json.stdout)["error"],
        json.loads(as_json.stdout)["extension_id"],
    )
    down = await run_in_thread(tmp_path, "invoke", "normalize_text")  # NATS on a closed port
    assert 1 == down.returncode
    assert "cannot connect to NATS" in down.stderr
    down_json = await run_in_thread(tmp_path, "invoke", "normalize_text", "--json")
    assert (1, "NatsUnavailable") == (down_json.returncode, json.loads(down_json.stdout)["error"])


async def test_invoke_records_health_in_the_database(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """A direct invoke on a database writes the call's health before exiting."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    records = [
        parse_extension(s.record(), max_timeout_ms=60_000, max_retries=10)
        for s in SAMPLE_EXTENSIONS
    ]
    async with PostgresSource(settings) as db:
        await db.import_extensions(records, "test")
    result = await run_in_thread(
        tmp_path,
        "invoke",
        "pii_guard",
        "--payload",
        '{"payload": "4111 1111 1111 1111"}',
        "--json",
        db=db_url,
        nats_url=nats_url,
    )
    assert 0 == result.returncode, result.stderr
    assert "reject" == json.loads(result.stdout)["status"]
    with psycopg.connect(db_url) as conn:
        row = conn.execute(
            "SELECT success_count, failure_count FROM extension_health"
            " WHERE extension_id = 'pii_guard'"
        ).fetchone()
    assert (1, 0) == row


async def test_sample_extensions_command(
    tmp_path: Path, nats_server_factory: Callable[..., NatsServer]
) -> None:
    """`extreg sample-extensions --nats-url URL` serves the samples until interrupted."""
    server = nats_server_factory()
    proc = await asyncio.create_subprocess_exec(
        str(EXTREG),
        "sample-extensions",
        "--nats-url",
        server.url,
        env=environment(tmp_path),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        nc = await nats.connect(server.url)
        deadline = time.monotonic() + 20
        while True:
            try:
                msg = await nc.request(
                    "beamline.provider.test_provider.v1",
                    b'{"payload": {"prompt": "ping"}}',
                    timeout=0.5,
                )
                break
            except nats.errors.Error:
                assert time.monotonic() < deadline, "the samples did not start"
                await asyncio.sleep(0.1)
        await nc.close()
    finally:
        proc.send_signal(signal.SIGINT)
        code = await asyncio.wait_for(proc.wait(), 20)
    assert "Test response: ping" == json.loads(msg.data)["output"]
    assert 0 == code
