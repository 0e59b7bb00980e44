"""The `flaky` sample's state: how often it fails, how, and how slowly it answers.

Why: circuit breakers, retries and health numbers need an extension whose failures can be
dialled up and down while everything runs. `Flaky` holds that dial; the runner consults it
for every call on `beamline.ext.pre.flaky.v1` and changes it from requests on the control
subject `extreg.local.samples.flaky.control`.

Control request (a JSON object; every key optional, `{}` only reads the state):

    {"failure_rate": 0.3, "delay_ms": 50, "failure_mode": "drop", "seed": 7, "reset": false}

- `failure_rate`: share of calls that fail, 0.0 (never) to 1.0 (always). Default 0.0.
- `delay_ms`: wait this long before answering (or before failing), 0 to 60000. Default 0.
- `failure_mode`: what a failure looks like to the caller:
  - `"drop"` (default): no answer at all, so the caller times out, exactly like a hung
    or overloaded extension (the invoker's `ExtensionTimeout`, retried per `retry`);
  - `"invalid"`: an immediate answer that is not a JSON object, so the caller sees an
    invalid reply (`InvalidResponse`) without waiting for a timeout.
- `seed`: reseeds the random draw, for reproducible failure sequences.
- `reset`: back to the defaults (applied before the other keys) and zeroed counters.

The control reply is `{"ok": true, "settings": {...}, "stats": {"calls": n, "failures": m}}`,
or `{"ok": false, "error": "..."}` for a bad request (nothing is changed then).
A successful call is answered `{"payload": <the request's payload>}`: the message unchanged.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Literal, cast

FailureMode = Literal["drop", "invalid"]
FAILURE_MODES: tuple[FailureMode, ...] = ("drop", "invalid")
MAX_DELAY_MS = 60_000
INVALID_REPLY = b"flaky: injected failure (not a JSON object)"
"""What the `invalid` failure mode answers."""


@dataclass(frozen=True, slots=True)
class FlakySettings:
    """One consistent set of knobs; replaced as a whole, never changed in place."""

    failure_rate: float = 0.0
    delay_ms: int = 0
    failure_mode: FailureMode = "drop"


class Flaky:
    """The dial and the counters of the flaky sample (one per runner)."""

    def __init__(self, settings: FlakySettings | None = None, *, seed: int | None = None) -> None:
        self.settings = settings or FlakySettings()
        self._rng = random.Random(seed)
        self.calls = 0
        self.failures = 0

    def should_fail(self) -> bool:
        """Count one call and decide whether it fails, by the current failure rate."""
        self.calls += 1
        rate = self.settings.failure_rate
        failed = rate >= 1.0 or (rate > 0.0 and self._rng.random() < rate)
        if failed:
            self.failures += 1
        return failed

    def reset(self) -> None:
        """Back to the defaults (never fail, no delay) with zeroed counters."""
        self.settings = FlakySettings()
        self.calls = 0
        self.failures = 0

    def state(self) -> dict[str, Any]:
        """Settings and counters, as the control subject reports them."""
        return {
            "settings": asdict(self.settings),
            "stats": {"calls": self.calls, "failures": self.failures},
        }

    def control(self, request: Any) -> dict[str, Any]:
        """Apply one control request (see the module docstring) and return the reply.

        Validation happens before anything changes, so a bad request leaves the state as
        it was and answers `{"ok": false, "error": ...}`.
        """
        try:
            reset, seed, settings = self._parse(request)
        except (TypeError, ValueError) as exc:
            return {"ok": False, "error": str(exc)}
        if reset:  # the counters are only zeroed by an explicit reset
            self.reset()
        if seed is not None:
            self._rng.seed(seed)
        self.settings = settings
        return {"ok": True, **self.state()}

    def _parse(self, request: Any) -> tuple[bool, int | None, FlakySettings]:
        """Check a control request; return (reset, seed, new settings), else raise
        TypeError or ValueError with a message for the caller."""
        if request is None:
            request = {}
        if not isinstance(request, Mapping):
            raise TypeError("control request must be a JSON object")
        unknown = set(request) - {"failure_rate", "delay_ms", "failure_mode", "seed", "reset"}
        if unknown:
            raise ValueError(f"unknown control keys: {', '.join(sorted(unknown))}")
        reset = request.get("reset", False)
        if not isinstance(reset, bool):
            raise TypeError("reset must be true or false")
        base = FlakySettings() if reset else self.settings
        changes: dict[str, Any] = {}
        if "failure_rate" in request:
            changes["failure_rate"] = _rate(request["failure_rate"])
        if "delay_ms" in request:
            changes["delay_ms"] = _delay(request["delay_ms"])
        if "failure_mode" in request:
            changes["failure_mode"] = _mode(request["failure_mode"])
        seed = request.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise ValueError("seed must be an integer")
        return reset, seed, replace(base, **changes)


def _rate(value: Any) -> float:
    """A failure rate: a number from 0.0 to 1.0."""
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError("failure_rate must be a number from 0.0 to 1.0")
    if not 0.0 <= value <= 1.0:
        raise ValueError("failure_rate must be a number from 0.0 to 1.0")
    return float(value)


def _delay(value: Any) -> int:
    """A delay: whole milliseconds from 0 to MAX_DELAY_MS."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_DELAY_MS:
        raise ValueError(f"delay_ms must be an integer from 0 to {MAX_DELAY_MS}")
    return value


def _mode(value: Any) -> FailureMode:
    """A failure mode: one of FAILURE_MODES."""
    if value not in FAILURE_MODES:
        raise ValueError(f"failure_mode must be one of: {', '.join(FAILURE_MODES)}")
    return cast(FailureMode, value)
