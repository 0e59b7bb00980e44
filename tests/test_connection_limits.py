"""Connection limits of `extreg serve` (issue 9, item 1), against a real server in a
subprocess with a lowered RLIMIT_NOFILE so that running out of descriptors stays cheap.

Each test holds a bounded number of raw TCP connections and waits on conditions with generous
deadlines; the only timing asserted is that a slow client IS dropped before such a deadline.
The figures in docs/reliability.md come from these tests (run with `-s` to see them).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
from helpers import stop_process

from testsupport.pgprocess import free_port

EXTREG = Path(sys.executable).parent / "extreg"
DEADLINE_S = 60.0  # generous: what "bounded" must beat, never how fast it must be
NOFILE = 256


@dataclass
class Served:
    proc: subprocess.Popen[bytes]
    port: int
    out: Path
    err: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def descriptors(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def log_lines(self) -> list[str]:
        return self.err.read_text(encoding="utf-8", errors="replace").splitlines()

    def events(self, name: str) -> list[dict[str, object]]:
        found = []
        for line in self.log_lines():
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if isinstance(event, dict) and event.get("event") == name:
                    found.append(event)
        return found

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=DEADLINE_S)


def environment(tmp: Path, **settings: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith(("EXTENSION_REGISTRY_", "EXTREG_"))
    }
    env.update(
        {
            "EXTENSION_REGISTRY_SOURCE": "fixtures",
            "EXTENSION_REGISTRY_DATA_DIR": str(tmp / "data"),
            "EXTENSION_REGISTRY_NATS_URL": f"nats://127.0.0.1:{free_port()}",
        }
    )
    env.update({f"EXTENSION_REGISTRY_{key.upper()}": value for key, value in settings.items()})
    return env


def lowered_nofile() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (NOFILE, NOFILE))


@contextlib.contextmanager
def serving(tmp: Path, argv: list[str] | None = None, **settings: str) -> Iterator[Served]:
    """`extreg serve --source fixtures` (or `argv` + port) under RLIMIT_NOFILE=256, once
    /healthz answers; stopped with SIGINT afterwards."""
    port = free_port()
    out, err = tmp / f"serve-{port}.out", tmp / f"serve-{port}.err"
    command = (argv or [str(EXTREG), "serve", "--port"]) + [str(port)]
    with out.open("wb") as stdout, err.open("wb") as stderr:
        proc = subprocess.Popen(
            command,
            stdout=stdout,
            stderr=stderr,
            env=environment(tmp, **settings),
            preexec_fn=lowered_nofile,
        )
    served = Served(proc, port, out, err)
    try:
        wait_for(lambda: answers(served.url), f"serve did not start: {err}", proc)
        yield served
    finally:
        stop_process(proc)


def answers(url: str) -> bool:
    try:
        return httpx.get(url + "/healthz", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


def wait_for(
    condition: Callable[[], bool], what: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{what} (the server exited with {proc.returncode})")
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.05)


def closed_by_server(sock: socket.socket, got: bytearray | None = None) -> bool:
    """Whether the server has closed `sock`; what it sent meanwhile is added to `got`."""
    sock.setblocking(False)
    try:
        while chunk := sock.recv(65536):
            if got is not None:
                got += chunk
    except BlockingIOError:
        return False
    except ConnectionResetError:
        pass
    finally:
        sock.settimeout(DEADLINE_S)
    return True


def tracebacks(served: Served) -> int:
    return sum("Traceback" in line for line in served.log_lines())


def test_silent_connections_beyond_the_cap_leave_room_for_requests(tmp_path: Path) -> None:
    """150 silent connections against a 256-descriptor process, with timeouts long enough not
    to help: the server keeps its cap (60 here: 256 minus room for the pool, one accept batch
    and files), answers a request on a fresh connection, logs no traceback, never runs out of
    descriptors, and answers normally once the silent connections are gone."""
    with serving(
        tmp_path, http_keep_alive_seconds="300", http_request_timeout_seconds="300"
    ) as served:
        listening = served.events("api_listening")[0]
        cap = listening["max_connections"]
        assert isinstance(cap, int) and cap < NOFILE
        silent = [served.connect() for _ in range(150)]
        try:
            wait_for(lambda: answers(served.url), "no answer on a fresh connection")
            held = served.descriptors()
            assert held < NOFILE
            assert answers(served.url)
            lines, traced = len(served.log_lines()), tracebacks(served)
            dropped = sum(closed_by_server(s) for s in silent)
        finally:
            for sock in silent:
                sock.close()
        wait_for(lambda: answers(served.url), "no answer after the silent connections left")
        print(
            f"\ncap {cap}: {held} descriptors held with 150 silent connections, "
            f"{dropped} of them closed by the server; {lines} log lines, {traced} tracebacks"
        )
        assert 0 == traced
        assert lines < 50
        assert dropped >= 150 - cap


HOG = """
import asyncio, os, signal, sys
from extreg import logs
from extreg.serve import serve
from extreg.settings import Settings

