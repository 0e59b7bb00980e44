"""SQL for `routing_policies`: reading rows into `Policy` structs and writing one policy.

The write path itself (transaction, locks, `change(current)`, dry run) is `PostgresSource`'s,
shared with extensions; this module supplies what is particular to the policy table. Rows are
rendered as one JSON document per read, like extensions, and every row goes through
`parse_policy`, the one validation path of policies: a row broken by plain SQL (a body that
does not parse, an item over the depth limits) is left out and reported, not served.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import msgspec
import psycopg
import structlog
from psycopg.types.json import Jsonb

from ..core.policy import (
    BODY_FIELDS,
    Policy,
    PolicyLimits,
    parse_policy,
    policy_to_plain,
    reference_problems,
    references,
)
from ..errors import InvalidRecord

if TYPE_CHECKING:
    from .postgres import Outcome

log = structlog.get_logger("extreg.postgres")

LOCK_CLASS = 0x65787402  # advisory lock class of policy writes (all classes: postgres.py)
PREFIX = "policy:"  # of a policy's key in notifications, row versions and the invalid report

_ROWS = """
SELECT coalesce(json_agg(json_build_object(
           'policy_id', policy_id, 'tenant_id', tenant_id, 'enabled', enabled, 'body', body,
           'created_at', created_at, 'updated_at', updated_at,
           'created_by', created_by, 'updated_by', updated_by) ORDER BY policy_id), '[]')::text
FROM routing_policies
"""
ALL = _ROWS
BY_IDS = _ROWS + " WHERE policy_id = ANY(%(ids)s)"
LOCK_ROWS = (
    "SELECT 1 FROM routing_policies WHERE policy_id = ANY(%(ids)s) ORDER BY policy_id FOR UPDATE"
)
ROW_VERSIONS = f"SELECT '{PREFIX}' || policy_id, xmin::text FROM routing_policies"
# No row lock: an extension deleted or retyped by a write that commits after this read leaves
# what that write would leave had it come right after the policy's, a stored policy the cache
# reports unusable. Share locks taken policy by policy could deadlock with a bulk extension
# write locking the same rows in id order.
_EXTENSION_TYPES = "SELECT id, type FROM extensions WHERE id = ANY(%s)"
_UPSERT = """
INSERT INTO routing_policies (policy_id, tenant_id, enabled, body) VALUES (%s, %s, %s, %s)
ON CONFLICT (policy_id) DO UPDATE
    SET tenant_id = excluded.tenant_id, enabled = excluded.enabled, body = excluded.body
RETURNING xmax = 0
"""


def key(policy_id: str) -> str:
    """A policy's key where policies and extensions share one namespace of keys."""
    return PREFIX + policy_id


def decode(text: str | bytes, limits: PolicyLimits) -> tuple[list[Policy], dict[str, str]]:
    """(policies, {`policy:<id>`: problem} of rows left out) from the database's JSON."""
    good: list[Policy] = []
    invalid: dict[str, str] = {}
    for row in msgspec.json.decode(text):
        policy_id = str(row.get("policy_id"))
        body = row.pop("body")
        if not isinstance(body, dict):  # the CHECK forbids it, unless dropped by hand
            body, problems = {}, [("body", "must be a JSON object")]
        else:
            problems = [(f"body.{k}", "unknown field") for k in body if k not in BODY_FIELDS]
        try:
            policy = parse_policy({**body, **row}, limits=limits, label=policy_id)
        except InvalidRecord as exc:
            problems += exc.problems
        if problems:
            invalid[key(policy_id)] = "; ".join(f"{field}: {msg}" for field, msg in problems)
        else:
            good.append(policy)
    for policy_key, problem in invalid.items():
        log.error("invalid_policy_skipped", policy_id=policy_key[len(PREFIX) :], error=problem)
    return good, invalid


async def read(
    conn: psycopg.AsyncConnection[Any], ids: Sequence[str] | None, limits: PolicyLimits
) -> tuple[list[Policy], dict[str, str]]:
    """Policies by id (every one when `ids` is None), with the rows left out."""
    if ids is None:
        cur = await conn.execute(ALL)
    else:
        cur = await conn.execute(BY_IDS, {"ids": list(ids)})
    row = await cur.fetchone()
    return decode(row[0] if row else "[]", limits)


async def apply(
    conn: psycopg.AsyncConnection[Any],
    policy_id: str,
    old: Policy | None,
    new: Policy | None,
    limits: PolicyLimits,
) -> Outcome:
    """Make the stored policy `new` (None: delete), after checking it as every way in does.

    A row that no longer parses reads as absent (`old` None), yet is there: the delete and
    the upsert act on the row itself, so a broken row can be replaced or removed."""
    if new is None:
        cur = await conn.execute("DELETE FROM routing_policies WHERE policy_id = %s", (policy_id,))
        return "deleted" if cur.rowcount else "absent"
    if new.policy_id != policy_id:  # a writer's slip, answered like any bad field
        raise InvalidRecord(
            policy_id,
            [("policy_id", f"a write of {policy_id!r} names {new.policy_id!r}")],
            "policy",
        )
    wanted = policy_to_plain(new, writable_only=True)
    if old is not None and wanted == policy_to_plain(old, writable_only=True):
        return "unchanged"
    parse_policy(wanted, limits=limits, label=policy_id)  # a struct built in code is unchecked
    await _check_references(conn, new, old)
    cur = await conn.execute(
        _UPSERT,
        (
            policy_id,
            new.tenant_id,
            new.enabled,
            Jsonb({f: wanted[f] for f in BODY_FIELDS}),
        ),
    )
    inserted = await cur.fetchone()
    return "created" if inserted is not None and inserted[0] else "updated"


async def _check_references(
    conn: psycopg.AsyncConnection[Any], new: Policy, old: Policy | None
) -> None:
    """`InvalidRecord` when an id the write adds names no extension of its stage's type, as
    committed. References the stored policy already had are not held against the write:
    disabling or editing a policy whose extension has since gone must stay possible (the
    cache reports it unusable meanwhile)."""
    refs = references(new)
    if not refs:
        return
    cur = await conn.execute(_EXTENSION_TYPES, (sorted({ext_id for _, ext_id, _ in refs}),))
    types = {ext_id: ext_type for ext_id, ext_type in await cur.fetchall()}
    kept = {(ext_id, stage) for _, ext_id, stage in references(old)} if old else set()
    added = {field for field, ext_id, stage in refs if (ext_id, stage) not in kept}
    problems = [p for p in reference_problems(new, types) if p[0] in added]
    if problems:
        raise InvalidRecord(new.policy_id, problems, kind="policy")
