"""The error tree mapped to HTTP statuses, once (the CLI maps it to exit codes in `cli.main`).

Every answer carries `detail` (FastAPI's convention) and `error` (the class name, which
`extreg.client` turns back into the same exception, with `extension_id`, `reason` and
`attempts` for an `ExtensionError`, `record` for an `InvalidRecord`, `problems` for a
`FixtureError`, and `policy_id`, `reason`, `steps` and `cause` for a `PolicyError`, whose
status `policy_status` decides). A record that breaks a rule answers 422 in FastAPI's own
validation shape, with `loc` naming the field, so clients handle a schema error and a rule
error alike.
FastAPI's and Starlette's own errors (a malformed body, a parameter FastAPI validates, an
unknown route, a method not allowed) get the same two keys, `error` chosen by status in
`HTTP_ERRORS`; so do the HTTP server's own answers (`connections`: 400, 408, 503).
"""

from __future__ import annotations

import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.utils import is_body_allowed_for_status_code
from starlette.exceptions import HTTPException as StarletteHTTPException

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
    NoProvider,
    Overloaded,
    PayloadTooLarge,
    PolicyDisabled,
    PolicyError,
    PolicyNotFound,
    SnapshotFileError,
    SourceUnavailable,
    StaleETag,
    StepFailed,
    TransportUnavailable,
    ValidatorBlocked,
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
    Overloaded: 503,
    ExtensionTimeout: 504,
    MaxRetriesExceeded: 504,
    PayloadTooLarge: 413,
    InvalidResponse: 502,
    InvocationError: 502,
    ExtensionError: 502,
    PolicyNotFound: 404,
    PolicyDisabled: 409,
    ValidatorBlocked: 403,
    StepFailed: 502,
    NoProvider: 502,
    PolicyError: 502,  # a run gave no result; its subclasses above say how
    ExtregError: 500,
}

# A failed step's cause that makes a policy run's 502 a 503 (the extension cannot be called
# now: its circuit is open, it is disabled or gone, our NATS is down) or a 504 (it timed out).
UNAVAILABLE: tuple[type[ExtensionError], ...] = (
    CircuitOpen,
    Overloaded,
    ExtensionDisabled,
    ExtensionNotFound,
    TransportUnavailable,
)
TIMED_OUT: tuple[type[ExtensionError], ...] = (ExtensionTimeout, MaxRetriesExceeded)

# Answers with no ExtregError behind them (FastAPI's, Starlette's, the HTTP server's own) name
# the class of the tree that a client raises for their status; any other status is ApiError.
HTTP_ERRORS: dict[int, str] = {
    400: "InvalidRecord",
    415: "InvalidRecord",
    422: "InvalidRecord",  # bad input
    401: "AuthFailed",
    403: "AuthFailed",
    429: "AuthFailed",
    413: "PayloadTooLarge",
    500: "ExtregError",
}

_INDEX = re.compile(r"\[(\d+)\]")


def status_of(exc: ExtregError) -> int:
    if isinstance(exc, PolicyError):
        return policy_status(exc)
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 500


def policy_status(exc: PolicyError) -> int:
    """403 for a validator's block whatever made it fail (SPEC.md: the validator decided);
    for a failed step or no provider, 503 or 504 by its cause (see `UNAVAILABLE`), else 502."""
    status = next(STATUS[c] for c in type(exc).__mro__ if c in STATUS)
    if isinstance(exc, StepFailed | NoProvider):
        if isinstance(exc.cause, UNAVAILABLE):
            return 503
        if isinstance(exc.cause, TIMED_OUT):
            return 504
    return status


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
            "kind": exc.kind,
        }
    body: dict[str, Any] = {"detail": str(exc), "error": type(exc).__name__}
    if isinstance(exc, ExtensionError):
        body.update(extension_id=exc.extension_id, reason=exc.reason, attempts=exc.attempts)
    if isinstance(exc, FixtureError):
        body["problems"] = exc.problems
    if isinstance(exc, PolicyError):
        body.update(policy_body(exc))
    return body


def policy_body(exc: PolicyError) -> dict[str, Any]:
    """What a failed run adds: the policy, the reason, the steps so far, and the extension
    error behind it (`cause`); a validator's block also its `extension_id` and `details`."""
    body: dict[str, Any] = {
        "policy_id": exc.policy_id,
        "reason": exc.reason,
        "steps": [s.as_dict() for s in exc.steps],
        "cause": None,
    }
    if exc.cause is not None:
        body["cause"] = {
            "error": type(exc.cause).__name__,
            "extension_id": exc.cause.extension_id,
            "reason": exc.cause.reason,
            "attempts": exc.cause.attempts,
        }
    if isinstance(exc, ValidatorBlocked):
        body.update(extension_id=exc.extension_id, details=exc.details)
    return body


def loc_of(field: str) -> list[str | int]:
    """`versions[0].timeout_ms` -> ["body", "versions", 0, "timeout_ms"]; msgspec's `[...]`
    (a value of a mapping, key unknown) is dropped, so the loc names the mapping."""
    loc: list[str | int] = ["body"]
    if field in ("", "record"):
        return loc
    for part in _INDEX.sub(r".\1", field.replace("[...]", "")).split("."):
        if part:
            # ASCII digits only: a key such as '¹' is a digit to str.isdigit, not to int()
            loc.append(int(part) if part.isascii() and part.isdigit() else part)
    return loc


async def _handle(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, ExtregError)  # registered for ExtregError only
    return JSONResponse(body_of(exc), status_code=status_of(exc))


async def _handle_http(request: Request, exc: Exception) -> Response:
    """FastAPI's and Starlette's HTTPException (401, 404 for an unknown route, 405, 415...)."""
    assert isinstance(exc, StarletteHTTPException)
    if not is_body_allowed_for_status_code(exc.status_code):
        return Response(status_code=exc.status_code, headers=exc.headers)
    return JSONResponse(
        {"detail": exc.detail, "error": http_error_name(exc.status_code)},
        status_code=exc.status_code,
        headers=exc.headers,
    )


async def _handle_validation(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's own 422 (a body model or a parameter), shaped like a record's: `loc`, `msg`
    and `type` per problem (without the input echoed back), `error` InvalidRecord."""
    assert isinstance(exc, RequestValidationError)
    detail = [
        {
            "loc": list(e.get("loc", ())),
            "msg": str(e.get("msg", "")),
            "type": str(e.get("type", "value_error")),
        }
        for e in exc.errors()
    ]
    return JSONResponse(
        jsonable_encoder({"detail": detail, "error": "InvalidRecord", "record": "request"}),
        status_code=422,
    )


async def _handle_bug(request: Request, exc: Exception) -> JSONResponse:
    """Anything unexpected: still JSON (Starlette logs the traceback and re-raises)."""
    return JSONResponse(
        {
            "detail": "internal server error; the server log has the details",
            "error": http_error_name(500),
        },
        status_code=500,
    )


def install(app: FastAPI) -> None:
    """Every error answer as JSON with `detail` and `error`, FastAPI's own included."""
    app.add_exception_handler(ExtregError, _handle)
    app.add_exception_handler(StarletteHTTPException, _handle_http)
    app.add_exception_handler(RequestValidationError, _handle_validation)
    app.add_exception_handler(Exception, _handle_bug)
