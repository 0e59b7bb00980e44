"""The routing policy record and the rules it obeys.

A policy strings extensions into one pipeline: `pre` items in order, `validators` (run
together), `providers` tried in order, `post` items in order (SPEC.md, "Routing policies and
the pipeline"). Like extensions, policies are msgspec structs and reach the cache through one
validation path whatever their source (API body, fixtures file, database row):

- `parse_policy` checks plain data: fields, types, values, every problem at once with its path
  (`pre[0].mode`), and the depth limits.
- `reference_problems` checks the ids against a set of extensions (the database's, inside the
  write's transaction, or the fixtures folder's): every id must name an extension of its
  stage's type. A `providers` entry with a `:` (`openai:gpt-4.1-mini`) names no extension: the
  caller's provider hook serves it.
- `availability` says which referenced extensions are deleted or disabled *now*, against the
  cache: a policy stays stored when an extension it names goes away, and is reported instead.

Depth counts `pre`, `validators` and `post` items, as the original's limits do: providers are
alternatives (one of them answers), so a longer fallback list adds no depth.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

import msgspec

from ..errors import InvalidRecord
from .model import DATABASE_KEPT, ID_RULE, Actor, Extension, Id, explain, record_name

if TYPE_CHECKING:
    from ..settings import Settings

# A provider extension id, or `name:model` for the caller's hook (`openai:gpt-4.1-mini`).
PROVIDER_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*(:[A-Za-z0-9][A-Za-z0-9_.:/@+-]*)?\Z"
ProviderName = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern=PROVIDER_PATTERN)]
When = dict[str, str | list[str]]
Stage = Literal["pre", "validator", "provider", "post"]

# The original's recommended sizes: beyond them a policy is allowed but warned about.
RECOMMENDED = {"depth": 4, "pre": 2, "validators": 2, "post": 2}


class StepItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A `pre` or `post` item. `mode`: `required` (an error fails the run) or `optional`."""

    id: Id
    mode: Literal["required", "optional"] = "required"
    config: dict[str, Any] = {}
    when: When = {}


