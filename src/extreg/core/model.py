"""The extension record, its versions and instances, and the rules they obey.

Records are msgspec structs: they decode and validate in C (a full load of 10,000 records is
dominated by PostgreSQL, not by us) and take about half the memory of an equivalent pydantic
model. The same rules guard every way in: `parse_extension` for plain data (fixtures, API
bodies, import) and `record_problems` for records decoded by msgspec straight from
PostgreSQL, which `parse_extension` runs too, so a rule is written once. That includes the
per-extension overrides in `metadata` (circuit breaker settings, size limits) and a version's
rollout keys (`percent`, `hash_on`): a record whose overrides or rules cannot be used is refused
when it is written or read, not discovered at call time.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec

from ..errors import InvalidRecord
from .breaker import breaker_override_problems

ExtensionType = Literal["pre", "validator", "post", "provider"]
TYPES: tuple[str, ...] = ("pre", "validator", "post", "provider")
HealthStatus = Literal["healthy", "degraded", "unhealthy", "unknown"]

# \Z, not $: `$` also matches before a trailing newline.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*\Z"
SUBJECT_PATTERN = r"^[^\s.*>\x00-\x1f\x7f]+(\.[^\s.*>\x00-\x1f\x7f]+)*\Z"

Id = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=ID_PATTERN)]
Subject = Annotated[str, msgspec.Meta(min_length=1, max_length=512, pattern=SUBJECT_PATTERN)]
VersionName = Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
TimeoutMs = Annotated[int, msgspec.Meta(gt=0)]
Retry = Annotated[int, msgspec.Meta(ge=0)]
Weight = Annotated[int, msgspec.Meta(ge=0, le=100)]
Actor = Annotated[str, msgspec.Meta(max_length=255)]
# A rule value: a string (equality), a list of strings (one of them), or a number, which only
# `percent` takes (`rules_problems` says so for any other key).
RuleValue = str | list[str] | int | float

# The rule keys of a percentage rollout (`extreg.core.routing.Rollout`): every other key of a
# version's `routing_rules` is matched against the context.
PERCENT = "percent"
HASH_ON = "hash_on"
ROLLOUT_KEYS = frozenset((PERCENT, HASH_ON))

# Metadata overrides of the size limits and of the bulkhead (calls in flight on one node).
LIMIT_KEYS = ("max_payload_size", "max_metadata_size", "max_concurrency")
_PREFIX_LENGTH = len("circuit_breaker")  # every override key starts with one of these:
_OVERRIDE_PREFIXES = frozenset(k[:_PREFIX_LENGTH] for k in ("circuit_breaker", *LIMIT_KEYS))

# What a failed pattern means, in words, for error messages.
ID_RULE = "must be 1-255 characters of a-z A-Z 0-9 _ - . and start with a letter or digit"
_RULES = {
    "id": ID_RULE,
    "instance_id": ID_RULE,
    "subject": "must be a NATS subject: dot-separated non-empty tokens, at most 512 characters, "
    "no whitespace and no wildcards (* or >)",
}


class Version(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A row of `extension_versions`: an alternative target chosen by `routing_rules`."""

    version: VersionName
    subject: Subject
    timeout_ms: TimeoutMs = 5000
    retry: Retry = 0
    config: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    routing_rules: dict[str, RuleValue] = {}
    enabled: bool = True
    created_at: datetime | None = None
    created_by: Actor | None = None


