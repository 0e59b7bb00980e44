"""A small client of the admin API, for the CLI's `--url`/`--token` mode.

Answers are translated at this edge into extreg's error tree, so the CLI maps them to exit
codes exactly as it maps local errors. Every error answer names its class in `error`; the
client rebuilds that class of `extreg.errors` by name (an `ExtensionError` with its
`extension_id`, `reason` and `attempts`, an `InvalidRecord` with its fields, a `FixtureError`
with its problems, a `PolicyError` with its `policy_id`, `reason` and `steps`), so a remote
failure raises what the same command raises locally. Answers without a name go by status:
401/403/429 `AuthFailed`, 404 `ExtensionNotFound` (`PolicyNotFound` on a policy route),
409/412 `Conflict`, 422 `InvalidRecord`, anything else (or a name the client does not know)
`ApiError`; no answer at all is `ServerUnreachable`. A URL that is not http(s) is refused as
a `ConfigError` (bad input) before anything is sent.
The token goes only into the Authorization header; no message ever contains it.
"""

from __future__ import annotations

from typing import Any, Self, cast

import httpx

from . import errors
from .core.pipeline import Step, StepStatus
from .core.policy import Stage
from .errors import (
    ApiError,
    AuthFailed,
    ConfigError,
    Conflict,
    ExtensionError,
    ExtensionNotFound,
    ExtregError,
    FixtureError,
    InvalidRecord,
    PolicyError,
    PolicyNotFound,
    ServerUnreachable,
    ValidatorBlocked,
)
from .settings import redact_url

DEFAULT_TIMEOUT_S = 30.0
URL_ENV, TOKEN_ENV = "EXTREG_URL", "EXTREG_TOKEN"