class ValidatorItem(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """A validator item. `on_fail`: `block` (fail closed), `warn` (log, go on), `ignore`."""

    id: Id
    on_fail: Literal["block", "warn", "ignore"] = "block"
    config: dict[str, Any] = {}
    when: When = {}


class Policy(msgspec.Struct, frozen=True, forbid_unknown_fields=True, gc=False):
    """One routing policy. `tenant_id` fills the context of a run that names no tenant."""

    policy_id: Id
    tenant_id: str | None = None
    enabled: bool = True
    pre: tuple[StepItem, ...] = ()
    validators: tuple[ValidatorItem, ...] = ()
    providers: tuple[ProviderName, ...] = ()
    post: tuple[StepItem, ...] = ()
    created_at: datetime | None = None
    updated_at: datetime | None = None
    created_by: Actor | None = None
    updated_by: Actor | None = None


POLICY_KEPT = DATABASE_KEPT  # the stamps the database keeps, as for extensions
POLICY_FIELDS = {f.name: f for f in msgspec.structs.fields(Policy)}
WRITABLE_POLICY_FIELDS = tuple(n for n in POLICY_FIELDS if n not in POLICY_KEPT)
BODY_FIELDS = ("pre", "validators", "providers", "post")  # the `body` column of the table
# The extension type each stage's ids must have.
STAGE_TYPES = {"pre": "pre", "validators": "validator", "post": "post", "providers": "provider"}
_ITEM_TYPES: dict[str, type[StepItem | ValidatorItem]] = {
    "pre": StepItem,
    "validators": ValidatorItem,
    "post": StepItem,
}


@dataclass(frozen=True, slots=True)
class PolicyLimits:
    """The depth limits a policy is checked under (from `Settings`)."""

    max_depth: int = 10
    max_pre: int = 5
    max_validators: int = 5
    max_post: int = 5

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicyLimits:
        return cls(
            max_depth=settings.extension_max_pipeline_depth,
            max_pre=settings.extension_max_pre_count,
            max_validators=settings.extension_max_validators_count,
            max_post=settings.extension_max_post_count,
        )


def parse_policy(data: object, *, limits: PolicyLimits, label: str | None = None) -> Policy:
    """Validate one policy from plain data; `InvalidRecord` (kind "policy") listing every
    problem with its field path. The references are checked apart (`reference_problems`)."""
    record = label or record_name(data, "policy_id", "policy")
    try:
        policy = msgspec.convert(data, type=Policy)
    except msgspec.ValidationError as exc:
        problems = _every_problem(data) or [explain(str(exc))]
        raise InvalidRecord(record, problems, kind="policy") from None
    problems = depth_problems(policy, limits)
    if problems:
        raise InvalidRecord(record, problems, kind="policy")
    return policy


def depth_problems(policy: Policy, limits: PolicyLimits) -> list[tuple[str, str]]:
    """`(field, message)` for each depth limit the policy breaks."""
    problems = []
    for stage, most, key in (
        ("pre", limits.max_pre, "extension_max_pre_count"),
        ("validators", limits.max_validators, "extension_max_validators_count"),
        ("post", limits.max_post, "extension_max_post_count"),
    ):
        count = len(getattr(policy, stage))
        if count > most:
            problems.append((stage, f"{count} items exceed {key} {most}"))
    depth = pipeline_depth(policy)
    if depth > limits.max_depth:
        problems.append(
            (
                "policy",
                f"{depth} pre, validator and post items exceed "
                f"extension_max_pipeline_depth {limits.max_depth}",
            )
        )
    return problems


def pipeline_depth(policy: Policy) -> int:
    return len(policy.pre) + len(policy.validators) + len(policy.post)


def complexity_warnings(policy: Policy) -> list[str]:
    """The original's complexity warnings (allowed, but longer than recommended), and what
    is allowed but does nothing: `post` items in a policy without providers, which ends
    after its validators."""
    warnings = []
    depth = pipeline_depth(policy)
    if depth > RECOMMENDED["depth"]:
        warnings.append(
            f"{depth} pre, validator and post items: more than the recommended"
            f" {RECOMMENDED['depth']} adds latency to every message"
        )
    for stage in ("pre", "validators", "post"):
        count = len(getattr(policy, stage))
        if count > RECOMMENDED[stage]:
            warnings.append(
                f"{stage}: {count} items, more than the recommended {RECOMMENDED[stage]}"
            )
    if policy.post and not policy.providers:
        warnings.append(POST_WITHOUT_PROVIDERS)
    return warnings


POST_WITHOUT_PROVIDERS = (
    "post: never runs, the policy has no providers (a run ends after its validators)"
)


def references(policy: Policy) -> list[tuple[str, str, str]]:
    """`(field, extension id, stage key)` for every extension the policy names, in order;
    hook providers (`name:model`) name none."""
    refs = [
        (f"{stage}[{i}].id", item.id, stage)
        for stage in ("pre", "validators")
        for i, item in enumerate(getattr(policy, stage))
    ]
    refs += [
        (f"providers[{i}]", p, "providers") for i, p in enumerate(policy.providers) if ":" not in p
    ]
    refs += [(f"post[{i}].id", item.id, "post") for i, item in enumerate(policy.post)]
    return refs


def reference_problems(policy: Policy, types: Mapping[str, str]) -> list[tuple[str, str]]:
    """`(field, message)` for each id that names no extension, or one of another type.
    `types` maps the extension ids that exist to their types."""
    problems = []
    for field, ext_id, stage in references(policy):
        wanted = STAGE_TYPES[stage]
        found = types.get(ext_id)
        if found is None:
            problems.append((field, f"no extension {ext_id!r}"))
        elif found != wanted:
            problems.append((field, f"extension {ext_id!r} is a {found} extension, not a {wanted}"))
    return problems


def availability(policy: Policy, extensions: Mapping[str, Extension]) -> list[str]:
    """What stops the policy from running as written, now: each referenced extension that is
    deleted, disabled or of another type in `extensions` (the cache). Empty when all is well."""
    problems = []
    for field, ext_id, stage in references(policy):
        ext = extensions.get(ext_id)
        if ext is None:
            problems.append(f"{field}: extension {ext_id!r} does not exist")
        elif ext.type != STAGE_TYPES[stage]:
            problems.append(f"{field}: extension {ext_id!r} is now a {ext.type} extension")
        elif not ext.enabled:
            problems.append(f"{field}: extension {ext_id!r} is disabled")
    return problems


def policy_to_plain(policy: Policy, *, writable_only: bool = False) -> dict[str, Any]:
    """The policy as JSON-ready data; `writable_only` drops the database-kept stamps."""
    data: dict[str, Any] = msgspec.to_builtins(policy)
    if writable_only:
        data = {k: data[k] for k in WRITABLE_POLICY_FIELDS}
    return data


def _every_problem(data: object) -> list[tuple[str, str]]:
    """Every problem of a policy that failed conversion, item by item (msgspec stops at the
    first)."""
    problems = _struct_problems(data, Policy, "")
    if isinstance(data, dict):
        for key, item_type in _ITEM_TYPES.items():
            items = data.get(key)
            if isinstance(items, list):
                for index, item in enumerate(items):
                    problems += _struct_problems(item, item_type, f"{key}[{index}]")
    return [_readable(p) for p in problems]


def _struct_problems(
    data: object, struct: type[msgspec.Struct], where: str
) -> list[tuple[str, str]]:
    """Unknown, missing and ill-typed fields of one object (items of item lists apart)."""
    if not isinstance(data, dict):
        try:
            msgspec.convert(data, type=struct)
        except msgspec.ValidationError as exc:
            return [explain(str(exc), where)]
        return []
    fields = {f.name: f for f in msgspec.structs.fields(struct)}
    prefix = f"{where}." if where else ""
    problems = [(f"{prefix}{key}", "unknown field") for key in data if key not in fields]
    problems += [
        (f"{prefix}{name}", "required field is missing")
        for name, info in fields.items()
        if info.required and name not in data
    ]
    for key, value in data.items():
        if key not in fields or (
            struct is Policy and key in _ITEM_TYPES and isinstance(value, list)
        ):
            continue
        try:
            msgspec.convert(value, type=fields[key].type)
        except msgspec.ValidationError as exc:
            problems.append(explain(str(exc), f"{prefix}{key}"))
    return problems


_CHOICES = {"mode": ("required", "optional"), "on_fail": ("block", "warn", "ignore")}


def _readable(problem: tuple[str, str]) -> tuple[str, str]:
    field, message = problem
    leaf = field.rsplit(".", 1)[-1]
    if message.startswith("Invalid enum value") and leaf in _CHOICES:
        return field, f"must be one of {', '.join(_CHOICES[leaf])} ({message.split(' ', 3)[3]})"
    if "matching regex" not in message:
        return problem
    if field.startswith("providers"):
        return field, (
            "must be a provider extension id, or name:model for the provider hook"
            " (letters, digits, _ - . and no spaces)"
        )
    if field.endswith("id") or field == "policy_id":
        return field, ID_RULE
    return problem
