"""A cap on request bodies: 413 for one larger than `max_body_bytes(settings)`.

A body whose `Content-Length` is over the cap is refused before the route runs, without
reading it, so a route that ignores its body (enable, reload) does nothing either. A body
without a length (chunked) is counted as the route reads it and refused once it passes the
cap, so no more than the cap is ever held in memory. Both answer 413 with `error`
PayloadTooLarge, like an invocation over the payload limit.
"""

from __future__ import annotations

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from ..settings import Settings
from .errors import http_error_name


def max_body_bytes(settings: Settings) -> int:
    """Room for an invocation at the payload and metadata limits, twice over (for JSON
    written with spaces and escapes); records are far smaller."""
    return 2 * (settings.extension_max_payload_size + settings.extension_max_metadata_size)


def _too_large(limit: int) -> str:
    return f"the request body is larger than the limit of {limit} bytes"


class BodyLimit:
    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = Headers(scope=scope).get("content-length", "")
        if length.strip().isdigit() and int(length) > self.limit:
            response = JSONResponse(
                {"detail": _too_large(self.limit), "error": http_error_name(413)},
                status_code=413,
                headers={"Connection": "close"},
            )
            await response(scope, receive, send)
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise HTTPException(413, _too_large(self.limit))
            return message

        await self.app(scope, counted, send)
