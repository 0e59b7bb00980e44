"""The request envelope an extension receives, encoded once and checked for size.

`{"trace_id": ..., "tenant_id": ..., "payload": <request payload>, "metadata": <request
metadata>}` (the wire contract). The payload and the metadata are encoded separately, so their
sizes are checked on the exact bytes that would go on the wire, then joined with the two ids
into the envelope without encoding anything twice. Pure, no I/O.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec

from ..errors import InvocationError, PayloadTooLarge

_encode = msgspec.json.Encoder().encode
_EMPTY_OBJECT = b"{}"


def encode_envelope(
    extension_id: str,
    request: Mapping[str, Any],
    trace_id: Any,
    tenant_id: Any,
    max_payload_size: int,
    max_metadata_size: int,
) -> bytes:
    """The envelope's JSON bytes; `PayloadTooLarge` or `InvocationError` before anything is sent.

    A missing `metadata` is sent as `{}`, a missing `payload` as `null`.
    """
    try:
        payload = _encode(request.get("payload"))
        metadata = request.get("metadata")
        meta = _EMPTY_OBJECT if metadata is None else _encode(metadata)
        ids = _encode(trace_id), _encode(tenant_id)
    except (TypeError, ValueError, OverflowError) as exc:  # msgspec.EncodeError is a ValueError
        raise InvocationError(extension_id, f"request is not JSON-encodable: {exc}", 0) from None
    if len(payload) > max_payload_size:
        raise PayloadTooLarge(
            extension_id, f"payload is {len(payload)} bytes, the limit is {max_payload_size}", 0
        )
    if len(meta) > max_metadata_size:
        raise PayloadTooLarge(
            extension_id, f"metadata is {len(meta)} bytes, the limit is {max_metadata_size}", 0
        )
    return b"".join(
        (b'{"trace_id":', ids[0], b',"tenant_id":', ids[1], b',"payload":', payload,
         b',"metadata":', meta, b"}")
    )  # fmt: skip


def headers(trace_id: Any, tenant_id: Any) -> dict[str, str] | None:
    """NATS headers carrying the ids that are set (None when neither is)."""
    if trace_id is None and tenant_id is None:
        return None
    found = {}
    if trace_id is not None:
        found["trace_id"] = trace_id if isinstance(trace_id, str) else str(trace_id)
    if tenant_id is not None:
        found["tenant_id"] = tenant_id if isinstance(tenant_id, str) else str(tenant_id)
    return found
