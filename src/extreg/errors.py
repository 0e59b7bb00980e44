"""Every error extreg raises on purpose, in one tree.

    ExtregError                     base of everything below
    ├── ConfigError                 bad settings (file, environment or flag); exit status 2
    │   └── UnknownToken            no API token has this name
    ├── InvalidRecord               an extension or policy record breaks a rule; names record
    │                               and field
    ├── StrictJSONError             a document is not strict JSON (also a ValueError); always
    │                               translated to InvalidRecord or FixtureError before users see it
    ├── FixtureError                a fixtures folder cannot be loaded; lists every problem
    ├── SnapshotFileError           the last-known-good snapshot file is missing, corrupt or torn
    ├── SourceUnavailable           the database cannot be reached (reason is password-free)
    ├── Conflict                    a write collides with what is there (duplicate id, fixtures)
    │   └── StaleETag               `If-Match` names a version that is no longer current
    ├── NatsUnavailable             NATS cannot be reached when the invoker starts
    ├── NatsServerError             a private nats-server (demo, tests) would not start
    ├── SampleRunnerError           the sample extensions cannot connect to NATS or subscribe
    ├── ListenError                 the admin API's address cannot be bound
    ├── AuthFailed                  (API client) the server refused the token, role or address
    ├── ServerUnreachable           (API client) no answer from the server at the URL given
    ├── ApiError                    (API client) any other answer the client cannot use
    ├── PolicyError                 a policy run did not give a result; carries the steps so far
    │   ├── PolicyNotFound
    │   ├── PolicyDisabled
    │   ├── ValidatorBlocked        a validator with on_fail=block rejected, timed out or failed
    │   ├── StepFailed              a required pre or post step failed
    │   └── NoProvider              every provider failed, or none could be called
    └── ExtensionError              a lookup or a call of one extension failed
        ├── ExtensionNotFound
        ├── ExtensionDisabled
        ├── CircuitOpen
        │   └── HealthRefused       health-based routing refused: success rate too low
        ├── Overloaded              the extension's bulkhead is full on this node; not its failure
        ├── ExtensionTimeout
        ├── MaxRetriesExceeded
        ├── InvalidResponse
        ├── PayloadTooLarge
        └── InvocationError         anything else on the way
            └── TransportUnavailable  our NATS connection is down; not the extension's fault

Library errors (psycopg, nats-py, msgspec, httpx) are translated into these inside the
adapters that call the library, so callers above the adapters only ever handle this tree. The
CLI maps the tree to exit codes and the HTTP API maps it to statuses, each in one place; the
API answers with the class name, and `extreg.client` rebuilds the same class from it.
`tests/test_error_tree.py` fails when a class raised anywhere is missing from this tree or
from the docs.
"""

from __future__ import annotations

from typing import Any


def printable(text: str, limit: int = 80) -> str:
    """User input made safe to show: control and invisible characters escaped, length capped,
    so an error message can neither drive a terminal nor run to megabytes."""
    shown = "".join(
        c if c.isprintable() else c.encode("unicode_escape").decode() for c in text[:limit]
    )
    return shown + (f"... ({len(text)} characters)" if len(text) > limit else "")


class ExtregError(Exception):
    """Base of every error extreg raises on purpose."""


class ConfigError(ExtregError):
    """A setting is wrong; the message names the key and where it came from."""


class UnknownToken(ConfigError):
    """No token has this name (bad input: exit status 2)."""


class InvalidRecord(ExtregError):
    """One extension record breaks a rule.

    `problems` holds `(field, message)` pairs so callers can report each field at fault.
    """

    def __init__(
        self, record: str, problems: list[tuple[str, str]], kind: str = "extension"
    ) -> None:
        self.record = record
        self.problems = problems
        self.kind = kind  # "extension" or "policy"
        text = "; ".join(f"{printable(field)}: {message}" for field, message in problems)
        super().__init__(f"{kind} {printable(record)!r}: {text}")


