"""Helpers shared by the command-line tests: `extreg` run as the installed console script, in
a subprocess with a clean environment, so that `extreg.cli.main` maps errors to exit codes
exactly as users see them; and the text helpers that read its output."""

from __future__ import annotations

import asyncio
import getpass
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from testsupport.pgprocess import free_port

EXTREG = Path(sys.executable).parent / "extreg"
ACTOR = f"cli:{getpass.getuser()}"  # who the CLI writes as (`extreg.cli.actor`)
TIMEOUT_S = 60


def environment(tmp_path: Path, *, nats_url: str | None = None, **extra: str) -> dict[str, str]:
    """This process's environment without any `EXTENSION_REGISTRY_*` or `EXTREG_*` setting,
    data under `tmp_path`, NATS at `nats_url` or else a closed port (so nothing reaches a NATS
    the machine runs), rich kept from wrapping at 80 columns; then `extra`."""
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
    }
    env.update(
        {
            "EXTENSION_REGISTRY_DATA_DIR": str(tmp_path / "data"),
            "EXTENSION_REGISTRY_NATS_URL": nats_url or f"nats://127.0.0.1:{free_port()}",
            "COLUMNS": "400",
            **extra,
        }
    )
    return env


def extreg(
    tmp_path: Path, *args: str, nats_url: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`extreg ARGS`, exactly those, in a clean `environment` (plus `env`)."""
    return subprocess.run(
        [str(EXTREG), *args],
        capture_output=True,
        text=True,
        env=environment(tmp_path, nats_url=nats_url, **env),
        timeout=TIMEOUT_S,
        check=False,
    )


def run(
    tmp_path: Path, *args: str, db: str | None = None, nats_url: str | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """`extreg ARGS` on the database `db` if given, else on the bundled fixtures."""
    source = ["--database-url", db] if db else ["--source", "fixtures"]
    return extreg(tmp_path, *source, *args, nats_url=nats_url, **env)


async def run_in_thread(
    tmp_path: Path, *args: str, **options: Any
) -> subprocess.CompletedProcess[str]:
    """`run` in a thread, so what this event loop serves (the session's sample extensions)
    keeps answering while the command waits for it."""
    return await asyncio.to_thread(run, tmp_path, *args, **options)


def outcome(result: subprocess.CompletedProcess[str]) -> str:
    """Everything a failed assertion should show of a run."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def flat(text: str) -> str:
    """Text with every run of whitespace made one space (terminal wrapping undone)."""
    return " ".join(text.split())


def last_line(text: str) -> str:
    """The last non-empty line (log events may come first on stderr)."""
    return text.strip().splitlines()[-1] if text.strip() else ""


def start_server(tmp: Path, *args: str, **env: str) -> tuple[subprocess.Popen[str], str, Path]:
    """`extreg [ARGS] serve --port N` in the background, once /healthz answers."""
    port = free_port()
    out, errs = tmp / f"serve-{port}.out", tmp / f"serve-{port}.err"
    with out.open("w") as stdout, errs.open("w") as stderr:
        proc = subprocess.Popen(
            [str(EXTREG), *args, "serve", "--port", str(port)],
            text=True,
            stdout=stdout,
            stderr=stderr,
            env=environment(tmp, **env),
        )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url, out
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"serve did not start:\n{errs.read_text()}")
        time.sleep(0.1)


def stop_server(proc: subprocess.Popen[str]) -> int:
    """Ctrl-C, as a person would; the exit status."""
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(20)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
