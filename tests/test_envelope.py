"""The provider request's extra fields (pure, no I/O): the original's documented provider
request `{"trace_id", "tenant_id", "provider_id", "prompt", "parameters", "context"}` on top
of the common envelope."""

from __future__ import annotations

from typing import Any

import msgspec
import pytest

from extreg.core.envelope import encode_envelope, prompt_of
from extreg.errors import InvocationError, PayloadTooLarge


def provider_request(request: dict[str, Any], limit: int = 1000) -> Any:
    return msgspec.json.decode(
        encode_envelope("prov", request, "t-1", "acme", limit, limit, provider=True)
    )


def test_provider_fields_follow_the_envelope() -> None:
    """provider_id is the extension id, prompt the message text, parameters the request's,
    context the request metadata; the common envelope is unchanged."""
    message = {"message_id": "m-1", "payload": "Hello", "metadata": {"channel": "web"}}
    assert {
        "trace_id": "t-1",
        "tenant_id": "acme",
        "payload": message,
        "metadata": {"lang": "en"},
        "provider_id": "prov",
        "prompt": "Hello",
        "parameters": {"max_tokens": 5},
        "context": {"lang": "en"},
    } == provider_request(
        {"payload": message, "metadata": {"lang": "en"}, "parameters": {"max_tokens": 5}}
    )
    assert ({}, {}, None) == tuple(
        provider_request({})[k] for k in ("parameters", "context", "prompt")
    )


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        ({"payload": "text"}, "text"),
        ("bare", "bare"),
        ({"payload": 7}, None),
        ([1], None),
        (None, None),
        ({"prompt": "not the message text"}, None),
    ],
)
def test_prompt_is_the_message_text(payload: Any, expected: str | None) -> None:
    """prompt is `payload.payload` when it is a string, the payload when it is one, else null."""
    assert expected == prompt_of(payload)


def test_parameters_are_limited_and_checked() -> None:
    """parameters count against the metadata limit and must be JSON-encodable."""
    with pytest.raises(PayloadTooLarge, match="parameters is 21 bytes, the limit is 20"):
        provider_request({"parameters": {"k": "x" * 13}}, limit=20)
    with pytest.raises(InvocationError, match="parameters are not JSON-encodable"):
        provider_request({"parameters": {"k": object()}})
