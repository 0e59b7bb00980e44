"""The front door (SPEC.md "Configuration", issue 8): with nothing configured, the Python API
and the CLI in one folder use the same embedded database that `extreg serve` keeps there, and
a running `serve --demo` makes its NATS URL discoverable: printed, in `status` (API and CLI),
and found by `Settings()` in that folder, so `extreg invoke` and the docs' examples reach it."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from extreg.local.natsserver import free_port
from extreg.published import published
from extreg.registry import Registry
from extreg.settings import DEMO_NATS_FILE, Settings

EXTREG = Path(sys.executable).parent / "extreg"
DEFAULT_NATS = "nats://127.0.0.1:4222"


def clean_env(**extra: str) -> dict[str, str]:
    """The process environment without any EXTENSION_REGISTRY_* variable: nothing configured."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("EXTENSION_REGISTRY_")}
    env["COLUMNS"] = "400"
    return {**env, **extra}


def extreg(cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(EXTREG), *args],
        cwd=cwd,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def folder(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh working folder with nothing configured, as a new user has it. Not under pytest's
    basetemp: pgserver (as root) opens the folder's parents to its own user, and a pytest
    session starting meanwhile would close `pytest-of-<user>` again under the server."""
    for name in list(os.environ):
        if name.startswith("EXTENSION_REGISTRY_"):
            monkeypatch.delenv(name)
    path = Path(tempfile.mkdtemp(prefix="extreg-front-door-"))
    monkeypatch.chdir(path)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# -- one database for the Python API and the CLI -------------------------------------------


async def test_source_database_with_nothing_configured_uses_the_embedded_database(
    folder: Path,
) -> None:
    """`source=database` names no database either: like the CLI, the registry uses the
    embedded one in data_dir (it used to refuse with a ConfigError)."""
    async with Registry.open(Settings(source="database")) as reg:
        assert ("database", "database") == (reg.status.mode, reg.status.source)
        assert "pgdata" in (reg.status.database or "")


async def test_python_api_and_cli_use_the_same_embedded_database(folder: Path) -> None:
    """`Registry.open(Settings())` with nothing configured serves the embedded database in
    data_dir (it used to serve fixtures), holding the samples; `extreg status` in the same
    folder names the same database, and a change made with the CLI reaches the script's cache."""
    async with Registry.open(Settings()) as reg:
        status = reg.status
        assert ("auto", "database", None) == (status.mode, status.source, status.fallback_reason)
        assert {"normalize_text", "pii_guard", "mask_pii", "test_provider"} <= {
            e.id for e in reg.all()
        }
        cli = await asyncio.to_thread(extreg, folder, "status", "--json")
        assert 0 == cli.returncode, cli.stderr
        assert (status.database, "database") == (
            json.loads(cli.stdout)["database"],
            json.loads(cli.stdout)["source"],
        )
        disabled = await asyncio.to_thread(extreg, folder, "disable", "pii_guard")
        assert 0 == disabled.returncode, disabled.stderr
        deadline = time.monotonic() + 30
        while reg.get("pii_guard") is None or reg.get("pii_guard").enabled:  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the CLI's change never reached the script"
            await asyncio.sleep(0.05)
    release_embedded(folder / ".extreg" / "pgdata")


def release_embedded(pgdata: Path) -> None:
    """Drop this process's handle on the embedded server (pgserver stops it when it was the
    last one), so the folder can be removed."""
    from pgserver.postgres_server import get_server

    get_server(pgdata).cleanup()


# -- the demo's NATS URL -------------------------------------------------------------------


def test_settings_read_the_published_demo_nats_url(folder: Path) -> None:
    """While a live process publishes its NATS URL in data_dir, `Settings()` uses it when no
    layer names nats_url; an explicit setting wins; a file left by a dead process is ignored."""
    path = folder / ".extreg" / DEMO_NATS_FILE
    with published(path, "nats://127.0.0.1:45678"):
        assert "nats://127.0.0.1:45678" == Settings().nats_url.get_secret_value()
        assert "nats://other:1" == Settings(nats_url="nats://other:1").nats_url.get_secret_value()
        assert "nats://127.0.0.1:45678" == Settings.load(environ={}).nats_url.get_secret_value()
    assert (DEFAULT_NATS, False) == (Settings().nats_url.get_secret_value(), path.exists())
    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    )
    path.write_text(json.dumps({"url": "nats://127.0.0.1:45679", "pid": int(dead.stdout)}))
    assert DEFAULT_NATS == Settings().nats_url.get_secret_value()


def test_demo_nats_url_is_printed_in_status_and_used_by_the_cli(folder: Path, db_url: str) -> None:
    """`serve --demo` prints its NATS URL; GET /admin/status and `extreg status` show it;
    `extreg invoke` (no --url, no nats_url) in the same folder calls the demo's extension
    through it; when the server stops, the URL is withdrawn."""
    made = extreg(folder, "--database-url", db_url, "token", "create", "t", "--role", "viewer")
    assert 0 == made.returncode, made.stderr
    token = made.stdout.strip().splitlines()[-1]
    port = free_port()
    out, err = folder / "serve.out", folder / "serve.err"
    with out.open("w") as stdout, err.open("w") as stderr:
        proc = subprocess.Popen(
            [str(EXTREG), "--database-url", db_url, "serve", "--demo", "--port", str(port)],
            cwd=folder,
            env=clean_env(),
            stdout=stdout,
            stderr=stderr,
            text=True,
        )
    try:
        nats_url = wait_for_demo(proc, out, err, f"http://127.0.0.1:{port}")
        status = httpx.get(
            f"http://127.0.0.1:{port}/admin/status", headers={"Authorization": f"Bearer {token}"}
        ).json()
        cli = extreg(folder, "--database-url", db_url, "status", "--json")
        assert 0 == cli.returncode, cli.stderr
        assert (nats_url, nats_url) == (status["nats_url"], json.loads(cli.stdout)["nats_url"])
        call = extreg(
            folder,
            "--database-url",
            db_url,
            "invoke",
            "normalize_text",
            "--json",
            "--payload",
            '{"payload": {"payload": "  Hello   WORLD  "}}',
        )
        assert 0 == call.returncode, call.stderr
        assert "hello world" == json.loads(call.stdout)["payload"]["payload"]
    finally:
        proc.send_signal(signal.SIGINT)
        assert 0 == proc.wait(30)
    assert (False, DEFAULT_NATS) == (
        (folder / ".extreg" / DEMO_NATS_FILE).exists(),
        Settings().nats_url.get_secret_value(),
    )


def wait_for_demo(proc: subprocess.Popen[str], out: Path, err: Path, url: str) -> str:
    """The NATS URL that `serve --demo` printed, once its API answers."""
    deadline = time.monotonic() + 90
    while True:
        found = re.search(r"demo NATS server: (nats://\S+)", out.read_text())
        try:
            if found and httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return found.group(1)
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve --demo did not start:\n{err.read_text()}")
        time.sleep(0.1)
