"""Entity tags of extension and policy records, and `If-Match` checking, so that two
operators editing the same record cannot silently overwrite each other.

The tag is a hash of the whole record as served, `updated_at` included, so any change (made
through the API, the CLI or plain SQL) gives a new tag. A missing `If-Match` is allowed (the
write is unconditional); a present one must match the record as stored at the moment of the
write, which the caller checks inside the write's transaction (the `change` a write runs).
"""

from __future__ import annotations

import hashlib
from typing import Annotated, Literal, NoReturn, TypeVar

import msgspec
from fastapi import Header

from ..core.model import Extension, to_plain
from ..core.policy import Policy, policy_to_plain
from ..errors import ExtensionNotFound, PolicyNotFound, StaleETag

IfMatch = Annotated[
    str | None, Header(alias="If-Match", description="The ETag you read; a stale one gets 412.")
]
# The OpenAPI answer of a stale `If-Match`, for every conditional route.
STALE: dict[int | str, dict[str, object]] = {412: {"description": "If-Match is stale."}}
Record = TypeVar("Record", Extension, Policy)
Kind = Literal["extension", "policy"]


def etag_of(record: Extension | Policy) -> str:
    plain = policy_to_plain(record) if isinstance(record, Policy) else to_plain(record)
    digest = hashlib.sha256(msgspec.json.encode(plain)).hexdigest()
    return f'"{digest[:32]}"'


def check_if_match(if_match: str | None, current: Extension | Policy) -> None:
    """Raise `StaleETag` unless `if_match` is absent, `*`, or lists the current tag."""
    if if_match is None or if_match.strip() == "*":
        return
    offered = {tag.strip() for tag in if_match.split(",")}
    if etag_of(current) not in offered:  # weak tags (W/"...") never match: RFC 9110 13.1.1
        raise StaleETag(
            f"{_named(current)} changed since you read it (If-Match {if_match} is stale):"
            " read it again and retry"
        )


def existing(current: Record | None, if_match: str | None, kind: Kind, record_id: str) -> Record:
    """The record a change acts on (a PUT, PATCH, DELETE, enable or disable): not found
    (`not_found`) when there is none, `StaleETag` when `if_match` is stale."""
    if current is None:
        not_found(kind, record_id)
    check_if_match(if_match, current)
    return current


def not_found(kind: Kind, record_id: str) -> NoReturn:
    """Raise `ExtensionNotFound` or `PolicyNotFound`, by `kind` (each raise names its class,
    as tests/test_error_tree.py reads them)."""
    if kind == "policy":
        raise PolicyNotFound(record_id)
    raise ExtensionNotFound(record_id)


def unmatched(what: str, if_match: str, instead: str) -> StaleETag:
    """The error of an `If-Match` where no readable version is, which nothing it names can
    match: `instead` says what to do (`create it`, `delete it`) without one."""
    return StaleETag(
        f"{what} has no readable version (If-Match {if_match} names none): {instead}"
        " without If-Match"
    )


def _named(record: Extension | Policy) -> str:
    if isinstance(record, Policy):
        return f"policy {record.policy_id!r}"
    return f"extension {record.id!r}"
