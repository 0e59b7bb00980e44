"""Request-scoped structured logs: one `http_request` event per request, with method, path,
status, duration and (once authenticated) the token's name as `actor`.

A plain ASGI middleware rather than Starlette's `BaseHTTPMiddleware`, so the handler runs in
the same context and what it binds (actor, extension_id, trace_id) reaches the final event.
Only the path is logged, never the query string or any header, so no token can leak.

A client that goes away before its body is complete is no server error: the app then gets
Starlette's `ClientDisconnect` (or, reading a body model, FastAPI's 400 built from it). Both
are logged as one `client_disconnected` line and `http_request` with status 499 (nginx's
"client closed request"), with no traceback; nothing can be answered anyway.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import structlog
from fastapi import Request
from starlette.datastructures import Headers
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

log = structlog.get_logger("extreg.api")

QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})  # probes: logged at debug
CLIENT_CLOSED_REQUEST = 499


class RequestLog:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        structlog.contextvars.clear_contextvars()
        client = scope.get("client")
        structlog.contextvars.bind_contextvars(
            request_id=uuid.uuid4().hex[:16],
            method=scope["method"],
            path=scope["path"],
            client=client[0] if client else None,
        )
        status = 500
        started = time.perf_counter()
        received, body_complete, disconnected = 0, False, False

        async def receive_and_note() -> Message:
            nonlocal received, body_complete, disconnected
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not body_complete:
                disconnected = True
            return message

        async def send_and_note(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive_and_note, send_and_note)
        except ClientDisconnect:
            disconnected = True  # the body ended early; there is no one to answer
        finally:
            if disconnected:
                status = CLIENT_CLOSED_REQUEST
                log.info(
                    "client_disconnected",
                    during="request body",
                    received_bytes=received,
                    declared_bytes=Headers(scope=scope).get("content-length"),
                )
            event: dict[str, Any] = {
                "status": status,
                "duration_ms": round((time.perf_counter() - started) * 1000, 2),
            }
            if scope["path"] in QUIET_PATHS:
                log.debug("http_request", **event)
            else:
                log.info("http_request", **event)
            structlog.contextvars.clear_contextvars()


async def bind_extension_id(request: Request) -> None:
    """Router dependency: put the path's `extension_id` on every log event of the request."""
    extension_id = request.path_params.get("extension_id")
    if extension_id is not None:
        structlog.contextvars.bind_contextvars(extension_id=extension_id)
