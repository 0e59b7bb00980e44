"""The sample extensions' behaviour, as pure functions of the request (no I/O).

Each handler takes the decoded request envelope
`{"trace_id", "tenant_id", "payload", "metadata"}` (a provider's also carries `provider_id`,
`prompt`, `parameters` and `context`) and returns the reply object, following
the Beamline wire contract (see `SPEC.md`, "Wire contract with extensions"):

- `normalize_text` (pre): lower-cases, trims and collapses the whitespace of
  `payload.payload`, marks `payload.metadata.normalized = "true"` and reports
  `detected_lang` in the reply metadata.
- `pii_guard` (validator): `{"status": "reject", "reason": "pii_detected", ...}` when
  `payload.payload` holds a card number or an SSN, else `{"status": "ok"}`.
- `mask_pii` (post): replaces card numbers, SSNs, e-mail addresses and phone numbers in
  `payload.payload` and marks `payload.metadata.pii_masked = "true"`.
- `test_provider` (provider): answers `{"provider_id", "output", "usage", "metadata"}` with an
  output built from the top-level `prompt`, as the original's reference test_provider does.

The NATS plumbing (and the stateful `flaky` and the byte-for-byte `echo`) live in
`extreg.local.samples.runner`; keeping these pure makes them trivial to test and to reuse.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec

Request = Mapping[str, Any]
Reply = dict[str, Any]
Handler = Callable[[Request], Reply]

# ---- the registry records of the samples --------------------------------------------------


@dataclass(frozen=True, slots=True)
class SampleExtension:
    """How the registry should know one sample: the fields of its extension record."""

    id: str
    type: str
    subject: str
    timeout_ms: int
    retry: int = 0
    description: str = ""
    version: str = "v1"
    config: Mapping[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """The extension record (as in a fixtures file) for this sample."""
        return {
            "id": self.id,
            "type": self.type,
            "subject": self.subject,
            "timeout_ms": self.timeout_ms,
            "retry": self.retry,
            "enabled": True,
            "version": self.version,
            "config": dict(self.config),
            "metadata": {"description": self.description, "sample": True},
        }


FLAKY_CONTROL_SUBJECT = "extreg.local.samples.flaky.control"

SAMPLE_EXTENSIONS: tuple[SampleExtension, ...] = (
    SampleExtension(
        "normalize_text", "pre", "beamline.ext.pre.normalize_text.v1", 100,
        description="Lower-cases, trims and collapses whitespace of the message text.",
    ),
    SampleExtension(
        "pii_guard", "validator", "beamline.ext.validate.pii_guard.v1", 200,
        description="Rejects messages that contain a card number or an SSN.",
    ),
    SampleExtension(
        "mask_pii", "post", "beamline.ext.post.mask_pii.v1", 150,
        description="Masks card numbers, SSNs, e-mail addresses and phone numbers.",
        config={"mask_email": True, "mask_phone": True},
    ),
    SampleExtension(
        "test_provider", "provider", "beamline.provider.test_provider.v1", 5000, retry=1,
        description="A provider that answers with text built from the prompt.",
    ),
    SampleExtension(
        "flaky", "pre", "beamline.ext.pre.flaky.v1", 200,
        description=f"Fails a settable share of calls; control on {FLAKY_CONTROL_SUBJECT}.",
    ),
    SampleExtension(
        "echo", "pre", "beamline.ext.pre.echo.v1", 1000,
        description="Answers with the request unchanged (for benchmarks).",
    ),
)  # fmt: skip
"""Every sample, in the order `extreg sample-extensions` serves them."""

SAMPLES_BY_ID: dict[str, SampleExtension] = {s.id: s for s in SAMPLE_EXTENSIONS}

BUNDLED_IDS = ("normalize_text", "pii_guard", "mask_pii", "test_provider")
"""The samples whose records are the bundled fixtures (the four of the wire contract)."""
BUNDLED_FIXTURES_FILE = Path(__file__).parents[2] / "fixtures" / "samples.json"


def bundled_fixtures_text() -> str:
    """The bundled fixtures file (`extreg/fixtures/samples.json`, the default `fixtures_dir`
    and the embedded database's first records), generated from the samples so the records
    are written once: `write_bundled_fixtures` rewrites it, and a test fails when it differs."""
    records = [SAMPLES_BY_ID[i].record() for i in BUNDLED_IDS]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def write_bundled_fixtures() -> None:
    """Regenerate the bundled fixtures file after a change to the samples' records (run
    `python -c "from extreg.local.samples.extensions import write_bundled_fixtures as w; w()"`)."""
    BUNDLED_FIXTURES_FILE.write_text(bundled_fixtures_text(), encoding="utf-8")


# ---- patterns ---------------------------------------------------------------------------

# 4x4 digits with optional single spaces or dashes between groups; not part of a longer number.
CARD_RE = re.compile(r"(?<!\d)\d{4}(?:[ -]?\d{4}){3}(?!\d)")
# ddd-dd-dddd or ddd.ddd.dddd, as in the original extension.
SSN_RE = re.compile(r"(?<![\d.-])(?:\d{3}-\d{2}-\d{4}|\d{3}\.\d{3}\.\d{4})(?![\d.-]?\d)")
EMAIL_RE = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
# +CC groups (+1 555 123 4567, +7 (912) 345-67-89, +442071234567),
# (555) 123-4567, or 555-123-4567 / 555 123 4567. Bare digit runs are left alone
# (too easily an order number); matches must carry 7..15 digits.
PHONE_RE = re.compile(
    r"(?<![\w+])(?:"
    r"\+\d{1,3}(?:[ .-]?\(?\d{1,4}\)?){2,5}"
    r"|\(\d{3}\)[ .-]?\d{3}[ .-]?\d{4}"
    r"|\d{3}[ .-]\d{3}[ .-]\d{4}"
    r")(?!\w)"
)

CARD_MASK = "[CARD_MASKED]"
SSN_MASK = "[SSN_MASKED]"
EMAIL_MASK = "[EMAIL_MASKED]"
PHONE_MASK = "[PHONE_MASKED]"

_FALSE_WORDS = frozenset({"false", "0", "no", "off", ""})

# ---- helpers ----------------------------------------------------------------------------


def _payload(request: Request) -> Any:
    """The message the router sent (`request["payload"]`)."""
    return request.get("payload")


def _text(payload: Any) -> str | None:
    """The message text: `payload.payload` when it is a string (or a bare string payload)."""
    if isinstance(payload, str):
        return payload
    if isinstance(payload, Mapping):
        text = payload.get("payload")
        return text if isinstance(text, str) else None
    return None


def _replace_text(payload: Any, text: str, mark: str) -> Any:
    """A copy of the message with new text and `metadata[mark] = "true"`."""
    if not isinstance(payload, Mapping):
        return text
    meta = payload.get("metadata")
    new_meta = dict(meta) if isinstance(meta, Mapping) else {}
    new_meta[mark] = "true"
    return {**payload, "payload": text, "metadata": new_meta}


def _scan_text(payload: Any) -> str:
    """The text a guard must scan: the message text, else the whole payload as JSON."""
    text = _text(payload)
    if text is not None:
        return text
    if payload is None:
        return ""
    return msgspec.json.encode(payload).decode()


def _flag(request: Request, name: str, default: bool = True) -> bool:
    """A boolean switch from the request metadata (or its `config` object).

    The router does not send the policy's per-extension config, so callers put switches
    such as `mask_email` in the request metadata; strings like "false"/"0"/"off" count
    as off because context metadata is often string-valued.
    """
    meta = request.get("metadata")
    if not isinstance(meta, Mapping):
        return default
    value = meta.get(name)
    if value is None and isinstance(meta.get("config"), Mapping):
        value = meta["config"].get(name)
    if value is None:
        return default
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


def detect_lang(text: str) -> str:
    """A tiny script-based language guess: `ru` (Cyrillic), `en` (Latin), else `und`."""
    cyrillic = latin = 0
    for ch in text:
        if "\u0400" <= ch <= "\u04ff":
            cyrillic += 1
        elif ch.isascii() and ch.isalpha():
            latin += 1
    if cyrillic == latin == 0:
        return "und"
    return "ru" if cyrillic > latin else "en"


# ---- the handlers -----------------------------------------------------------------------


def normalize_text(request: Request) -> Reply:
    """Pre: normalised text in `payload.payload`, `normalized` mark, `detected_lang`."""
    payload = _payload(request)
    text = _text(payload)
    if text is None:
        return {"metadata": {"detected_lang": "und"}}
    normalized = " ".join(text.split()).lower()
    return {
        "payload": _replace_text(payload, normalized, "normalized"),
        "metadata": {"detected_lang": detect_lang(normalized)},
    }


def find_pii(text: str) -> list[str]:
    """Kinds of blocking PII in the text, in a fixed order: `card_number`, `ssn`."""
    found = []
    if CARD_RE.search(text):
        found.append("card_number")
    if SSN_RE.search(text):
        found.append("ssn")
    return found


def pii_guard(request: Request) -> Reply:
    """Validator: reject (`pii_detected`) on a card number or SSN; the PII is not echoed."""
    found = find_pii(_scan_text(_payload(request)))
    if not found:
        return {"status": "ok"}
    return {"status": "reject", "reason": "pii_detected", "details": {"pii_types": found}}


def mask_text(text: str, *, mask_email: bool = True, mask_phone: bool = True) -> str:
    """Replace PII with fixed markers: cards and SSNs always, e-mail and phones if asked.

    Order matters: cards and SSNs go first so their digits are not taken for phones.
    """
    text = CARD_RE.sub(CARD_MASK, text)
    text = SSN_RE.sub(SSN_MASK, text)
    if mask_email:
        text = EMAIL_RE.sub(EMAIL_MASK, text)
    if mask_phone:
        text = PHONE_RE.sub(_phone_mask, text)
    return text


def _phone_mask(match: re.Match[str]) -> str:
    """Mask a phone-shaped match only when it carries a phone's number of digits."""
    digits = sum(ch.isdigit() for ch in match.group())
    return PHONE_MASK if 7 <= digits <= 15 else match.group()


