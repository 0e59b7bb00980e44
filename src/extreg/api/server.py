"""Running the admin API inside `extreg serve`'s lifespan: uvicorn, programmatically.

The socket is bound here, before uvicorn starts, so a taken port is a clear `ListenError`
(exit status 1) rather than uvicorn's `sys.exit` from inside a task, and so the URL printed
is the one actually listening. uvicorn logs through the standard library (`log_config=None`
keeps extreg's set-up); its access log is off because `RequestLog` logs every request.
Idle and slow connections, their number and descriptor exhaustion are bounded by
`connections` (settings `http_keep_alive_seconds`, `http_request_timeout_seconds`,
`http_max_connections`).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import sys

import structlog
import uvicorn

from ..errors import ListenError
from ..runtime import Runtime
from .app import create_app
from .connections import BACKLOG, ConnectionLimits, GuardedConfig, quiet_accept_errors

log = structlog.get_logger("extreg.api")


def listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, port), family=family, backlog=BACKLOG)
    except OSError as exc:
        raise ListenError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    # asyncio sets TCP_NODELAY on accepted connections only when the socket says IPPROTO_TCP;
    # create_server leaves proto 0, and every kept-alive response would then wait ~40 ms
    # (Nagle's algorithm against the client's delayed ACK).
    return socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP, fileno=sock.detach())


def base_url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def serve_api(
    runtime: Runtime, host: str, port: int, stop: asyncio.Event, *, admin_token: str | None = None
) -> None:
    """Serve the API until `stop` is set (or uvicorn stops on a signal of its own).

    Prints the URL, and `admin_token` when given (the embedded default's first start), once,
    to standard output: the token is meant for the person who started the server, never for
    the logs.
    """
    sock = listen(host, port)
    limits = ConnectionLimits.from_settings(runtime.settings)
    config = GuardedConfig(
        create_app(runtime),
        limits,
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        lifespan="off",
        server_header=False,
        proxy_headers=False,
    )  # X-Forwarded-For: see security.client_address
    server = uvicorn.Server(config)
    url = base_url(sock)
    announce(url, admin_token)
    log.info(
        "api_listening",
        url=url,
        max_connections=limits.max_connections,
        keep_alive_s=limits.keep_alive_s,
        request_timeout_s=limits.request_timeout_s,
    )
    with quiet_accept_errors(asyncio.get_running_loop()):
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        stopping = asyncio.create_task(stop.wait())
        try:
            await asyncio.wait({serving, stopping}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            server.should_exit = True
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await serving
            sock.close()
            config.flush_logs()


def announce(url: str, admin_token: str | None) -> None:
    where = f"dashboard {url}/  admin API {url}/admin  OpenAPI {url}/openapi.json"
    lines = [f"extreg is serving: {where}"]
    if admin_token is not None:
        lines += [
            "An admin token was created for this registry. It is shown only now and stored",
            "only as a hash; keep it (make more with `extreg token create NAME --role R`):",
            admin_token,
        ]
    sys.stdout.write("\n".join(lines) + "\n")
    sys.stdout.flush()
