"""Request bodies of record writes: decoded strictly, checked by the same `parse_extension`
as fixtures and database rows, and described in OpenAPI from the same msgspec structs.

Bodies are read by hand rather than declared as a pydantic model so that exactly one set of
rules (the model's) decides what is valid. Two things PostgreSQL cannot store are refused
here with the field named: NUL characters and non-finite numbers.

Every JSON body (records here; circuit and invoke through `strict_body`) is decoded as
strictly as a fixture file: it must be sent as `application/json` (415 otherwise), be UTF-8
JSON without NaN, Infinity or out-of-range numbers, give no key twice in one object, and nest
at most `MAX_DEPTH` levels (422 otherwise, never a RecursionError).
"""

from __future__ import annotations

import copy
import math
from typing import Any

import msgspec
from fastapi import HTTPException, Request

from ..adapters.fixtures import MAX_DEPTH
from ..core import strictjson
from ..core.model import DATABASE_KEPT, Extension, parse_extension
from ..core.policy import POLICY_KEPT, Policy, PolicyLimits, parse_policy
from ..errors import InvalidRecord, StrictJSONError, printable
from ..settings import Settings


async def json_object(request: Request, label: str) -> dict[str, Any]:
    """The body as a JSON object, or `InvalidRecord` (422) saying why not."""
    require_json(request)
    data = decode_strict(await request.body(), label)
    if not isinstance(data, dict):
        raise InvalidRecord(label, [("record", "body must be a JSON object")])
    problems = list(_unstorable(data, ""))
    if problems:
        raise InvalidRecord(label, problems)
    return {k: v for k, v in data.items() if k not in DATABASE_KEPT}  # kept by the database


async def strict_body(request: Request) -> None:
    """Route dependency for bodies FastAPI decodes itself (pydantic models): JSON as strict
    as record bodies (NUL characters and deep nesting aside: these bodies are not stored),
    checked before the model sees the body."""
    body = await request.body()
    if body:
        require_json(request)
        decode_strict(body, "request")


def require_json(request: Request) -> None:
    """415 unless the body is declared JSON (`application/json` or `application/*+json`)."""
    declared = request.headers.get("content-type", "")
    media = declared.split(";", 1)[0].strip().lower()
    if media != "application/json" and not (
        media.startswith("application/") and media.endswith("+json")
    ):
        shown = printable(declared, 60) if declared else "none"
        raise HTTPException(
            415, f"the body must be sent as Content-Type: application/json (got {shown})"
        )


def decode_strict(body: bytes, label: str) -> Any:
    """Strict JSON (see the module docstring), or `InvalidRecord` (422) saying why not."""
    try:
        return strictjson.loads(body)
    except StrictJSONError as exc:
        raise InvalidRecord(label, [("record", f"body is not valid JSON: {exc}")]) from None


def record(data: dict[str, Any], settings: Settings, label: str) -> Extension:
    """Validate a whole record with the model's rules (422 naming the field on failure)."""
    return parse_extension(
        data,
        max_timeout_ms=settings.extension_max_timeout_ms,
        max_retries=settings.extension_max_retries,
        label=label,
    )


def policy_record(data: dict[str, Any], settings: Settings, label: str) -> Policy:
    """Validate a whole policy with the policy rules and the configured depth limits (422
    naming the field and the item, `pre[0].mode`, on failure). Its ids are checked against
    the extensions by the write itself, inside its transaction."""
    return parse_policy(data, limits=PolicyLimits.from_settings(settings), label=label)


# Keys the server adds to the policies it answers with (a write's `warnings`, the list's
# `unusable` and `recent_runs`): dropped from a body like the database-kept stamps, so what
# one request answered can be sent back as is.
POLICY_SERVED = ("warnings", "unusable", "recent_runs")


def policy_body(data: dict[str, Any]) -> dict[str, Any]:
    """A policy body without the keys the server keeps or adds (`POLICY_KEPT`,
    `POLICY_SERVED`)."""
    return {k: v for k, v in data.items() if k not in POLICY_KEPT and k not in POLICY_SERVED}


def same_policy_id(data: dict[str, Any], policy_id: str) -> dict[str, Any]:
    """The body with the path's policy id; 422 when the body names another one."""
    if "policy_id" in data and data["policy_id"] != policy_id:
        problem = ("policy_id", "must equal the id in the URL (ids cannot change)")
        raise InvalidRecord(policy_id, [problem], kind="policy")
    return {**data, "policy_id": policy_id}


def same_id(data: dict[str, Any], extension_id: str) -> dict[str, Any]:
    """The body with the path's id; 422 when the body names another one."""
    if "id" in data and data["id"] != extension_id:
        problem = ("id", "must equal the id in the URL (ids cannot change)")
        raise InvalidRecord(extension_id, [problem])
    return {**data, "id": extension_id}


