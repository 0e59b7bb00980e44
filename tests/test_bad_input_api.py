"""Bad-input corpus, admin API (issue 5, part 3): hand-written nasty requests.

Every write route (POST /admin/extensions, PUT/PATCH/DELETE /admin/extensions/{id}, enable,
disable, circuit, invoke, reload) and the read routes get malformed bodies, odd ids, odd query
parameters and odd headers, against `create_app` over a real registry on a real PostgreSQL
(`api_helpers.database_api`: `alpha`, and `beta` disabled; a token per role). The
`EchoInvoker` stands in for NATS so that circuit and invoke run their whole route.

Every case must get a clear 4xx, never a 5xx:

- JSON with a `detail`, short (no multi-megabyte echo of the input);
- 422 whose `loc` names the field when one field is at fault (`["body"]` when the body as a
  whole is: not JSON, not an object), 404 for an id that names no extension (however it is
  spelled), 405 for a method a path does not have, 412 for an `If-Match` that is not the
  record's current tag, 413 for a body over the server's limit, 415 for a body not sent as
  `application/json`, 401 for a bad token;

and must change nothing: the rows of `extensions`, `extension_versions`,
`extension_instances`, `extension_health` and `extension_audit_log`, the registry's records,
the circuits and the invoker's calls are compared before and after each case.

Bodies are decoded as strictly as fixture files: a key given twice, NaN or Infinity, numbers
out of range, text that is not UTF-8, NUL characters and nesting deeper than fixtures allow
(64 levels) are refused naming where. A body over the limit
(`extreg.api.bodylimit.max_body_bytes`: room for an invocation at the payload and metadata
limits) is refused from its `Content-Length` before the route runs, so even routes that
ignore their body (enable, disable, reload) do nothing and nothing more of it is read; a
chunked body is cut off once it passes the limit.

Request bodies that are bytes rather than data live in `tests/corpus/api/` (one file per
case, named for what is wrong, each a record of `alpha` apart from its fault, so that only the
fault can explain the refusal); every file is sent to POST, PUT and PATCH. Each test runs its
cases over one API and reports every failing case at once. The module prints how many cases it
tried.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from api_helpers import Api, EchoInvoker, database_api
from helpers import CaseCounter, record

from extreg.api.bodylimit import max_body_bytes
from extreg.core.model import to_plain

CORPUS = Path(__file__).parent / "corpus" / "api"
ANSWER_LIMIT = 64 * 1024  # a refusal longer than this echoes too much of the input
TEN_MB = 10 * 1024 * 1024
DEEP = 100_000

# -- counting what was tried ------------------------------------------------------------------

COUNTER = CaseCounter(
    "bad-input API corpus",
    [
        "body files",
        "record fields",
        "operation bodies",
        "ids",
        "query parameters",
        "headers",
        "oversize and deep bodies",
    ],
    unit="requests",
)
tried = COUNTER.tried
_print_case_count = COUNTER.fixture()


# -- sending a case and judging the answer ----------------------------------------------------

TABLES = (
    "extensions",
    "extension_versions",
    "extension_instances",
    "extension_health",
    "extension_audit_log",
)
BODY = ["body"]


def state(conn: psycopg.Connection[Any], api: Api) -> dict[str, Any]:
    """Everything a request could change: database rows, cached records, circuits, calls."""
    found: dict[str, Any] = {}
    for table in TABLES:
        row = conn.execute(
            f"SELECT coalesce(jsonb_agg(to_jsonb(t) ORDER BY to_jsonb(t)::text), '[]')::text"
            f" FROM {table} t"
        ).fetchone()
        found[table] = row[0] if row else None
    invoker = api.runtime.invoker
    assert invoker is not None
    found["registry"] = [to_plain(e) for e in api.runtime.registry.all()]
    found["circuits"] = dict(invoker.breaker.states())
    found["calls"] = len(invoker.calls)
    return found


@dataclass
class Probe:
    """Sends cases over one API; `failures` collects every way a case went wrong."""

    api: Api
    conn: psycopg.Connection[Any]
    failures: list[str] = field(default_factory=list)

    async def send(
        self,
        area: str,
        case: str,
        method: str,
        path: str,
        body: Any = None,
        *,
        raw: bytes | None = None,
        headers: dict[str, Any] | None = None,
        content_type: str | None = "application/json",
        role: str | None = "admin",
        expect: tuple[int, ...] = (422,),
        loc: list[Any] | None = None,
        text: str | None = None,
        result: Any = ...,
    ) -> httpx.Response | None:
        """One request; it must answer a status in `expect` (a 422 with an item at `loc`
        whose message holds `text`, a 200 with JSON `result`) and change nothing. A body
        (`body` as JSON, or `raw` bytes) goes with `content_type` unless that is None."""
        tried(area, f"{case} {method} {path[:60]}")
        sent: dict[str, Any] = {}
        if raw is not None:
            sent["content"] = raw
        elif body is not None:
            sent["content"] = json.dumps(body).encode()
        base = {"Content-Type": content_type} if "content" in sent and content_type else {}
        if role is not None:
            base.update(self.api.auth(role))
        before = state(self.conn, self.api)
        label = f"{area} / {case}: {method} {path[:80]}"
        try:
            answer = await self.api.client.request(
                method, path, headers={**base, **(headers or {})}, **sent
            )
        except Exception as exc:  # reported with the other failures
            self.failures.append(f"{label}: the request raised {exc!r}")
            return None
        problems = judge(answer, expect, loc, text, result)
        after = state(self.conn, self.api)
        changed = [key for key in before if before[key] != after[key]]
        if changed:
            problems.append(f"changed {changed}")
        if problems:
            shown = answer.text[:400].replace("\n", " ")
            self.failures.append(f"{label}: {answer.status_code} {'; '.join(problems)} :: {shown}")
        return answer

    def assert_every_case_refused(self) -> None:
        assert not self.failures, f"{len(self.failures)} bad cases:\n" + "\n".join(self.failures)


def judge(
    answer: httpx.Response,
    expect: tuple[int, ...],
    loc: list[Any] | None,
    text: str | None,
    result: Any,
) -> list[str]:
    problems = []
    status = answer.status_code
    if status >= 500:
        problems.append("a server error")
    if status not in expect:
        problems.append(f"status {status}, expected {expect}")
    if len(answer.content) > ANSWER_LIMIT:
        problems.append(f"answer of {len(answer.content)} bytes")
    try:
        data = answer.json()
    except ValueError:
        return [*problems, "answer is not JSON"]
    if status == 200:
        if result is not ... and data != result:
            problems.append(f"answered {str(data)[:200]}, expected {result}")
        return problems
    if not isinstance(data, dict) or "detail" not in data:
        return [*problems, "answer has no detail"]
    if status == 422 and loc is not None:
        items = data["detail"] if isinstance(data["detail"], list) else []
        at = [i for i in items if isinstance(i, dict) and i.get("loc") == loc]
        if not at:
            problems.append(f"no problem at {loc}")
        elif text is not None and not any(text in str(i.get("msg")) for i in at):
            problems.append(f"no problem at {loc} says {text!r}")
    return problems


@pytest.fixture
async def probe(tmp_path: Path, db_url: str) -> AsyncIterator[Probe]:
    """The API over a database registry with `alpha` and `beta`, and a probe sending to it."""
    async with database_api(tmp_path, db_url, invoker=EchoInvoker()) as api:
        with psycopg.connect(db_url, autocommit=True) as conn:
            yield Probe(api, conn)


def alpha_record(**values: Any) -> dict[str, Any]:
    return record("alpha", **values)


# -- body files -------------------------------------------------------------------------------

NOT_JSON = "body is not valid JSON"
NOT_OBJECT = "body must be a JSON object"
NUL = "must not contain NUL characters"
TWICE = "appears twice in one object"

# Every file of tests/corpus/api and what it must produce: (loc, text of the message there).
FILES: dict[str, tuple[list[Any], str]] = {
    # JSON syntax
    "trailing_comma.json": (BODY, NOT_JSON),
    "truncated.json": (BODY, NOT_JSON),
    "single_quotes.json": (BODY, NOT_JSON),
    "unquoted_keys.json": (BODY, NOT_JSON),
    "comment.json": (BODY, NOT_JSON),
    "two_top_level_values.json": (BODY, f"{NOT_JSON}: JSON is malformed: trailing characters"),
    "object_then_garbage.json": (BODY, f"{NOT_JSON}: JSON is malformed: trailing characters"),
    "form_encoded.json": (BODY, NOT_JSON),
    "xml.json": (BODY, NOT_JSON),
    "empty.json": (BODY, NOT_JSON),
    "whitespace_only.json": (BODY, NOT_JSON),
    # numbers JSON cannot hold
    "nan_literal.json": (BODY, NOT_JSON),
    "infinity_in_config.json": (BODY, NOT_JSON),
    "number_out_of_range.json": (BODY, NOT_JSON),
    # encodings and bytes
    "utf8_bom.json": (BODY, NOT_JSON),
    "utf16_with_bom.json": (BODY, NOT_JSON),
    "utf16le_without_bom.json": (BODY, NOT_JSON),
    "invalid_utf8_in_string.json": (BODY, NOT_JSON),
    "invalid_utf8_in_key.json": (BODY, NOT_JSON),
    "overlong_utf8.json": (BODY, NOT_JSON),
    "utf8_encoded_surrogate.json": (BODY, NOT_JSON),
    "latin1_text.json": (BODY, NOT_JSON),
    "lone_surrogate_escape.json": (BODY, NOT_JSON),
    "raw_nul_in_string.json": (BODY, NOT_JSON),
    "raw_control_char_in_string.json": (BODY, NOT_JSON),
    # NUL characters, which PostgreSQL cannot store
    "nul_escape_in_subject.json": (["body", "subject"], NUL),
    "nul_escape_in_config_value.json": (["body", "config", "x"], NUL),
    "nul_escape_in_config_key.json": (["body", "config"], "keys must not contain NUL"),
    "nul_escape_in_version_config.json": (["body", "versions", 0, "config", "x"], NUL),
    # keys given twice (msgspec would keep the last one silently)
    "duplicate_key_top_level.json": (BODY, f"key enabled {TWICE}"),
    "duplicate_key_id.json": (BODY, f"key id {TWICE}"),
    "duplicate_key_in_config.json": (BODY, f"key a {TWICE}"),
    "duplicate_key_in_version.json": (BODY, f"key version {TWICE}"),
    # not an object
    "top_level_array.json": (BODY, NOT_OBJECT),
    "top_level_empty_array.json": (BODY, NOT_OBJECT),
    "top_level_string.json": (BODY, NOT_OBJECT),
    "top_level_number.json": (BODY, NOT_OBJECT),
    "top_level_null.json": (BODY, NOT_OBJECT),
    "top_level_true.json": (BODY, NOT_OBJECT),
}
RECORD_WRITES = [
    ("POST", "/admin/extensions"),
    ("PUT", "/admin/extensions/alpha"),
    ("PATCH", "/admin/extensions/alpha"),
]


def test_corpus_files_are_all_listed() -> None:
    """Every file of tests/corpus/api has its expectation in FILES and every entry its file."""
    assert sorted(FILES) == sorted(p.name for p in CORPUS.iterdir())


async def test_body_files(probe: Probe) -> None:
    """Each corpus file sent as the body of a create, a replace and a patch gets 422 naming
    where it is wrong (the body, or the field holding a NUL) and saying what, and stores
    nothing."""
    for name, (loc, text) in FILES.items():
        raw = (CORPUS / name).read_bytes()
        for method, path in RECORD_WRITES:
            await probe.send("body files", name, method, path, raw=raw, loc=loc, text=text)
    probe.assert_every_case_refused()


# -- wrong field values -----------------------------------------------------------------------

ID_RULE = "must be 1-255 characters"
SUBJECT_RULE = "must be a NATS subject"
VERSION = {"version": "v2", "subject": "a.b"}
INSTANCE = {"instance_id": "i1", "subject": "a.b"}


def deep(depth: int) -> Any:
    value: Any = 1
    for _ in range(depth):
        value = {"a": value}
    return value


# (field, value, loc below "body", text of the message); every top-level field, wrong types
# and wrong values, nested junk in versions and instances, unknown fields.
FIELDS: list[tuple[str, Any, list[Any], str | None]] = [
    ("id", 1, ["id"], "Expected str, got int"),
    ("id", None, ["id"], "Expected str, got null"),
    ("id", True, ["id"], "Expected str, got bool"),
    ("id", [], ["id"], "Expected str, got array"),
    ("id", {}, ["id"], "Expected str, got object"),
    ("id", "", ["id"], "length >= 1"),
    ("id", "a" * 10_000, ["id"], "length <= 255"),
    ("id", "a'; DROP TABLE extensions;--", ["id"], ID_RULE),
    ("id", "alpha' OR '1'='1", ["id"], ID_RULE),
    ("id", "\u0430lpha", ["id"], ID_RULE),  # Cyrillic а
    ("id", "\uff41\uff4c\uff50\uff48\uff41", ["id"], ID_RULE),  # fullwidth
    ("id", "../../etc/passwd", ["id"], ID_RULE),
    ("id", "..", ["id"], ID_RULE),
    ("id", "a\\b", ["id"], ID_RULE),
    ("id", "-rf", ["id"], ID_RULE),
    ("id", "al pha", ["id"], ID_RULE),
    ("id", "al\u200bpha", ["id"], ID_RULE),
    ("id", "alpha\u202e", ["id"], ID_RULE),
    ("id", "\x1b[31malpha", ["id"], ID_RULE),
    ("id", "alpha\n", ["id"], ID_RULE),
    ("id", "alpha\x00", ["id"], None),  # NUL: refused as unstorable or by the id rule
    ("id", "\U0001f642", ["id"], ID_RULE),
    ("type", 1, ["type"], "Expected str, got int"),
    ("type", None, ["type"], "Expected str, got null"),
    ("type", "router", ["type"], "Invalid enum value 'router'"),
    ("type", "PRE", ["type"], "Invalid enum value 'PRE'"),
    ("type", "", ["type"], "Invalid enum value ''"),
    ("type", ["pre"], ["type"], "Expected str, got array"),
    ("subject", 1, ["subject"], "Expected str, got int"),
    ("subject", None, ["subject"], "Expected str, got null"),
    ("subject", "", ["subject"], "length >= 1"),
    ("subject", "a b", ["subject"], SUBJECT_RULE),
    ("subject", "a.*", ["subject"], SUBJECT_RULE),
    ("subject", "a.>", ["subject"], SUBJECT_RULE),
    ("subject", "a..b", ["subject"], SUBJECT_RULE),
    ("subject", "a.b\n", ["subject"], SUBJECT_RULE),
    ("subject", "a.b\x00", ["subject"], NUL),
    ("subject", "x" * 513, ["subject"], "length <= 512"),
    ("subject", ["a.b"], ["subject"], "Expected str, got array"),
    ("timeout_ms", "100", ["timeout_ms"], "Expected int, got str"),
    ("timeout_ms", 1.5, ["timeout_ms"], "Expected int, got float"),
    ("timeout_ms", True, ["timeout_ms"], "Expected int, got bool"),
    ("timeout_ms", None, ["timeout_ms"], "Expected int, got null"),
    ("timeout_ms", 0, ["timeout_ms"], "Expected int >= 1"),
    ("timeout_ms", -1, ["timeout_ms"], "Expected int >= 1"),
    ("timeout_ms", 10**20, ["timeout_ms"], "exceeds extension_max_timeout_ms"),
    ("timeout_ms", -(10**30), ["timeout_ms"], None),
    ("timeout_ms", [100], ["timeout_ms"], "Expected int, got array"),
    ("retry", "1", ["retry"], "Expected int, got str"),
    ("retry", -1, ["retry"], "Expected int >= 0"),
    ("retry", 11, ["retry"], "exceeds extension_max_retries"),
    ("retry", 1.0, ["retry"], "Expected int, got float"),
    ("retry", None, ["retry"], "Expected int, got null"),
    ("enabled", "true", ["enabled"], "Expected bool, got str"),
    ("enabled", 1, ["enabled"], "Expected bool, got int"),
    ("enabled", 0, ["enabled"], "Expected bool, got int"),
    ("enabled", None, ["enabled"], "Expected bool, got null"),
    ("enabled", [], ["enabled"], "Expected bool, got array"),
    ("version", 1, ["version"], "Expected str, got int"),
    ("version", "", ["version"], "length >= 1"),
    ("version", "v" * 33, ["version"], "length <= 32"),
    ("version", None, ["version"], "Expected str, got null"),
    ("config", [], ["config"], "Expected object, got array"),
    ("config", "x", ["config"], "Expected object, got str"),
    ("config", 1, ["config"], "Expected object, got int"),
    ("config", None, ["config"], "Expected object, got null"),
    ("config", {"a": {"b": [{"c": "\x00"}]}}, ["config", "a", "b", 0, "c"], NUL),
    ("config", {"a": {"b": [{"c\x00": 1}]}}, ["config", "a", "b", 0], "keys must not contain NUL"),
    ("config", deep(64), ["config", *["a"] * 64], "nested more than 64 levels deep"),
    ("metadata", [], ["metadata"], "Expected object, got array"),
    ("metadata", "x", ["metadata"], "Expected object, got str"),
    ("metadata", True, ["metadata"], "Expected object, got bool"),
    ("versions", {}, ["versions"], "Expected array, got object"),
    ("versions", "v2", ["versions"], "Expected array, got str"),
    ("versions", [1], ["versions", 0], "Expected object, got int"),
    ("versions", [{}], ["versions", 0, "version"], "required field is missing"),
    ("versions", [{**VERSION, "colour": 1}], ["versions", 0, "colour"], "unknown field"),
    ("versions", [{**VERSION, "subject": "a b"}], ["versions", 0, "subject"], SUBJECT_RULE),
    ("versions", [{**VERSION, "timeout_ms": -1}], ["versions", 0, "timeout_ms"], ">= 1"),
    ("versions", [{**VERSION, "retry": 99}], ["versions", 0, "retry"], "exceeds"),
    (
        "versions",
        [{**VERSION, "routing_rules": {"tenant_id": 1}}],
        ["versions", 0, "routing_rules"],
        "Expected str | array, got int",
    ),
    ("versions", [VERSION, VERSION], ["versions"], "version 'v2' appears twice"),
    ("instances", "i1", ["instances"], "Expected array, got str"),
    ("instances", [{**INSTANCE, "weight": 101}], ["instances", 0, "weight"], "<= 100"),
    ("instances", [{**INSTANCE, "weight": "heavy"}], ["instances", 0, "weight"], "got str"),
    ("instances", [{**INSTANCE, "instance_id": "../i1"}], ["instances", 0, "instance_id"], ID_RULE),
    (
        "instances",
        [{**INSTANCE, "health_status": "sick"}],
        ["instances", 0, "health_status"],
        "Invalid enum value 'sick'",
    ),
    ("instances", [INSTANCE, INSTANCE], ["instances"], "instance_id 'i1' appears twice"),
    ("colour", "blue", ["colour"], "unknown field"),
    ("timeout", 100, ["timeout"], "unknown field"),
    ("__proto__", {"admin": True}, ["__proto__"], "unknown field"),
    ("[/red]", 1, ["[/red]"], "unknown field"),
]


async def test_wrong_field_values(probe: Probe) -> None:
    """A wrong type or value in any field, in a create, a replace and a patch of that field,
    gets 422 whose `loc` names the field (down to the list index and key for nested junk) and
    whose message says what is wrong; nothing is stored."""
    for name, value, where, text in FIELDS:
        case = f"{name}={json.dumps(value)[:40]}"
        loc = ["body", *where]
        await probe.send(
            "record fields",
            case,
            "POST",
            "/admin/extensions",
            record("gamma", **{name: value}),
            loc=loc,
            text=text,
        )
        if name == "id":  # a replace or patch naming another id is refused for that
            text = None
        await probe.send(
            "record fields",
            case,
            "PUT",
            "/admin/extensions/alpha",
            alpha_record(**{name: value}),
            loc=loc,
            text=text,
        )
        await probe.send(
            "record fields",
            case,
            "PATCH",
            "/admin/extensions/alpha",
            {name: value},
            loc=loc,
            text=text,
        )
    probe.assert_every_case_refused()


async def test_missing_fields_and_mismatched_ids(probe: Probe) -> None:
    """A create without its required fields, and a replace or patch whose body names another
    id than its URL, get 422 naming each field; nothing is stored."""
    for missing in ("id", "type", "subject"):
        body = {k: v for k, v in record("gamma").items() if k != missing}
        await probe.send(
            "record fields",
            f"missing {missing}",
            "POST",
            "/admin/extensions",
            body,
            loc=["body", missing],
            text="required field is missing",
        )
    for missing in ("type", "subject"):
        body = {k: v for k, v in alpha_record().items() if k != missing}
        await probe.send(
            "record fields",
            f"missing {missing}",
            "PUT",
            "/admin/extensions/alpha",
            body,
            loc=["body", missing],
            text="required field is missing",
        )
    for method in ("PUT", "PATCH"):
        await probe.send(
            "record fields",
            "other id",
            method,
            "/admin/extensions/alpha",
            record("beta"),
            loc=["body", "id"],
            text="must equal the id in the URL",
        )
    await probe.send(
        "record fields", "existing id", "POST", "/admin/extensions", record("alpha"), expect=(409,)
    )
    probe.assert_every_case_refused()


# -- circuit and invoke bodies ----------------------------------------------------------------

CIRCUIT = "/admin/extensions/alpha/circuit"
INVOKE = "/admin/extensions/alpha/invoke"
ACTION = ["body", "action"]

# (case, path, raw body, expected statuses, loc, text)
OPERATION_BODIES: list[tuple[str, str, bytes, tuple[int, ...], list[Any] | None, str | None]] = [
    ("no action", CIRCUIT, b"{}", (422,), ACTION, "Field required"),
    ("unknown action", CIRCUIT, b'{"action": "explode"}', (422,), ACTION, None),
    ("action in capitals", CIRCUIT, b'{"action": "OPEN"}', (422,), ACTION, None),
    ("action a number", CIRCUIT, b'{"action": 1}', (422,), ACTION, None),
    ("action null", CIRCUIT, b'{"action": null}', (422,), ACTION, None),
    ("action a list", CIRCUIT, b'{"action": ["open"]}', (422,), ACTION, None),
    ("action with NUL", CIRCUIT, b'{"action": "open\\u0000"}', (422,), ACTION, None),
    ("extra field", CIRCUIT, b'{"action": "open", "force": true}', (422,), ["body", "force"], None),
    ("array", CIRCUIT, b'["open"]', (422,), BODY, None),
    ("string", CIRCUIT, b'"open"', (422,), BODY, None),
    ("null", CIRCUIT, b"null", (422,), BODY, None),
    ("invalid JSON", CIRCUIT, b'{"action": open}', (422,), None, None),
    ("truncated", CIRCUIT, b'{"action": "op', (422,), None, None),
    (
        "key twice, bad one first",
        CIRCUIT,
        b'{"action": "bogus", "action": "open"}',
        (422,),
        BODY,
        "key action appears twice",
    ),
    (
        "key twice, good one first",
        CIRCUIT,
        b'{"action": "open", "action": "bogus"}',
        (422,),
        None,
        None,
    ),
    ("NaN", CIRCUIT, b'{"action": NaN}', (422,), None, None),
    ("invalid UTF-8", CIRCUIT, b'{"action": "op\xffen"}', (400, 422), None, None),
    (
        "deep nesting",
        CIRCUIT,
        b'{"action": ' + b"[" * DEEP + b"]" * DEEP + b"}",
        (400, 422),
        None,
        None,
    ),
    ("metadata a list", INVOKE, b'{"metadata": []}', (422,), ["body", "metadata"], None),
    ("metadata a string", INVOKE, b'{"metadata": "x"}', (422,), ["body", "metadata"], None),
    ("tenant_id a number", INVOKE, b'{"tenant_id": 7}', (422,), ["body", "tenant_id"], None),
    (
        "tenant_id too long",
        INVOKE,
        json.dumps({"tenant_id": "t" * 256}).encode(),
        (422,),
        ["body", "tenant_id"],
        None,
    ),
    (
        "trace_id too long",
        INVOKE,
        json.dumps({"trace_id": "t" * 10_000}).encode(),
        (422,),
        ["body", "trace_id"],
        None,
    ),
    ("trace_id an object", INVOKE, b'{"trace_id": {"a": 1}}', (422,), ["body", "trace_id"], None),
    ("unknown field", INVOKE, b'{"payload": {}, "colour": 1}', (422,), ["body", "colour"], None),
    ("array", INVOKE, b"[]", (422,), BODY, None),
    ("number", INVOKE, b"1", (422,), BODY, None),
    ("invalid JSON", INVOKE, b"{payload: 1}", (422,), None, None),
    ("object then garbage", INVOKE, b'{"payload": 1} trailing', (422,), None, None),
    (
        "payload key twice",
        INVOKE,
        b'{"payload": 1, "payload": 2}',
        (422,),
        BODY,
        "key payload appears twice",
    ),
    (
        "key twice deep in the payload",
        INVOKE,
        b'{"payload": {"a": {"b": 1, "b": 2}}}',
        (422,),
        BODY,
        "key b appears twice",
    ),
    ("NaN payload", INVOKE, b'{"payload": NaN}', (422,), BODY, NOT_JSON),
    ("Infinity in payload", INVOKE, b'{"payload": {"x": -Infinity}}', (422,), BODY, NOT_JSON),
    ("payload number out of range", INVOKE, b'{"payload": 1e400}', (422,), BODY, NOT_JSON),
    ("invalid UTF-8 payload", INVOKE, b'{"payload": "\xc3\x28"}', (400, 422), None, None),
    (
        "deep payload",
        INVOKE,
        b'{"payload": ' + b'{"a": ' * DEEP + b"1" + b"}" * DEEP + b"}",
        (400, 422),
        None,
        None,
    ),
]


async def test_circuit_and_invoke_bodies(probe: Probe) -> None:
    """Malformed circuit actions and invocation requests get a 4xx (422 naming the field where
    one is at fault; FastAPI's 400 for a body its JSON parser gives up on): no circuit moves
    and the extension is never called."""
    for case, path, raw, expect, loc, text in OPERATION_BODIES:
        await probe.send(
            "operation bodies",
            case,
            "POST",
            path,
            raw=raw,
            role="operator",
            expect=expect,
            loc=loc,
            text=text,
        )
    probe.assert_every_case_refused()


# -- odd ids ----------------------------------------------------------------------------------

# (case, the id, or None when `segment` is sent in the URL as it is)
ODD_IDS: list[tuple[str, str | None, str]] = [
    ("10k characters", "a" * 10_000, ""),
    ("10k non-ASCII characters", "\u00e9" * 10_000, ""),
    ("SQL", "a'; DROP TABLE extensions;--", ""),
    ("SQL OR", "alpha' OR '1'='1", ""),
    ("SQL comment", "alpha'--", ""),
    ("Cyrillic confusable", "\u0430lpha", ""),
    ("fullwidth", "\uff41\uff4c\uff50\uff48\uff41", ""),
    ("other case", "ALPHA", ""),
    ("NUL", "alpha\x00", ""),
    ("only NUL", "\x00", ""),
    ("encoded traversal", None, "..%2F..%2Fadmin%2Fstatus"),
    ("encoded dot dot", None, "%2E%2E"),
    ("backslash traversal", "..\\..\\etc\\passwd", ""),
    ("trailing space", "alpha ", ""),
    ("trailing newline", "alpha\n", ""),
    ("zero-width space", "al\u200bpha", ""),
    ("bidi override", "alpha\u202e", ""),
    ("terminal escape", "\x1b[31malpha", ""),
    ("emoji", "\U0001f642", ""),
    ("invalid UTF-8 escapes", None, "%ff%fe"),
    ("question mark", "alpha?x=1", ""),
    ("JSON", '{"id": "alpha"}', ""),
]


def segment(ext_id: str | None, raw: str) -> str:
    return urllib.parse.quote(ext_id, safe="") if ext_id is not None else raw


async def test_odd_ids(probe: Probe) -> None:
    """An id that names no extension (huge, SQL, a confusable of `alpha`, NUL, traversal...)
    gets 404 from every route that takes an id (a replace may instead get 422 naming `id`,
    whose rule it breaks): nothing is read, written, opened or called. As an audit filter it
    matches no row: 200 with an empty list."""
    replacement = {"type": "pre", "subject": "a.b"}
    not_found = (404,)
    for case, ext_id, raw in ODD_IDS:
        base = f"/admin/extensions/{segment(ext_id, raw)}"
        await probe.send("ids", case, "GET", base, role="viewer", expect=not_found)
        await probe.send("ids", case, "GET", f"{base}/health", role="viewer", expect=not_found)
        await probe.send(
            "ids", case, "PUT", base, replacement, expect=(404, 422), loc=["body", "id"]
        )
        await probe.send("ids", case, "PATCH", base, {"timeout_ms": 300}, expect=not_found)
        await probe.send("ids", case, "DELETE", base, expect=not_found)
        for action in ("enable", "disable"):
            await probe.send(
                "ids", case, "POST", f"{base}/{action}", role="operator", expect=not_found
            )
        await probe.send(
            "ids",
            case,
            "POST",
            f"{base}/circuit",
            {"action": "open"},
            role="operator",
            expect=not_found,
        )
        await probe.send(
            "ids",
            case,
            "POST",
            f"{base}/invoke",
            {"payload": {}},
            role="operator",
            expect=not_found,
        )
        if ext_id is not None:
            query = urllib.parse.urlencode({"extension_id": ext_id})
            await probe.send(
                "ids", case, "GET", f"/admin/audit?{query}", role="viewer", expect=(200,), result=[]
            )
    probe.assert_every_case_refused()


# -- query parameters, methods and headers ----------------------------------------------------

QUERIES: list[tuple[str, str, list[Any]]] = [
    ("type unknown", "/admin/extensions?type=unknown", ["query", "type"]),
    ("type in capitals", "/admin/extensions?type=PRE", ["query", "type"]),
    ("type empty", "/admin/extensions?type=", ["query", "type"]),
    ("type with NUL", "/admin/extensions?type=pre%00", ["query", "type"]),
    ("type SQL", "/admin/extensions?type=pre'%20OR%20'1'='1", ["query", "type"]),
    ("type huge", "/admin/extensions?type=" + "p" * 10_000, ["query", "type"]),
    ("enabled maybe", "/admin/extensions?enabled=maybe", ["query", "enabled"]),
    ("enabled 2", "/admin/extensions?enabled=2", ["query", "enabled"]),
    ("limit -1", "/admin/audit?limit=-1", ["query", "limit"]),
    ("limit 0", "/admin/audit?limit=0", ["query", "limit"]),
    ("limit 1001", "/admin/audit?limit=1001", ["query", "limit"]),
    ("limit 10^9", "/admin/audit?limit=1000000000", ["query", "limit"]),
    ("limit 10^30", "/admin/audit?limit=" + "1" + "0" * 30, ["query", "limit"]),
    ("limit abc", "/admin/audit?limit=abc", ["query", "limit"]),
    ("limit 1.5", "/admin/audit?limit=1.5", ["query", "limit"]),
    ("limit 1e3", "/admin/audit?limit=1e3", ["query", "limit"]),
    ("limit empty", "/admin/audit?limit=", ["query", "limit"]),
    ("limit NUL", "/admin/audit?limit=1%00", ["query", "limit"]),
    ("limit NaN", "/admin/audit?limit=NaN", ["query", "limit"]),
]

METHODS = [
    ("PATCH", "/admin/extensions"),
    ("DELETE", "/admin/extensions"),
    ("PUT", "/admin/extensions"),
    ("GET", "/admin/reload"),
    ("PUT", "/admin/extensions/alpha/enable"),
    ("GET", "/admin/extensions/alpha/circuit"),
    ("DELETE", "/admin/audit"),
]


async def test_query_parameters_and_methods(probe: Probe) -> None:
    """type=unknown on the list, limit=-1, 0, 10^9, abc... on the audit log get 422 naming the
    parameter; a method a path does not have gets 405."""
    for case, path, loc in QUERIES:
        await probe.send("query parameters", case, "GET", path, role="viewer", loc=loc)
    for method, path in METHODS:
        await probe.send("query parameters", f"{method} {path}", method, path, expect=(405,))
    probe.assert_every_case_refused()


async def test_if_match_values(probe: Probe) -> None:
    """Any If-Match that is not `*` or the record's current tag (garbage, a tag of another
    version, the weak form of the current tag, empty, huge, non-ASCII) gets 412 on replace,
    patch and delete, and the record stays as it was."""
    current = (
        await probe.api.client.get("/admin/extensions/alpha", headers=probe.api.auth("viewer"))
    ).headers["etag"]
    values: list[tuple[str, str | bytes]] = [
        ("garbage", "garbage"),
        ("other tag", '"0123456789abcdef0123456789abcdef"'),
        ("empty tag", '""'),
        ("empty", ""),
        ("commas", ", ,"),
        ("weak current", f"W/{current}"),
        ("unquoted current", current.strip('"')),
        ("current plus junk", current + "x"),
        ("quoted star", '"*"'),
        ("star and junk", "*x"),
        ("10k characters", "x" * 10_000),
        ("non-ASCII", "\u00e9tag".encode("latin-1")),
        ("bytes", b"\xff\xfe"),
        ("SQL", '"\'; DROP TABLE extensions;--"'),
    ]
    writes: list[tuple[str, Any]] = [
        ("PUT", alpha_record(timeout_ms=250)),
        ("PATCH", {"timeout_ms": 300}),
        ("DELETE", None),
    ]
    for case, value in values:
        for method, body in writes:
            await probe.send(
                "headers",
                f"If-Match {case}",
                method,
                "/admin/extensions/alpha",
                body,
                headers={"If-Match": value},
                expect=(412,),
            )
    probe.assert_every_case_refused()


async def test_bad_tokens_and_content_types(probe: Probe) -> None:
    """A malformed Authorization header gets 401; a record, circuit or invoke body sent as
    anything but JSON (text/plain, form data, XML, no Content-Type) gets 415 (or FastAPI's 422
    for the bodies it decodes), even when the bytes are a valid record."""
    for case, value in [
        ("huge token", "Bearer " + "x" * 10_000),
        ("SQL token", "Bearer x'; DROP TABLE extreg_api_tokens;--"),
        ("basic scheme", "Basic YWRtaW46YWRtaW4="),
        ("no scheme", "ada-admin"),
    ]:
        await probe.send(
            "headers",
            case,
            "POST",
            "/admin/extensions",
            record("gamma"),
            role=None,
            headers={"Authorization": value},
            expect=(401,),
        )
    bodies = [
        ("POST", "/admin/extensions", record("gamma"), "admin"),
        ("PUT", "/admin/extensions/alpha", alpha_record(timeout_ms=250), "admin"),
        ("PATCH", "/admin/extensions/alpha", {"timeout_ms": 300}, "admin"),
        ("POST", CIRCUIT, {"action": "open"}, "operator"),
        ("POST", INVOKE, {"payload": {"a": 1}}, "operator"),
    ]
    types: list[str | None] = [
        "text/plain",
        "application/x-www-form-urlencoded",
        "multipart/form-data; boundary=x",
        "application/xml",
        "application/jsonx",
        "json",
        None,
    ]
    for method, path, body, role in bodies:
        for content_type in types:
            await probe.send(
                "headers",
                f"Content-Type {content_type}",
                method,
                path,
                body,
                role=role,
                content_type=content_type,
                expect=(415, 422),
            )
    probe.assert_every_case_refused()


# -- oversize and deep bodies -----------------------------------------------------------------

EVERY_ROUTE_WITH_BODY = [
    ("POST", "/admin/extensions", "admin"),
    ("PUT", "/admin/extensions/alpha", "admin"),
    ("PATCH", "/admin/extensions/alpha", "admin"),
    ("DELETE", "/admin/extensions/alpha", "admin"),
    ("POST", "/admin/extensions/beta/enable", "operator"),
    ("POST", "/admin/extensions/alpha/disable", "operator"),
    ("POST", CIRCUIT, "operator"),
    ("POST", INVOKE, "operator"),
    ("POST", "/admin/reload", "operator"),
    ("GET", "/admin/extensions/alpha", "viewer"),
]


class Counted(httpx.AsyncByteStream):
    """A request body of `size` bytes in 64 KiB chunks, counting how much was read."""

    def __init__(self, size: int, head: bytes = b"") -> None:
        self.size = size
        self.head = head
        self.read = 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        chunk = 64 * 1024
        while self.read < self.size:
            piece = self.head if self.read == 0 and self.head else b" "
            data = (piece + b" " * chunk)[: min(chunk, self.size - self.read)]
            self.read += len(data)
            yield data


async def test_oversize_bodies_are_refused_unread(probe: Probe) -> None:
    """A 10 MB body gets 413 on every route, before the route runs (enable, disable, delete
    and reload, which ignore their body, do nothing either) and without the server reading
    it; a valid record 10 MB long is refused the same way. Sent chunked, without a length, it
    is cut off just past the limit."""
    limit = max_body_bytes(probe.api.runtime.settings)
    assert limit < TEN_MB
    huge_record = json.dumps(record("gamma", config={"blob": "x" * TEN_MB})).encode()
    for method, path, role in EVERY_ROUTE_WITH_BODY:
        stream = Counted(TEN_MB, b'{"id": "gamma", "config": {"x": "')
        await probe.send(
            "oversize and deep bodies",
            "10 MB with a length",
            method,
            path,
            role=role,
            headers={"Content-Length": str(TEN_MB)},
            expect=(413,),
            raw=stream,  # type: ignore[arg-type]
        )
        assert stream.read < limit, (method, path, stream.read)
        await probe.send(
            "oversize and deep bodies",
            "10 MB valid record",
            method,
            path,
            raw=huge_record,
            role=role,
            expect=(413,),
        )
    for method, path, role in [
        *EVERY_ROUTE_WITH_BODY[:3],
        ("POST", CIRCUIT, "operator"),
        ("POST", INVOKE, "operator"),
    ]:
        stream = Counted(TEN_MB)
        await probe.send(
            "oversize and deep bodies",
            "10 MB chunked",
            method,
            path,
            role=role,
            expect=(413,),
            raw=stream,  # type: ignore[arg-type]
        )
        assert stream.read <= limit + 64 * 1024, (method, path, stream.read)
    probe.assert_every_case_refused()


async def test_deep_bodies(probe: Probe) -> None:
    """A body nested 100,000 deep, as a list, an object, or in a record's config, gets 422
    (400 from FastAPI's own parser on circuit and invoke) and no RecursionError reaches the
    client as a 500."""
    bodies = {
        "deep list": b"[" * DEEP + b"]" * DEEP,
        "deep object": b'{"a": ' * DEEP + b"1" + b"}" * DEEP,
        "deep config": json.dumps(record("gamma"))[:-1].encode()
        + b', "config": '
        + b'{"a": ' * DEEP
        + b"1"
        + b"}" * DEEP
        + b"}",
        "1000 deep config": json.dumps(record("gamma"))[:-1].encode()
        + b', "config": '
        + b'{"a": ' * 1000
        + b"1"
        + b"}" * 1000
        + b"}",
    }
    for case, raw in bodies.items():
        for method, path in RECORD_WRITES:
            await probe.send("oversize and deep bodies", case, method, path, raw=raw, loc=None)
        await probe.send(
            "oversize and deep bodies",
            case,
            "POST",
            CIRCUIT,
            raw=raw,
            role="operator",
            expect=(400, 422),
        )
        await probe.send(
            "oversize and deep bodies",
            case,
            "POST",
            INVOKE,
            raw=raw,
            role="operator",
            expect=(400, 422),
        )
    probe.assert_every_case_refused()
