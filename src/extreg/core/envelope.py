"""The request envelope an extension receives, encoded once and checked for size.

`{"trace_id": ..., "tenant_id": ..., "payload": <request payload>, "metadata": <request
metadata>}` (the wire contract). The payload and the metadata are encoded separately, so their
sizes are checked on the exact bytes that would go on the wire, then joined with the two ids
into the envelope without encoding anything twice. Pure, no I/O.

A provider's request adds the original's provider fields (its documented provider request is
`{"trace_id", "tenant_id", "provider_id", "prompt", "parameters", "context"}`, and its
reference `test_provider` reads `prompt` at the top level), so both kinds of provider answer:

- `provider_id`: the extension id;
- `prompt`: the message text: `payload.payload` when it is a string, the payload itself when
  it is one, else `null`;
- `parameters`: the request's `parameters` (`{}` without), checked against the metadata limit;
- `context`: the request metadata (the router's context), the same bytes as `metadata`.
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
    *,
    provider: bool = False,
) -> bytes:
    """The envelope's JSON bytes; `PayloadTooLarge` or `InvocationError` before anything is sent.

    A missing `metadata` is sent as `{}`, a missing `payload` as `null`. With `provider`, the
    provider fields follow (see the module docstring).
    """
    try:
        payload = _encode(request.get("payload"))
        metadata = request.get("metadata")
        meta = _EMPTY_OBJECT if metadata is None else _encode(metadata)
        ids = _encode(trace_id), _encode(tenant_id)
    except (TypeError, ValueError, OverflowError) as exc:  # msgspec.EncodeError is a ValueError
        raise InvocationError(extension_id, f"request is not JSON-encodable: {exc}", 0) from None
    _check(extension_id, "payload", payload, max_payload_size)
    _check(extension_id, "metadata", meta, max_metadata_size)
    parts = [b'{"trace_id":', ids[0], b',"tenant_id":', ids[1], b',"payload":', payload,
             b',"metadata":', meta]  # fmt: skip
    if provider:
        parts += _provider_fields(extension_id, request, meta, max_metadata_size)
    parts.append(b"}")
    return b"".join(parts)


def prompt_of(payload: Any) -> str | None:
    """The message text a provider is asked about: `payload.payload` when it is a string (the
    router's message), the payload itself when it is a string, else None."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, Mapping):
        text = payload.get("payload")
        if isinstance(text, str):
            return text
    return None


def _provider_fields(
    extension_id: str, request: Mapping[str, Any], meta: bytes, max_metadata_size: int
) -> list[bytes]:
    """`provider_id`, `prompt`, `parameters` and `context` as JSON fragments to append."""
    try:
        parameters = request.get("parameters")
        params = _EMPTY_OBJECT if parameters is None else _encode(parameters)
    except (TypeError, ValueError, OverflowError) as exc:
        raise InvocationError(
            extension_id, f"parameters are not JSON-encodable: {exc}", 0
        ) from None
    _check(extension_id, "parameters", params, max_metadata_size)
    return [b',"provider_id":', _encode(extension_id),
            b',"prompt":', _encode(prompt_of(request.get("payload"))),
            b',"parameters":', params, b',"context":', meta]  # fmt: skip


def _check(extension_id: str, what: str, data: bytes, limit: int) -> None:
    if len(data) > limit:
        raise PayloadTooLarge(extension_id, f"{what} is {len(data)} bytes, the limit is {limit}", 0)


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
