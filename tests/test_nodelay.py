"""The API's listening socket gives every accepted connection TCP_NODELAY.

Without it a kept-alive response written in two parts (headers, body) waits ~40 ms for the
client's delayed ACK (Nagle's algorithm). This checks the option itself, not a response time:
how fast a request answers is a benchmark's figure, not a test's.
"""

from __future__ import annotations

import asyncio
import socket

from extreg.api.server import listen


async def test_accepted_connections_have_tcp_nodelay() -> None:
    """`listen` returns a socket that says IPPROTO_TCP, so asyncio turns TCP_NODELAY on for
    the connections it accepts (as uvicorn's server does with the same socket)."""
    sock = listen("127.0.0.1", 0)
    accepted: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    class Probe(asyncio.Protocol):
        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            conn = transport.get_extra_info("socket")
            accepted.set_result(conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            transport.close()

    server = await asyncio.get_running_loop().create_server(Probe, sock=sock)
    try:
        host, port = sock.getsockname()[:2]
        _, writer = await asyncio.open_connection(host, port)
        nodelay = await asyncio.wait_for(accepted, 30)
        writer.close()
        await writer.wait_closed()
    finally:
        server.close()
        await server.wait_closed()
    assert (socket.IPPROTO_TCP, 1) == (sock.proto, nodelay != 0)
