"""The error tree mapped to HTTP statuses, once (the CLI maps it to exit codes in `cli.main`).

Every answer carries `detail` (FastAPI's convention) and `error` (the class name, which
`extreg.client` turns back into the same exception, with `extension_id`, `reason` and
`attempts` for an `ExtensionError`, `record` for an `InvalidRecord` and `problems` for a
`FixtureError`). A record that breaks a rule answers 422 in FastAPI's own validation shape,
with `loc` naming the field, so clients handle a schema error and a rule error alike.
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from ..errors import (
    CircuitOpen,
    ConfigError,
    Conflict,
    ExtensionDisabled,
    ExtensionError,
    ExtensionNotFound,
    ExtensionTimeout,
    ExtregError,
    FixtureError,
    InvalidRecord,
    InvalidResponse,
    InvocationError,
    MaxRetriesExceeded,
    NatsUnavailable,
    PayloadTooLarge,
    SnapshotFileError,
    SourceUnavailable,
    StaleETag,
)

# Most specific first: the first class in an error's MRO found here decides its status.
STATUS: dict[type[ExtregError], int] = {
    InvalidRecord: 422,
    ConfigError: 422,
    ExtensionNotFound: 404,
    ExtensionDisabled: 409,
    StaleETag: 412,
    FixtureError: 409,
    Conflict: 409,
    SourceUnavailable: 503,
    NatsUnavailable: 503,
    SnapshotFileError: 503,
    CircuitOpen: 503,
    ExtensionTimeout: 504,
    MaxRetriesExceeded: 504,
    PayloadTooLarge: 413,
    InvalidResponse: 502,
    InvocationError: 502,
    ExtensionError: 502,
    ExtregError: 500,
}

# Answers with no ExtregError behind them (FastAPI's, Starlette's, the HTTP server's own) name
# the class of the tree that a client raises for their status; any other status is ApiError.
HTTP_ERRORS: dict[int, str] = {
    400: "InvalidRecord", 415: "InvalidRecord", 422: "InvalidRecord",  # bad input
    401: "AuthFailed", 403: "AuthFailed", 429: "AuthFailed",
    413: "PayloadTooLarge", 500: "ExtregError",
}

_INDEX = re.compile(r"\[(\d+)\]")


def status_of(exc: ExtregError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def http_error_name(status: int) -> str:
    """The `error` of an answer with `status` that no ExtregError caused."""
    return HTTP_ERRORS.get(status, "ApiError")


def body_of(exc: ExtregError) -> dict[str, Any]:
    if isinstance(exc, InvalidRecord):
        return {
            "detail": [
                {"loc": loc_of(field), "msg": message, "type": "value_error"}
                for field, message in exc.problems
            ],
            "error": "InvalidRecord",
            "record": exc.record,
        }
    body: dict[str, Any] = {"detail": str(exc), "error": type(exc).__name__}
    if isinstance(exc, ExtensionError):
        body.update(extension_id=exc.extension_id, reason=exc.reason, attempts=exc.attempts)
    if isinstance(exc, FixtureError):
        body["problems"] = exc.problems
    return body


def loc_of(field: str) -> list[str | int]:
    """`versions[0].timeout_ms` -> ["body", "versions", 0, "timeout_ms"]; msgspec's `[...]`
    (a value of a mapping, key unknown) is dropped, so the loc names the mapping."""
    loc: list[str | int] = ["body"]
    if field in ("", "record"):
        return loc
    for part in _INDEX.sub(r".\1", field.replace("[...]", "")).split("."):
        if part:
            loc.append(int(part) if part.isdigit() else part)
    return loc


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ExtregError)  # registered for ExtregError only
    return JSONResponse(body_of(exc), status_code=status_of(exc))


def install(app: FastAPI) -> None:
    app.add_exception_handler(ExtregError, _handle)