class Instance(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A row of `extension_instances`: one of several subjects serving the same extension."""

    instance_id: Id
    subject: Subject
    weight: Weight = 100
    enabled: bool = True
    health_status: HealthStatus = "unknown"


class Extension(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One extension as the router sees it. `created_*`/`updated_*` are kept by the database."""

    id: Id
    type: ExtensionType
    subject: Subject
    timeout_ms: TimeoutMs = 5000
    retry: Retry = 0
    enabled: bool = True
    version: VersionName = "v1"
    config: dict[str, Any] = {}
    metadata: dict[str, Any] = {}
    versions: tuple[Version, ...] = ()
    instances: tuple[Instance, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: Actor | None = None
    updated_by: Actor | None = None


# The stamps the database keeps (who made and last changed a record, and when): never
# written by a user, left out of exports and imports. Versions carry the `created_*` pair.
DATABASE_KEPT = ("created_at", "updated_at", "created_by", "updated_by")
# Fields a user may write: every other field of the record, in the record's order.
WRITABLE_FIELDS = tuple(
    f.name for f in msgspec.structs.fields(Extension) if f.name not in DATABASE_KEPT
)


def parse_extension(
    data: object,
    *,
    max_timeout_ms: int,
    max_retries: int,
    label: str | None = None,
) -> Extension:
    """Validate one record from plain data; raise `InvalidRecord` naming the record and field."""
    record = label or record_name(data)
    try:
        ext = msgspec.convert(data, type=Extension)
    except msgspec.ValidationError as exc:
        problems = _every_problem(data) or [explain(str(exc))]
        problems += _raw_limit_problems(data, max_timeout_ms, max_retries)
        raise InvalidRecord(record, problems) from None
    problems = record_problems(ext, max_timeout_ms=max_timeout_ms, max_retries=max_retries)
    if problems:
        raise InvalidRecord(record, problems)
    return ext


def record_problems(
    ext: Extension, *, max_timeout_ms: int, max_retries: int
) -> list[tuple[str, str]]:
    """`(field, message)` for every rule a well-typed record breaks beyond its types: the
    configured limits, names that appear twice, unusable metadata overrides and routing rules."""
    if _plainly_fine(ext, max_timeout_ms, max_retries):
        return []
    problems = _limit_problems(ext, max_timeout_ms, max_retries)
    problems += [
        (f"versions[{i}].routing_rules{below}", message)
        for i, v in enumerate(ext.versions)
        for below, message in rules_problems(v.routing_rules)
    ]
    if ext.metadata:
        problems += breaker_override_problems(ext.metadata) + limit_problems(ext.metadata)
    return problems


def _plainly_fine(ext: Extension, max_timeout_ms: int, max_retries: int) -> bool:
    """The common case decided without building anything (a full load checks every row):
    within the limits, no name twice, no override in `metadata`, usable routing rules."""
    if ext.timeout_ms > max_timeout_ms or ext.retry > max_retries:
        return False
    if ext.metadata and not _OVERRIDE_PREFIXES.isdisjoint(_prefixes(ext.metadata)):
        return False
    if ext.versions and not (
        all(v.timeout_ms <= max_timeout_ms and v.retry <= max_retries for v in ext.versions)
        and len({v.version for v in ext.versions}) == len(ext.versions)
        and not any(rules_problems(v.routing_rules) for v in ext.versions)
    ):
        return False
    return (
        len({i.instance_id for i in ext.instances}) == len(ext.instances) if ext.instances else True
    )


def _prefixes(metadata: dict[str, Any]) -> set[str]:
    """The keys of `metadata` cut to the length of an override prefix."""
    return {str(key)[:_PREFIX_LENGTH] for key in metadata}


def limit_problems(metadata: dict[str, Any]) -> list[tuple[str, str]]:
    """`(field, message)` for each size-limit override in `metadata` that cannot be used."""
    problems = []
    for key in LIMIT_KEYS:
        value = metadata.get(key)
        if value is not None and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1
        ):
            problems.append((f"metadata.{key}", f"must be a positive integer (got {value!r})"))
    return problems


def rules_problems(rules: dict[str, Any]) -> list[tuple[str, str]]:
    """`(where below routing_rules, message)` for what the types of a version's rules let
    through but routing cannot use: `percent` a number from 0 to 100 (fractions allowed),
    `hash_on` a non-empty string and only beside `percent` (alone it would silently do
    nothing), and a number under any other key (a context value is matched as text)."""
    problems = []
    for key, value in rules.items():
        if key == PERCENT:
            if not _is_number(value) or not 0 <= value <= 100:
                problems.append((".percent", f"must be a number from 0 to 100 (got {value!r})"))
        elif key == HASH_ON:
            if not isinstance(value, str) or not value:
                problems.append((".hash_on", f"must be a non-empty string (got {value!r})"))
            elif PERCENT not in rules:
                problems.append(
                    (".hash_on", "needs percent: it names the context key percent is drawn on")
                )
        elif not isinstance(value, str | list):
            # The wording msgspec used when no number was allowed at all, with the key named.
            kind = type(value).__name__
            only = f"a number only goes under {PERCENT!r}"
            problems.append(("", f"{key!r}: Expected str | array, got {kind} ({only})"))
    return problems


def _is_number(value: object) -> bool:
    """An int or a float, never a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


_FIELDS = {f.name: f for f in msgspec.structs.fields(Extension)}


def _every_problem(data: object) -> list[tuple[str, str]]:
    """Check a record field by field, since msgspec stops at the first problem."""
    if not isinstance(data, dict):
        return []
    problems = [(str(key), "unknown field") for key in data if key not in _FIELDS]
    problems += [
        (name, "required field is missing")
        for name, info in _FIELDS.items()
        if info.required and name not in data
    ]
    for key, value in data.items():
        if key in _FIELDS:
            try:
                msgspec.convert(value, type=_FIELDS[key].type)
            except msgspec.ValidationError as exc:
                problems.append(explain(str(exc), key))
    return problems


def to_plain(ext: Extension, *, writable_only: bool = False) -> dict[str, Any]:
    """The record as JSON-ready data; `writable_only` drops database-kept fields (for export)."""
    data: dict[str, Any] = msgspec.to_builtins(ext)
    if writable_only:
        data = {k: data[k] for k in WRITABLE_FIELDS}
        for version in data["versions"]:
            for key in DATABASE_KEPT:
                version.pop(key, None)
    return data


def _over_limits(
    prefix: str, timeout_ms: object, retry: object, max_timeout_ms: int, max_retries: int
) -> list[tuple[str, str]]:
    problems = []
    if isinstance(timeout_ms, int) and timeout_ms > max_timeout_ms:
        problems.append(
            (
                prefix + "timeout_ms",
                f"{timeout_ms} exceeds extension_max_timeout_ms {max_timeout_ms}",
            )
        )
    if isinstance(retry, int) and retry > max_retries:
        problems.append((prefix + "retry", f"{retry} exceeds extension_max_retries {max_retries}"))
    return problems


def _raw_limit_problems(
    data: object, max_timeout_ms: int, max_retries: int
) -> list[tuple[str, str]]:
    """The limits of the top-level fields, for a record that failed conversion."""
    if not isinstance(data, dict):
        return []
    return _over_limits("", data.get("timeout_ms"), data.get("retry"), max_timeout_ms, max_retries)


def _limit_problems(ext: Extension, max_timeout_ms: int, max_retries: int) -> list[tuple[str, str]]:
    targets: list[tuple[str, int, int]] = [("", ext.timeout_ms, ext.retry)]
    targets += [(f"versions[{i}].", v.timeout_ms, v.retry) for i, v in enumerate(ext.versions)]
    problems = []
    for prefix, timeout_ms, retry in targets:
        problems += _over_limits(prefix, timeout_ms, retry, max_timeout_ms, max_retries)
    for kind, names in (
        ("version", [v.version for v in ext.versions]),
        ("instance_id", [i.instance_id for i in ext.instances]),
    ):
        seen: set[str] = set()
        for name in names:
            if name in seen:
                field = "versions" if kind == "version" else "instances"
                problems.append((field, f"{kind} {name!r} appears twice"))
            seen.add(name)
    return problems


def record_name(data: object, key: str = "id", noun: str = "record") -> str:
    """What to call a record in an error: its id, or a placeholder when it has none."""
    if isinstance(data, dict):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return f"<{noun} without {key}>"


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def explain(message: str, field: str = "") -> tuple[str, str]:
    """Turn msgspec's 'Expected ... - at `$.x`' into (field path, readable message).

    `field` is the field that was converted on its own, if any; msgspec's path is below it.
    """
    match = _AT.search(message)
    below = match.group("path") if match else ""
    path = (field + below if below.startswith("[") or not field else f"{field}{below}").lstrip(".")
    text = message[: match.start()] if match else message
    if text.startswith(("Object contains unknown field", "Object missing required field")):
        name = text.split("`")[1]
        problem = "unknown field" if "unknown" in text else "required field is missing"
        return (f"{path}.{name}" if path else name), problem
    leaf = re.sub(r"\[\d+\]", "", path).rsplit(".", 1)[-1]
    if "matching regex" in text and leaf in _RULES:
        return path, _RULES[leaf]
    if text.startswith("Expected `object`, got") and not path:
        return "record", text.replace("`object`", "a JSON object")
    return path or "record", text.replace("`", "")