held: list[int] = []

def hog() -> None:
    try:
        while True:
            held.append(os.open(os.devnull, os.O_RDONLY))
    except OSError:
        pass
    print("hogged", len(held), flush=True)

def release() -> None:
    while held:
        os.close(held.pop())
    print("released", flush=True)

async def main() -> None:
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGUSR1, hog)
    loop.add_signal_handler(signal.SIGUSR2, release)
    await serve(Settings(), host="127.0.0.1", port=int(sys.argv[1]))

logs.configure(json=True)
asyncio.run(main())
"""


def test_descriptor_exhaustion_logs_a_line_per_interval_and_recovers(tmp_path: Path) -> None:
    """With every descriptor of the server taken (by a hog inside the process, on SIGUSR1),
    connections wait in the backlog; accept() fails with EMFILE again and again, but the log
    gets one warning per interval and no traceback. Once the hog lets go (SIGUSR2) the server
    accepts again by itself: the waiting requests and new ones are answered."""
    with serving(tmp_path, argv=[sys.executable, "-c", HOG], http_keep_alive_seconds="2") as served:
        served.proc.send_signal(signal.SIGUSR1)
        wait_for(lambda: "hogged" in served.out.read_text(), "the hog did not start")
        before = len(served.log_lines())
        waiting = [served.connect() for _ in range(20)]
        for sock in waiting:
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        wait_for(lambda: bool(served.events("http_accept_failed")), "accept never failed")
        time.sleep(3)  # an observation window: asyncio retries accept() every second meanwhile
        during = [line for line in served.log_lines()[before:] if "nats_error" not in line]
        failed = served.events("http_accept_failed")
        served.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "released" in served.out.read_text(), "the hog did not let go")
        wait_for(lambda: answers(served.url), "no answer after the descriptors came back")
        replies = []
        for sock in waiting:
            sock.settimeout(DEADLINE_S)
            replies.append(sock.recv(65536))
            sock.close()
        assert 0 == sum("Traceback" in line for line in during)
        assert 1 <= len(failed) <= 2
        assert len(during) <= 3
        assert all(reply.startswith(b"HTTP/1.1 200") for reply in replies)
    failures = sum(int(str(e["occurrences"])) for e in served.events("http_accept_failed"))
    print(
        f"\nexhausted for ~3 s: {len(during)} log lines (NATS retries aside), {len(failed)} "
        f"accept warnings; {failures} failed accepts in all (the last line, at shutdown)"
    )


def test_a_client_trickling_headers_is_dropped(tmp_path: Path) -> None:
    """One header line every 0.5 s, more often than the keep-alive timeout: the connection is
    closed with a 408 once the request timeout (2 s) passes, not held for ever."""
    with serving(tmp_path, http_keep_alive_seconds="1", http_request_timeout_seconds="2") as served:
        sock = served.connect()
        started = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\n")
        answer, closed = bytearray(), False
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for n in range(int(DEADLINE_S / 0.5)):
                time.sleep(0.5)
                if closed := closed_by_server(sock, answer):
                    break
                sock.sendall(f"X-Slow-{n}: yes\r\n".encode())
        closed = closed or closed_by_server(sock, answer)
        held = time.monotonic() - started
        sock.close()
        print(f"\ntrickler dropped after {held:.1f} s (request timeout 2 s)")
        assert closed, "the trickling client was never disconnected"
        assert answer.startswith(b"HTTP/1.1 408")
        body = json.loads(bytes(answer).split(b"\r\n\r\n", 1)[1])
        assert {"error", "detail"} <= set(body)
        assert held >= 2


def test_a_body_that_never_finishes_is_dropped(tmp_path: Path) -> None:
    """Content-Length 1000 and a byte every 0.5 s: the request is answered 408 and closed once
    the request timeout passes, the app sees the disconnect, and no traceback is logged."""
    with serving(tmp_path, http_keep_alive_seconds="1", http_request_timeout_seconds="2") as served:
        sock = served.connect()
        started = time.monotonic()
        sock.sendall(
            b"POST /admin/extensions/normalize_text/invoke HTTP/1.1\r\nHost: t\r\n"
            b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
        )
        answer, closed = bytearray(), False
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for _ in range(int(DEADLINE_S / 0.5)):
                time.sleep(0.5)
                if closed := closed_by_server(sock, answer):
                    break
                sock.sendall(b" ")
        closed = closed or closed_by_server(sock, answer)
        held = time.monotonic() - started
        sock.close()
        print(f"\nnever-ending body dropped after {held:.1f} s (request timeout 2 s)")
        assert closed, "the never-ending body was never cut off"
        assert answer.startswith(b"HTTP/1.1 408")
        assert held >= 2
        assert answers(served.url)
        assert 0 == tracebacks(served)


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(tmp_path: Path) -> None:
    """A connection that never sends a byte, and one idle after a response, are both closed
    by the server after the keep-alive timeout (uvicorn alone holds the first for ever)."""
    with serving(tmp_path, http_keep_alive_seconds="1") as served:
        fresh, used = served.connect(), served.connect()
        used.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n")
        silent, answered = bytearray(), bytearray()
        wait_for(lambda: closed_by_server(fresh, silent), "a silent connection stayed open")
        wait_for(lambda: closed_by_server(used, answered), "an idle connection stayed open")
        fresh.close()
        used.close()
        assert b"" == bytes(silent)  # closed for idleness, not answered
        assert answered.startswith(b"HTTP/1.1 200")  # answered first, then closed when idle


def test_at_the_cap_with_every_connection_busy_a_new_one_gets_503(tmp_path: Path) -> None:
    """With `http_max_connections` 3 and three requests in progress (bodies still arriving),
    a fourth connection is answered 503 in JSON and closed rather than held; once those
    requests end, new connections are served again."""
    with serving(
        tmp_path,
        http_max_connections="3",
        http_request_timeout_seconds="300",
        http_keep_alive_seconds="300",
    ) as served:
        busy = [served.connect() for _ in range(3)]
        for sock in busy:
            sock.sendall(
                b"POST /admin/extensions/normalize_text/invoke HTTP/1.1\r\nHost: t\r\n"
                b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"
            )
        time.sleep(1.0)  # let the three requests reach the app (parsed in well under that)
        extra, got = served.connect(), bytearray()
        wait_for(lambda: closed_by_server(extra, got), "the fourth connection was held")
        extra.close()
        head, _, body = bytes(got).partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503")
        assert {"error", "detail"} <= set(json.loads(body))
        for sock in busy:
            sock.close()
        wait_for(lambda: answers(served.url), "no answer once the busy requests ended")
