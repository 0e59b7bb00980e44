"""Strict JSON for everything users hand us: fixture files and API request bodies.

msgspec decodes first, for its precise messages (the byte where a document goes wrong); then
the standard library decodes again, because its hook sees the key pairs of every object and
can refuse a key given twice, which msgspec (like most decoders) keeps silently, last wins.
Documents nested deeper than Python's recursion allows are refused too, never a crash.
"""

from __future__ import annotations

import json
from typing import Any

import msgspec

from ..errors import StrictJSONError, printable


def loads(document: str | bytes) -> Any:
    """The decoded document, or `StrictJSONError`."""
    try:
        msgspec.json.decode(document)
        return json.loads(document, object_pairs_hook=_no_repeated_keys)
    except msgspec.DecodeError as exc:
        raise StrictJSONError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise StrictJSONError(f"not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except RecursionError:
        raise StrictJSONError("nested too deeply") from None


def _no_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for key, value in pairs:
        if key in data:
            raise StrictJSONError(f"key {printable(key)} appears twice in one object")
        data[key] = value
    return data