def _unstorable(value: Any, path: str, depth: int = 0) -> list[tuple[str, str]]:
    if depth > MAX_DEPTH:
        return [(path or "record", f"nested more than {MAX_DEPTH} levels deep")]
    if isinstance(value, str):
        return [(path or "record", "must not contain NUL characters")] if "\x00" in value else []
    if isinstance(value, float) and not math.isfinite(value):
        return [(path or "record", "must be a finite number")]
    if isinstance(value, dict):
        found = []
        for key, item in value.items():
            where = f"{path}.{key}" if path else str(key)
            if "\x00" in str(key):
                found.append((path or "record", "keys must not contain NUL characters"))
            found += _unstorable(item, where, depth + 1)
        return found
    if isinstance(value, list):
        return [
            p for i, item in enumerate(value) for p in _unstorable(item, f"{path}[{i}]", depth + 1)
        ]
    return []


# -- OpenAPI ----------------------------------------------------------------------------------

_REF = "#/components/schemas/{name}"


def schema_components() -> dict[str, Any]:
    """Components for `Extension` and `Policy` (as served) and their write variants, from the
    msgspec structs."""
    _, generated = msgspec.json.schema_components([Extension, Policy], ref_template=_REF)
    components: dict[str, Any] = msgspec.json.decode(msgspec.json.encode(generated))  # plain JSON
    return {
        **components,
        **_write_variants(
            components["Extension"],
            "Extension",
            DATABASE_KEPT,
            required=["type", "subject"],
            new="A new extension record.",
            whole="The whole record; `id`, when given, must equal the URL's.",
        ),
        **_write_variants(
            components["Policy"],
            "Policy",
            POLICY_KEPT,
            required=[],
            new="A new routing policy; its extension ids must name extensions of their stage's"
            " type.",
            whole="The whole policy; `policy_id`, when given, must equal the URL's.",
        ),
        "PolicyWritten": _served(
            components["Policy"],
            "PolicyWritten",
            "The policy as stored, and the complexity warnings it earned (allowed, but longer "
            "than recommended).",
            warnings={"type": "array", "items": {"type": "string"}},
        ),
        "PolicyListed": _served(
            components["Policy"],
            "PolicyListed",
            "A cached policy (listed, or read by id), with what stops it from running as "
            "written (`unusable`: extensions it names that are gone or disabled) and this "
            "server's recent runs.",
            unusable={"type": "array", "items": {"type": "string"}},
            recent_runs={"type": "object"},
        ),
        "PolicyRun": {
            "title": "PolicyRun",
            "description": "A run's input: the message and the context (trace_id, tenant_id, "
            "and the keys `when` conditions match).",
            "type": "object",
            "properties": {"message": {"type": "object"}, "context": {"type": "object"}},
            "additionalProperties": False,
        },
    }


def _write_variants(
    served: dict[str, Any],
    name: str,
    kept: tuple[str, ...],
    *,
    required: list[str],
    new: str,
    whole: str,
) -> dict[str, Any]:
    """`{name}Create`, `{name}Replace` and `{name}Patch`: the served record without the
    database-kept stamps; the replace and patch bodies without defaults or required id."""
    writable = copy.deepcopy(served)
    for key in kept:
        writable["properties"].pop(key, None)
    create = {**writable, "title": f"{name}Create", "description": new}
    replace = {
        **copy.deepcopy(writable),
        "title": f"{name}Replace",
        "description": whole,
        "required": required,
    }
    patch = {
        **copy.deepcopy(writable),
        "title": f"{name}Patch",
        "description": "The fields to change; the rest stay as they are.",
        "required": [],
    }
    for variant in (replace, patch):
        for spec in variant["properties"].values():
            spec.pop("default", None)
    return {f"{name}Create": create, f"{name}Replace": replace, f"{name}Patch": patch}


def _served(
    record: dict[str, Any], title: str, description: str, **extra: dict[str, Any]
) -> dict[str, Any]:
    served = copy.deepcopy(record)
    served["properties"].update(extra)
    return {**served, "title": title, "description": description}


def request_body(name: str) -> dict[str, Any]:
    """`openapi_extra` declaring a JSON body of component `name`."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": _REF.format(name=name)}}},
        }
    }


def json_response(name: str, description: str, *, array: bool = False) -> dict[str, Any]:
    ref: dict[str, Any] = {"$ref": _REF.format(name=name)}
    schema = {"type": "array", "items": ref} if array else ref
    return {"description": description, "content": {"application/json": {"schema": schema}}}
