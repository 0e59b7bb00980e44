"""A throwaway PostgreSQL server process, for tests, benchmarks and multi-node runs.

Unlike `pgserver.get_server` (which `extreg serve` uses for the embedded default, and which
shares one server between processes), this one can be stopped, killed and restarted on the
same port, which is what failure tests need. The binaries are the ones the `pgserver` package
ships, so no PostgreSQL has to be installed. PostgreSQL refuses to run as root; as root we run
it as the unprivileged user that pgserver also uses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Self
from urllib.parse import quote

import psycopg

with warnings.catch_warnings():  # pgserver warns at import when XDG_RUNTIME_DIR is unset
    warnings.simplefilter("ignore")
    from pgserver._commands import POSTGRES_BIN_PATH

RUN_AS = "pgserver"
FAST_SETTINGS = ("fsync=off", "synchronous_commit=off", "full_page_writes=off")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PostgresProcess:
    """One PostgreSQL server on 127.0.0.1:`port` with its data in a temporary folder.

    With a `password`, the `postgres` role has it and TCP connections must give it (SCRAM),
    so tests see a password travel through URLs, error messages and status; `url()` includes
    it. With `initdb=False` the data folder is left for the caller to fill (a standby's
    `pg_basebackup`, `testsupport.pgha`)."""

    def __init__(
        self,
        port: int | None = None,
        *,
        durable: bool = False,
        password: str | None = None,
        initdb: bool = True,
    ) -> None:
        self.port = port or free_port()
        self.durable = durable
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="extreg-pg-"))
        self.data = self.root / "data"
        self.proc: subprocess.Popen[bytes] | None = None
        self._user: dict[str, Any] = {}
        if os.geteuid() == 0:
            from pgserver.utils import ensure_user_exists

            entry = ensure_user_exists(RUN_AS)
            assert entry is not None
            os.chown(self.root, entry.pw_uid, entry.pw_gid)
            self._user = {"user": entry.pw_uid, "group": entry.pw_gid}
        if initdb:
            self._initdb()

    def _initdb(self) -> None:
        auth = ["--auth=trust"]
        if self.password is not None:
            pwfile = self.root / "pwfile"
            pwfile.write_text(self.password + "\n")
            if self._user:
                os.chown(pwfile, self._user["user"], self._user["group"])
            auth = ["--auth-local=trust", "--auth-host=scram-sha-256", f"--pwfile={pwfile}"]
        self.run_program(
            "initdb",
            *("-D", str(self.data), "-U", "postgres", *auth),
            *("-E", "UTF8", "--no-sync", "--locale=C"),
        )
        if self.password is not None:
            (self.root / "pwfile").unlink()

    def url(self, dbname: str = "postgres", password: str | None = None) -> str:
        """A URL for the `postgres` role; `password` defaults to the server's own."""
        password = password or self.password
        auth = f"postgres:{quote(password, safe='')}" if password else "postgres"
        return f"postgresql://{auth}@127.0.0.1:{self.port}/{dbname}"

    def start(self, timeout: float = 20) -> None:
        settings = [] if self.durable else [a for s in FAST_SETTINGS for a in ("-c", s)]
        with open(self.root / "log", "ab") as log_file:
            self.proc = subprocess.Popen(
                [
                    str(POSTGRES_BIN_PATH / "postgres"),
                    "-D",
                    str(self.data),
                    "-p",
                    str(self.port),
                    "-k",
                    str(self.root),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    *settings,
                ],
                stdout=subprocess.DEVNULL,
                stderr=log_file,
                start_new_session=True,
                **self._user,
            )
        deadline = time.monotonic() + timeout
        while True:
            try:
                with psycopg.connect(self.url(), connect_timeout=1):
                    return
            except psycopg.OperationalError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"PostgreSQL did not start; see {self.root / 'log'}"
                    ) from None
                time.sleep(0.05)

    def stop(self, sig: int = signal.SIGINT, timeout: float = 20) -> None:
        """Stop the server: SIGINT is a fast shutdown, SIGKILL a crash."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            if sig == signal.SIGKILL:  # a crash takes the children too, not the postmaster alone
                self.signal_all(sig)
            else:
                self.proc.send_signal(sig)
            self.proc.wait(timeout)
        self.proc = None

    def signal_all(self, sig: int) -> None:
        """Send `sig` to the postmaster and to each of its children at once: SIGKILL is a
        crash of the machine, SIGSTOP a hung one (SIGCONT resumes it). Each child calls
        setsid(), so signalling the postmaster's process group would not reach them."""
        assert self.proc is not None
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        for each in [pid, *map(int, children)]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(each, sig)

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str) -> str:
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.cleanup()

    def run_program(self, name: str, *args: str) -> None:
        """Run one of pgserver's PostgreSQL programs (`initdb`, `pg_basebackup`...) as the
        user the server runs as."""
        done = subprocess.run(
            [str(POSTGRES_BIN_PATH / name), *args], check=False, capture_output=True, **self._user
        )
        if done.returncode:
            raise RuntimeError(f"{name} failed: {done.stderr.decode(errors='replace')}")
