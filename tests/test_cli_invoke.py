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
from cli_helpers import EXTREG, environment, run_in_thread
from helpers import make_settings

from extreg.adapters.postgres import PostgresSource
from extreg.core.model import parse_extension
from extreg.local.natsserver import NatsServer
from extreg.local.samples import SAMPLE_EXTENSIONS, SampleRunner


async def test_invoke_prints_the_reply(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """`extreg invoke ID --payload JSON --tenant T --json` prints the extension's reply as JSON."""
    payload = json.dumps({"payload": "  Hello   There ", "metadata": {}})
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


async def test_invoke_bad_payload_is_bad_input(tmp_path: Path, nats_url: str) -> None:
    """A --payload that is not JSON exits 2, naming the option."""
    result = await run_in_thread(
        tmp_path, "invoke", "normalize_text", "--payload", "{nope", nats_url=nats_url
    )
    assert 2 == result.returncode
    assert "--payload is not valid JSON" in result.stderr


async def test_invoke_errors_exit_1_with_the_reason(
    tmp_path: Path, nats_url: str, sample_extensions: SampleRunner
) -> None:
    """An unknown extension, or NATS out of reach, exits 1 with the reason."""
    unknown = await run_in_thread(tmp_path, "invoke", "nope", "--payload", "{}", nats_url=nats_url)
    assert 1 == unknown.returncode
    assert "nope: no such extension (attempts: 0)" in " ".join(unknown.stderr.split())
    down = await run_in_thread(tmp_path, "invoke", "normalize_text")  # NATS on a closed port
    assert 1 == down.returncode
    assert "cannot connect to NATS" in down.stderr


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
        '"4111 1111 1111 1111"',
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
