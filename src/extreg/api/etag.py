"""Entity tags of extension and policy records, and `If-Match` checking, so that two
operators editing the same record cannot silently overwrite each other.

The tag is a hash of the whole record as served, `updated_at` included, so any change (made
through the API, the CLI or plain SQL) gives a new tag. A missing `If-Match` is allowed (the
write is unconditional); a present one must match the record as stored at the moment of the
write, which the caller checks inside the write's transaction.
"""

from __future__ import annotations

import hashlib

import msgspec

from ..core.model import Extension, to_plain
from ..core.policy import Policy, policy_to_plain
from ..errors import StaleETag


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
        what = (
            f"policy {current.policy_id!r}"
            if isinstance(current, Policy)
            else f"extension {current.id!r}"
        )
        raise StaleETag(
            f"{what} changed since you read it (If-Match {if_match} is stale):"
            " read it again and retry"
        )