class ApiClient:
    """`ApiClient(url, token)`; one method per CLI command acting through the API."""

    def __init__(
        self,
        url: str,
        token: str | None,
        *,
        timeout_s: float = DEFAULT_TIMEOUT_S,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        if not url.lower().startswith(("http://", "https://")):
            raise ConfigError("--url must be an http:// or https:// URL of an extreg server")
        self.url = url.rstrip("/")
        self._has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(
            base_url=self.url, headers=headers, timeout=timeout_s, transport=transport
        )

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def get_extension(self, extension_id: str) -> dict[str, Any]:
        record: dict[str, Any] = self._call(
            "GET", f"/admin/extensions/{_segment(extension_id)}", extension_id=extension_id
        )
        return record

    def set_enabled(self, extension_id: str, enabled: bool) -> tuple[str, dict[str, Any]]:
        """("updated" | "unchanged", the record after). The route answers alike whether or
        not it changed anything, so the record is read first: the same record after the
        write (stamps included) is "unchanged". The write is always sent, so the server
        still checks the token's role."""
        before = self.get_extension(extension_id)
        action = "enable" if enabled else "disable"
        path = f"/admin/extensions/{_segment(extension_id)}/{action}"
        after: dict[str, Any] = self._call("POST", path, extension_id=extension_id)
        return ("unchanged" if after == before else "updated"), after

    def reload(self) -> dict[str, Any]:
        report: dict[str, Any] = self._call("POST", "/admin/reload")
        return report

    def health(self, extension_id: str | None = None) -> dict[str, Any]:
        path = (
            "/admin/extensions/health"
            if extension_id is None
            else f"/admin/extensions/{_segment(extension_id)}/health"
        )
        report: dict[str, Any] = self._call("GET", path, extension_id=extension_id)
        return report

    def audit(
        self, extension_id: str | None = None, limit: int = 100, *, policy_id: str | None = None
    ) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if extension_id is not None:
            params["extension_id"] = extension_id
        if policy_id is not None:
            params["policy_id"] = policy_id
        rows: list[dict[str, Any]] = self._call("GET", "/admin/audit", params=params)
        return rows

    def invoke(
        self,
        extension_id: str,
        payload: Any,
        *,
        metadata: dict[str, Any] | None = None,
        tenant_id: str | None = None,
        trace_id: str | None = None,
    ) -> dict[str, Any]:
        body = {
            "payload": payload,
            "metadata": metadata or {},
            "tenant_id": tenant_id,
            "trace_id": trace_id,
        }
        answer: dict[str, Any] = self._call(
            "POST",
            f"/admin/extensions/{_segment(extension_id)}/invoke",
            json=body,
            extension_id=extension_id,
        )
        return answer

    # -- routing policies (the routes of SPEC.md, "Routing policies and the pipeline") ------

    def list_policies(self) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = self._call("GET", "/admin/policies")
        return found

    def get_policy(self, policy_id: str) -> dict[str, Any]:
        policy: dict[str, Any] = self._call(
            "GET", f"/admin/policies/{_segment(policy_id)}", policy_id=policy_id
        )
        return policy

    def put_policy(self, policy: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """Create or replace one policy; ("created" | "updated", the policy as stored). The
        status says which: 201 for a new one."""
        policy_id = str(policy.get("policy_id"))
        answer = self._request(
            "PUT", f"/admin/policies/{_segment(policy_id)}", policy_id=policy_id, json=policy
        )
        stored: dict[str, Any] = answer.json()
        return ("created" if answer.status_code == 201 else "updated"), stored

    def delete_policy(self, policy_id: str) -> None:
        self._request("DELETE", f"/admin/policies/{_segment(policy_id)}", policy_id=policy_id)

    def run_policy(
        self, policy_id: str, message: Any, context: dict[str, Any] | None = None
    ) -> dict[str, Any]:
        """One run of the pipeline on the server; a failed run raises its `PolicyError`."""
        result: dict[str, Any] = self._call(
            "POST",
            f"/admin/policies/{_segment(policy_id)}/run",
            policy_id=policy_id,
            json={"message": message, "context": context or {}},
        )
        return result

    def _call(
        self,
        method: str,
        path: str,
        *,
        extension_id: str | None = None,
        policy_id: str | None = None,
        **kwargs: Any,
    ) -> Any:
        return self._request(
            method, path, extension_id=extension_id, policy_id=policy_id, **kwargs
        ).json()

    def _request(
        self,
        method: str,
        path: str,
        *,
        extension_id: str | None = None,
        policy_id: str | None = None,
        **kwargs: Any,
    ) -> httpx.Response:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"cannot reach the extreg server at {redact_url(self.url)}: {exc}"
            ) from None
        if answer.is_success:
            return answer
        raise self._error(answer, extension_id, policy_id)

    def _error(
        self, answer: httpx.Response, extension_id: str | None, policy_id: str | None = None
    ) -> ExtregError:
        status = answer.status_code
        body = _json_or_none(answer)
        body = body if isinstance(body, dict) else {}
        detail = body.get("detail")
        text = detail if isinstance(detail, str) else answer.reason_phrase
        named = class_named(body.get("error"))
        if named is not None and issubclass(named, PolicyError):  # a run's 403 is a block
            return rebuild(named, body, text, extension_id, policy_id)
        if status == 401:
            hint = (
                "check --token or EXTREG_TOKEN"
                if self._has_token
                else "no token given: pass --token or set EXTREG_TOKEN"
            )
            return AuthFailed(f"the server refused the token (401 unauthorized): {hint}")
        if status == 403:
            return AuthFailed(f"not allowed (403 forbidden): {text}")
        if status == 429:
            wait = answer.headers.get("retry-after", "?")
            return AuthFailed(f"too many failed authentications (429): retry in {wait} s")
        if named is not None:
            return rebuild(named, body, text, extension_id, policy_id)
        if status == 404:
            if policy_id is not None:
                return PolicyNotFound(policy_id)
            return ExtensionNotFound(extension_id or "?", None)
        if status in (409, 412):
            return Conflict(text)
        if status == 422:
            if policy_id is not None:
                return InvalidRecord(policy_id, _problems(detail), kind="policy")
            return InvalidRecord(extension_id or "request", _problems(detail))
        return ApiError(f"the server answered {status}: {text}")


def class_named(name: object) -> type[ExtregError] | None:
    """The class of `extreg.errors` called `name`, or None: the server's `error` field can
    only ever pick a class of the tree, never anything else in the module."""
    found = getattr(errors, name, None) if isinstance(name, str) else None
    return found if isinstance(found, type) and issubclass(found, ExtregError) else None


def rebuild(
    cls: type[ExtregError],
    body: dict[str, Any],
    text: str,
    extension_id: str | None,
    policy_id: str | None = None,
) -> ExtregError:
    """`cls` built from an error answer's body, with the arguments its constructor takes."""
    if issubclass(cls, PolicyError):
        return _policy_error(cls, body, policy_id)
    if issubclass(cls, ExtensionError):
        reason = body.get("reason")
        attempts = body.get("attempts")
        return cls(
            str(body.get("extension_id") or extension_id or "?"),
            reason if isinstance(reason, str) else None,
            attempts if isinstance(attempts, int) else 0,
        )
    if issubclass(cls, InvalidRecord):
        record = body.get("record")
        return cls(
            record if isinstance(record, str) else policy_id or extension_id or "request",
            _problems(body.get("detail")),
            "policy" if policy_id is not None else "extension",
        )
    if issubclass(cls, FixtureError):
        problems = body.get("problems")
        return cls([str(p) for p in problems] if isinstance(problems, list) else [text])
    return cls(text)


def _policy_error(
    cls: type[PolicyError], body: dict[str, Any], policy_id: str | None
) -> PolicyError:
    """A `PolicyError` from its answer: the policy, the reason and the steps so far (made
    `Step`s again, as a local run's error holds them); a validator's block also names the
    validator and its details."""
    pid = str(body.get("policy_id") or policy_id or "?")
    reason = body.get("reason")
    reason = reason if isinstance(reason, str) else None
    sent = body.get("steps")
    steps = [_step(s) for s in sent if isinstance(s, dict)] if isinstance(sent, list) else []
    if issubclass(cls, ValidatorBlocked):
        return cls(pid, str(body.get("extension_id") or "?"), reason, body.get("details"), steps)
    return cls(pid, reason, steps)


def _step(sent: dict[str, Any]) -> Step:
    """One step of an error answer as the `Step` it was (`Step.as_dict` made the dict)."""
    latency = sent.get("latency_ms")
    reason = sent.get("reason")
    return Step(
        stage=cast(Stage, str(sent.get("stage"))),  # the server's own names
        id=str(sent.get("id")),
        status=cast(StepStatus, str(sent.get("status"))),
        latency_ms=float(latency) if isinstance(latency, int | float) else 0.0,
        reason=reason if isinstance(reason, str) else None,
    )


def _segment(extension_id: str) -> str:
    return httpx.URL("/" + extension_id).raw_path.decode()[1:].replace("/", "%2F")


def _json_or_none(answer: httpx.Response) -> Any:
    try:
        return answer.json()
    except ValueError:
        return None


def _problems(detail: Any) -> list[tuple[str, str]]:
    if not isinstance(detail, list):
        return [("request", str(detail))]
    found = []
    for item in detail:
        loc = [str(p) for p in item.get("loc", []) if p != "body"] if isinstance(item, dict) else []
        message = item.get("msg", str(item)) if isinstance(item, dict) else str(item)
        found.append((".".join(loc) or "request", message))
    return found
