"""Every error extreg raises on purpose, in one tree.

    ExtregError                     base of everything below
    ├── ConfigError                 bad settings (file, environment or flag); exit status 2
    ├── InvalidRecord               an extension record breaks a rule; names record and field
    ├── FixtureError                a fixtures folder cannot be loaded; lists every problem
    ├── SnapshotFileError           the last-known-good snapshot file is missing, corrupt or torn
    ├── SourceUnavailable           the database cannot be reached (reason is password-free)
    ├── Conflict                    a write collides with what is there (duplicate id, stale ETag)
    └── ExtensionError              a lookup or a call of one extension failed
        ├── ExtensionNotFound
        ├── ExtensionDisabled
        ├── CircuitOpen
        ├── ExtensionTimeout
        ├── MaxRetriesExceeded
        ├── InvalidResponse
        ├── PayloadTooLarge
        └── InvocationError         transport failure or anything else on the way

Library errors (psycopg, nats-py, msgspec) are translated into these inside the adapters
that call the library, so callers above the adapters only ever handle this tree. The CLI maps
the tree to exit codes and the HTTP API maps it to statuses, each in one place.
"""

from __future__ import annotations


def printable(text: str, limit: int = 80) -> str:
    """User input made safe to show: control and invisible characters escaped, length capped,
    so an error message can neither drive a terminal nor run to megabytes."""
    shown = "".join(c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit])
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


class ExtregError(Exception):
    """Base of every error extreg raises on purpose."""


class ConfigError(ExtregError):
    """A setting is wrong; the message names the key and where it came from."""


class InvalidRecord(ExtregError):
    """One extension record breaks a rule.

    `problems` holds `(field, message)` pairs so callers can report each field at fault.
    """

    def __init__(self, record: str, problems: list[tuple[str, str]]) -> None:
        self.record = record
        self.problems = problems
        text = "; ".join(f"{printable(field)}: {message}" for field, message in problems)
        super().__init__(f"extension {printable(record)!r}: {text}")


class FixtureError(ExtregError):
    """A fixtures folder holds at least one problem; `problems` lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SnapshotFileError(ExtregError):
    """The last-known-good snapshot file cannot be trusted."""


class SourceUnavailable(ExtregError):
    """The database is unreachable or failed mid-operation."""


class Conflict(ExtregError):
    """A write collides with the current state (duplicate id, stale version, fixtures mode)."""


class ExtensionError(ExtregError):
    """A lookup or an invocation of one extension failed."""

    reason_default = "extension error"

    def __init__(self, extension_id: str, reason: str | None = None, attempts: int = 0) -> None:
        self.extension_id = extension_id
        self.reason = reason or self.reason_default
        self.attempts = attempts
        super().__init__(f"{extension_id}: {self.reason}")


class ExtensionNotFound(ExtensionError):
    reason_default = "no such extension"


class ExtensionDisabled(ExtensionError):
    reason_default = "extension is disabled"


class CircuitOpen(ExtensionError):
    reason_default = "circuit breaker is open"


class ExtensionTimeout(ExtensionError):
    reason_default = "extension did not answer in time"


class MaxRetriesExceeded(ExtensionError):
    reason_default = "every attempt timed out"


class InvalidResponse(ExtensionError):
    reason_default = "reply is not a JSON object"


class PayloadTooLarge(ExtensionError):
    reason_default = "request is larger than allowed"


class InvocationError(ExtensionError):
    reason_default = "invocation failed"
