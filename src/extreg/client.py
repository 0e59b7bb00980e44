"""A small client of the admin API, for the CLI's `--url`/`--token` mode.

Answers are translated at this edge into extreg's error tree, so the CLI maps them to exit
codes exactly as it maps local errors: 404 `ExtensionNotFound`, 409/412 `Conflict`, 422
`InvalidRecord` (exit 2); 401/403/429 `AuthFailed`, an unreachable server `ServerUnreachable`,
invocation failures the same `ExtensionError` subclass the server raised (exit 1).
The token goes only into the Authorization header; no message ever contains it.
"""

from __future__ import annotations

from typing import Any, Self

import httpx

from . import errors
from .errors import Conflict, ExtensionError, ExtensionNotFound, ExtregError, InvalidRecord
from .settings import redact_url

DEFAULT_TIMEOUT_S = 30.0
URL_ENV, TOKEN_ENV = "EXTREG_URL", "EXTREG_TOKEN"


class AuthFailed(ExtregError):
    """The server refused the token (401), its role (403), or the address (429)."""


class ServerUnreachable(ExtregError):
    """No answer from the server at the URL given."""


class ApiError(ExtregError):
    """Any other answer the client cannot use (a server error, say)."""


class ApiClient:
    """`ApiClient(url, token)`; one method per CLI command acting through the API."""

    def __init__(self, url: str, token: str | None, *, timeout_s: float = DEFAULT_TIMEOUT_S,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = url.rstrip("/")
        self._has_token = bool(token)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout_s,
                                  transport=transport)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def set_enabled(self, extension_id: str, enabled: bool) -> dict[str, Any]:
        action = "enable" if enabled else "disable"
        path = f"/admin/extensions/{_segment(extension_id)}/{action}"
        record: dict[str, Any] = self._call("POST", path, extension_id=extension_id)
        return record

    def reload(self) -> dict[str, Any]:
        report: dict[str, Any] = self._call("POST", "/admin/reload")
        return report

    def health(self, extension_id: str | None = None) -> dict[str, Any]:
        path = "/admin/extensions/health" if extension_id is None else \
            f"/admin/extensions/{_segment(extension_id)}/health"
        report: dict[str, Any] = self._call("GET", path, extension_id=extension_id)
        return report

    def audit(self, extension_id: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if extension_id is not None:
            params["extension_id"] = extension_id
        rows: list[dict[str, Any]] = self._call("GET", "/admin/audit", params=params)
        return rows

    def invoke(self, extension_id: str, payload: Any, *, metadata: dict[str, Any] | None = None,
               tenant_id: str | None = None, trace_id: str | None = None) -> dict[str, Any]:
        body = {"payload": payload, "metadata": metadata or {}, "tenant_id": tenant_id,
                "trace_id": trace_id}
        answer: dict[str, Any] = self._call(
            "POST", f"/admin/extensions/{_segment(extension_id)}/invoke", json=body,
            extension_id=extension_id)
        return answer

    def _call(self, method: str, path: str, *, extension_id: str | None = None,
              **kwargs: Any) -> Any:
        try:
            answer = self._http.request(method, path, **kwargs)
        except httpx.HTTPError as exc:
            raise ServerUnreachable(
                f"cannot reach the extreg server at {redact_url(self.url)}: {exc}"
            ) from None
        if answer.is_success:
            return answer.json()
        raise self._error(answer, extension_id)

    def _error(self, answer: httpx.Response, extension_id: str | None) -> ExtregError:
        status = answer.status_code
        body = _json_or_none(answer)
        detail = body.get("detail") if isinstance(body, dict) else None
        text = detail if isinstance(detail, str) else answer.reason_phrase
        if status == 401:
            hint = "check --token or EXTREG_TOKEN" if self._has_token else \
                "no token given: pass --token or set EXTREG_TOKEN"
            return AuthFailed(f"the server refused the token (401 unauthorized): {hint}")
        if status == 403:
            return AuthFailed(f"not allowed (403 forbidden): {text}")
        if status == 429:
            wait = answer.headers.get("retry-after", "?")
            return AuthFailed(f"too many failed authentications (429): retry in {wait} s")
        known = getattr(errors, str(body.get("error")), None) if isinstance(body, dict) else None
        if isinstance(known, type) and issubclass(known, ExtensionError) and isinstance(body, dict):
            return known(str(body.get("extension_id") or extension_id), body.get("reason"),
                         int(body.get("attempts") or 0))
        if status == 404:
            return ExtensionNotFound(extension_id or "?", None)
        if status in (409, 412):
            return Conflict(text)
        if status == 422:
            return InvalidRecord(extension_id or "request", _problems(detail))
        return ApiError(f"the server answered {status}: {text}")


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