class FixtureError(ExtregError):
    """A fixtures folder holds at least one problem; `problems` lists all of them."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


class SnapshotFileError(ExtregError):
    """The last-known-good snapshot file cannot be trusted."""


class StrictJSONError(ExtregError, ValueError):
    """The document is not strict JSON; the message says why and where.

    Raised by `extreg.core.strictjson.loads` and translated by its callers (fixtures, API bodies)
    into `FixtureError` / `InvalidRecord`, which also name the file or request."""


class SourceUnavailable(ExtregError):
    """The database is unreachable or failed mid-operation."""


class Conflict(ExtregError):
    """A write collides with the current state (duplicate id, stale version, fixtures mode)."""


class StaleETag(Conflict):
    """`If-Match` names a version of the record that is no longer current (HTTP 412)."""


class NatsUnavailable(ExtregError):
    """NATS could not be reached when the invoker started (`serve` keeps retrying)."""


class NatsServerError(ExtregError):
    """The NATS server binary is missing, or the process would not start or become ready."""


class SampleRunnerError(ExtregError):
    """The sample extensions could not connect to NATS or subscribe."""


class ListenError(ExtregError):
    """The API's address cannot be bound (port taken, address not on this machine)."""


class AuthFailed(ExtregError):
    """The server refused the token (401), its role (403), or the address (429)."""


class ServerUnreachable(ExtregError):
    """No answer from the server at the URL given."""


class ApiError(ExtregError):
    """Any other answer the API client cannot use (a server error, say)."""


class PolicyError(ExtregError):
    """A policy run stopped without a result.

    `steps` are the steps run so far (`extreg.core.pipeline.Step`, in policy order), the failing
    one last; `cause` is the extension error behind it, if any. For `StepFailed` and
    `NoProvider` the cause decides the HTTP status (an open circuit or an unavailable
    extension 503, a timeout 504, else 502); a `ValidatorBlocked` is 403 whatever its cause
    (the validator decided)."""

    reason_default = "policy run failed"

    def __init__(
        self,
        policy_id: str,
        reason: str | None = None,
        steps: list[Any] | None = None,
        cause: ExtensionError | None = None,
    ) -> None:
        self.policy_id = policy_id
        self.reason = reason or self.reason_default
        self.steps = steps or []
        self.cause = cause
        super().__init__(f"policy {policy_id}: {self.reason}")


class PolicyNotFound(PolicyError):
    reason_default = "no such policy"


class PolicyDisabled(PolicyError):
    reason_default = "policy is disabled"


class ValidatorBlocked(PolicyError):
    """A validator with `on_fail: block` rejected the message (or timed out, or failed: the
    original counts those as rejects). `reason` and `details` are the validator's."""

    reason_default = "validator_blocked"

    def __init__(
        self,
        policy_id: str,
        extension_id: str,
        reason: str | None = None,
        details: Any = None,
        steps: list[Any] | None = None,
        cause: ExtensionError | None = None,
    ) -> None:
        self.extension_id = extension_id
        self.details = details if details is not None else {}
        super().__init__(policy_id, reason, steps, cause)


class StepFailed(PolicyError):
    """A required pre or post step failed; `cause` says how."""

    reason_default = "a required step failed"


class NoProvider(PolicyError):
    """No provider answered: each was passed over (open circuit, no hook) or failed."""

    reason_default = "no provider answered"


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


class HealthRefused(CircuitOpen):
    """Health-based routing refused the call: the extension's recent success rate is too low."""

    reason_default = "recent success rate is below health_based_routing_min_success_rate"


class Overloaded(ExtensionError):
    """As many calls to the extension are in flight on this node as its limit allows
    (`extension_max_concurrency`, metadata `max_concurrency`, or the adaptive limit): refused
    at once, never queued, and not counted as the extension's failure."""

    reason_default = "too many calls in flight to this extension"


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


class TransportUnavailable(InvocationError):
    """The connection to NATS is down (reconnecting or closed); the extension is not at fault."""

    reason_default = "NATS is not connected"