def mask_pii(request: Request) -> Reply:
    """Post: masked `payload.payload` and `pii_masked` mark; `mask_email`/`mask_phone` honoured."""
    payload = _payload(request)
    text = _text(payload)
    if text is None:
        return {}
    masked = mask_text(
        text,
        mask_email=_flag(request, "mask_email"),
        mask_phone=_flag(request, "mask_phone"),
    )
    return {"payload": _replace_text(payload, masked, "pii_masked")}


TEST_PROVIDER_MODEL = "test-echo-1"


def test_provider(request: Request) -> Reply:
    """Provider: `output` is `"Test response: <prompt>"`; usage counts whitespace words.

    The prompt is read where the original's reference test_provider reads it: `prompt` at the
    top level of the provider request (the invoker puts the message text there). A request
    without one (sent by hand, or by an older router) falls back to the message text, or to a
    `payload.prompt` string.
    """
    payload = _payload(request)
    prompt = request.get("prompt")
    if not isinstance(prompt, str):
        prompt = _text(payload)
    if prompt is None and isinstance(payload, Mapping) and isinstance(payload.get("prompt"), str):
        prompt = payload["prompt"]
    prompt = prompt or ""
    output = f"Test response: {prompt}"
    prompt_tokens = len(prompt.split())
    completion_tokens = len(output.split())
    meta: dict[str, Any] = {"model": TEST_PROVIDER_MODEL, "finish_reason": "stop"}
    if isinstance(payload, Mapping) and "message_id" in payload:
        meta["message_id"] = payload["message_id"]
    return {
        "provider_id": "test_provider",
        "output": output,
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "metadata": meta,
    }


HANDLERS: dict[str, Handler] = {
    "normalize_text": normalize_text,
    "pii_guard": pii_guard,
    "mask_pii": mask_pii,
    "test_provider": test_provider,
}
"""The stateless samples by id; `flaky` and `echo` are served by the runner itself."""
