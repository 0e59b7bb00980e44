"""Circuit breakers, one per extension.

Written here rather than taken from a library because it is the product's core: it runs on
every invocation, its states are part of the contract (`closed`, `open`, `half_open`), and it
needs things no library offered together: one state per extension id in one registry, an
error-rate window and a slow-call share next to the consecutive-failure rule, per-extension
overrides from metadata, half-open admission counted at check time, an injectable clock, and a
closed-circuit cost of a few hundred nanoseconds (`bench/bench_breaker.py` compares it with
pybreaker, aiobreaker, circuitbreaker and purgatory).

Rules, per extension:

- closed -> open when `failure_threshold` failures come in a row, or when a failure brings the
  failure share of the calls in the last `window_seconds` to `error_rate_threshold` or more
  and the window holds at least `min_calls` calls. The error-rate rule is evaluated when a
  failure is recorded.
- closed -> open, too, when a slow success brings the slow share of the calls in the same
  window to `slow_call_rate_threshold` or more and the window holds at least `min_calls` calls
  (resilience4j's slow-call threshold). A success is slow when its `duration_s` is over
  `slow_call_duration_ms` (0, the default, turns the rule off). Only successes are judged
  slow: a failure counts as a failure already, and each rule judges its own share. The rule is
  evaluated when a slow success is recorded. Slowness is the breaker's business alone: health
  still counts a slow call as the success it is.
- open -> half_open once `timeout_seconds` have passed (lazily: on the next `check_circuit`,
  `update_state` or `state`). A circuit opened by `force_open` stays open until
  `force_close` or `reset`.
- half_open admits at most `half_open_max_requests` trial calls, counted when
  `check_circuit` admits them (so any number of concurrent asyncio calls cannot over-admit).
  A success closes the circuit, a failure opens it again, and so does a slow success: a trial
  asks whether the extension is well again, and slow is not well (resilience4j counts a slow
  trial against the circuit too). If the admitted trials report nothing for
  `timeout_seconds` (a cancelled call), a new round of trials is admitted.
- closing or opening clears the failure streak and the window (calls, failures, slow calls).
- `record_*` never applies a time-based transition; a result recorded while open is ignored.

The window is bucketed: at most 60 buckets of `window_seconds / buckets` seconds (1-second
buckets for windows up to 60 s). The window is the current bucket and the ones before it, so it
spans between `window_seconds - width` and `window_seconds`; recording a call is a clock read
and a couple of integer increments, not a list append. With slow calls off the threshold is
infinite, so the duration costs a success one float comparison.

With `circuit_breaker_enabled` false (the default) there are no circuits: every call is
admitted, nothing is recorded, and every reading (`check_circuit`, `state`, `states`,
`snapshot`) says `disabled`, never `closed`, so no screen shows a protection that does not
exist. Forcing a circuit then raises `Conflict` naming how to turn breakers on.

Pure and I/O-free: no locks (one asyncio thread), no timers, no logging on the hot path.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, Literal

import structlog

from ..errors import CircuitOpen, Conflict, InvalidRecord
from .clock import SYSTEM_CLOCK, Clock
from .times import iso_seconds

if TYPE_CHECKING:
    from ..settings import Settings

__all__ = [
    "CLOSED",
    "DISABLED",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "CircuitBreakers",
    "CircuitSnapshot",
    "Reading",
    "State",
    "StateCallback",
    "breaker_override_problems",
]

log = structlog.get_logger("extreg.breaker")

State = Literal["closed", "open", "half_open"]
"""The states a circuit moves between (and the ones transitions report)."""
Reading = Literal["closed", "open", "half_open", "disabled"]
"""What a query answers: a circuit's state, or `disabled` when breakers are off."""
CLOSED: Final = "closed"
OPEN: Final = "open"
HALF_OPEN: Final = "half_open"
DISABLED: Final = "disabled"
ENABLE_HINT: Final = (
    "circuit breakers are disabled (circuit_breaker_enabled is false), so no circuit can be "
    "forced; enable them with EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED=true or "
    "circuit_breaker_enabled = true in the config file (--config), then restart"
)

StateCallback = Callable[[str, State, State], None]
"""Called as `callback(extension_id, old_state, new_state)` on every transition."""

MAX_BUCKETS: Final = 60
VERSION_SEPARATOR: Final = "@"  # never in an extension id (model.ID_PATTERN)


def version_circuit(extension_id: str, version: str) -> str:
    """The circuit key of a version routed to by its rules: its own circuit, so a failing
    canary opens alone (the extension's own row keeps the extension's circuit, keyed by id)."""
    return f"{extension_id}{VERSION_SEPARATOR}{version}"


def split_circuit(key: str) -> tuple[str, str | None]:
    """(extension id, version) of a circuit key; version None for the extension's own."""
    extension_id, _, version = key.partition(VERSION_SEPARATOR)
    return extension_id, version or None


METADATA_PREFIX: Final = "circuit_breaker_"
METADATA_TABLE: Final = "circuit_breaker"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The breaker's settings; defaults are the contract's. Bad values raise ValueError."""

    enabled: bool = False
    failure_threshold: int = 5
    timeout_seconds: float = 60.0
    half_open_max_requests: int = 3
    error_rate_threshold: float = 0.5
    window_seconds: float = 60.0
    min_calls: int = 10
    slow_call_duration_ms: int = 0
    slow_call_rate_threshold: float = 1.0

    def __post_init__(self) -> None:
        problems = _value_problems(
            {f.name: getattr(self, f.name) for f in fields(self) if f.name != "enabled"}
        )
        if problems:
            raise ValueError("; ".join(f"{key}: {message}" for key, message in problems))

    @classmethod
    def from_settings(cls, settings: Settings) -> BreakerConfig:
        """The `circuit_breaker_*` keys of `settings`."""
        return cls(
            enabled=settings.circuit_breaker_enabled,
            failure_threshold=settings.circuit_breaker_failure_threshold,
            timeout_seconds=settings.circuit_breaker_timeout_seconds,
            half_open_max_requests=settings.circuit_breaker_half_open_max_requests,
            error_rate_threshold=settings.circuit_breaker_error_rate_threshold,
            window_seconds=settings.circuit_breaker_window_seconds,
            min_calls=settings.circuit_breaker_min_calls,
            slow_call_duration_ms=settings.circuit_breaker_slow_call_duration_ms,
            slow_call_rate_threshold=settings.circuit_breaker_slow_call_rate_threshold,
        )


_INT_MINIMUMS: Final = {
    "failure_threshold": 1,
    "half_open_max_requests": 1,
    "min_calls": 1,
    "slow_call_duration_ms": 0,  # 0: slow calls off
}
_INT_KEYS: Final = tuple(_INT_MINIMUMS)
_FLOAT_KEYS: Final = (
    "timeout_seconds",
    "error_rate_threshold",
    "window_seconds",
    "slow_call_rate_threshold",
)
_SHARE_KEYS: Final = ("error_rate_threshold", "slow_call_rate_threshold")  # at most 1
OVERRIDE_KEYS: Final = (*_INT_KEYS, *_FLOAT_KEYS)


def _value_problems(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    problems = []
    for key, value in values.items():
        if key in _INT_MINIMUMS:
            lowest = _INT_MINIMUMS[key]
            if isinstance(value, bool) or not isinstance(value, int):
                problems.append((key, f"must be an integer (got {value!r})"))
            elif value < lowest:
                problems.append((key, f"must be at least {lowest} (got {value!r})"))
        elif isinstance(value, bool) or not isinstance(value, int | float):
            problems.append((key, f"must be a number (got {value!r})"))
        elif not math.isfinite(value) or value <= 0:
            problems.append((key, f"must be greater than 0 (got {value!r})"))
        elif key in _SHARE_KEYS and value > 1:
            problems.append((key, f"must be at most 1 (got {value!r})"))
    return problems


def _read_overrides(metadata: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """Collect overrides and their problems; problem keys are metadata paths."""
    found: dict[str, tuple[str, Any]] = {}
    problems: list[tuple[str, str]] = []
    nested = metadata.get(METADATA_TABLE)
    if nested is not None:
        if not isinstance(nested, Mapping):
            problems.append((f"metadata.{METADATA_TABLE}", "must be an object"))
        else:
            for key, value in nested.items():
                where = f"metadata.{METADATA_TABLE}.{key}"
                if key in OVERRIDE_KEYS:
                    found[key] = (where, value)
                else:
                    problems.append((where, "unknown circuit breaker setting"))
    for name, value in metadata.items():
        if (
            isinstance(name, str)
            and name.startswith(METADATA_PREFIX)
            and name != "circuit_breaker_enabled"
        ):
            key = name[len(METADATA_PREFIX) :]
            if key in OVERRIDE_KEYS:
                found[key] = (f"metadata.{name}", value)
            else:
                problems.append((f"metadata.{name}", "unknown circuit breaker setting"))
    for key, (where, value) in found.items():
        problems.extend((where, message) for _, message in _value_problems({key: value}))
    if problems:
        return {}, problems
    return {key: float(v) if key in _FLOAT_KEYS else v for key, (_, v) in found.items()}, []


def breaker_override_problems(metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
    """`(field, message)` for every bad circuit breaker override in an extension's metadata.

    For record validation at load time; `CircuitBreakers.configure` raises on the same problems.
    `circuit_breaker_enabled` is not a per-extension setting and is left alone.
    """
    return _read_overrides(metadata)[1]


@dataclass(frozen=True, slots=True)
class CircuitSnapshot:
    """One extension's breaker counters at one moment (for metrics, the dashboard, the DB)."""

    extension_id: str
    state: Reading
    consecutive_failures: int
    window_calls: int
    window_failures: int
    window_slow_calls: int
    half_open_admitted: int
    opened_at: datetime | None
    open_reason: str | None
    forced: bool
    config: BreakerConfig

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; `opened_at` as an ISO 8601 UTC string."""
        return {
            "extension_id": self.extension_id,
            "state": self.state,
            "consecutive_failures": self.consecutive_failures,
            "window_calls": self.window_calls,
            "window_failures": self.window_failures,
            "window_slow_calls": self.window_slow_calls,
            "half_open_admitted": self.half_open_admitted,
            "opened_at": iso_seconds(self.opened_at),
            "open_reason": self.open_reason,
            "forced": self.forced,
        }


class _Circuit:
    """The mutable state of one extension's breaker. Times are from the breaker's clock."""

    __slots__ = (
        "admitted",
        "bucket",
        "bucket_end",
        "config",
        "consecutive",
        "cur_calls",
        "cur_failures",
        "cur_slow",
        "extension_id",
        "forced",
        "half_open_since",
        "index",
        "open_reason",
        "opened_at",
        "opened_wall",
        "ring_calls",
        "ring_failures",
        "ring_slow",
        "slow_s",
        "state",
        "sum_calls",
        "sum_failures",
        "sum_slow",
        "width",
    )

    def __init__(self, extension_id: str, config: BreakerConfig) -> None:
        self.extension_id = extension_id
        self.state: State = CLOSED
        self.consecutive = 0
        self.opened_at = 0.0
        self.opened_wall: float | None = None
        self.open_reason: str | None = None
        self.forced = False
        self.half_open_since = 0.0
        self.admitted = 0
        self.width = 0.0
        self.ring_calls: list[int] = []
        self.ring_failures: list[int] = []
        self.ring_slow: list[int] = []
        self.set_config(config)

    def set_config(self, config: BreakerConfig) -> None:
        """Adopt `config`; a new window geometry starts an empty window."""
        self.config = config
        ms = config.slow_call_duration_ms
        # infinite when off, so the hot path's one comparison is never true
        self.slow_s = ms / 1000.0 if ms else math.inf
        buckets = max(1, min(MAX_BUCKETS, math.ceil(config.window_seconds)))
        width = config.window_seconds / buckets
        if width != self.width or buckets != len(self.ring_calls):
            self.width = width
            self.ring_calls = [0] * buckets
            self.ring_failures = [0] * buckets
            self.ring_slow = [0] * buckets
            consecutive = self.consecutive
            self.clear_counts()
            self.consecutive = consecutive

    def clear_counts(self) -> None:
        """Forget the failure streak and every call in the window."""
        self.consecutive = 0
        self.bucket: float | None = None  # number of the current bucket: time // width
        self.bucket_end = -math.inf  # when the current bucket ends
        self.index = 0
        self.cur_calls = self.cur_failures = self.cur_slow = 0
        # the ring's buckets, the current one excluded
        self.sum_calls = self.sum_failures = self.sum_slow = 0
        ring_calls, ring_failures, ring_slow = self.ring_calls, self.ring_failures, self.ring_slow
        for i in range(len(ring_calls)):
            ring_calls[i] = ring_failures[i] = ring_slow[i] = 0

    def advance(self, now: float) -> None:
        """Move the window to the bucket of `now`, expiring the buckets that fell out of it."""
        bucket = now // self.width
        self.bucket_end = (bucket + 1) * self.width
        if self.bucket is None:
            self.bucket = bucket
            return
        steps = int(bucket - self.bucket)
        if steps <= 0:
            return
        ring_calls, ring_failures, ring_slow = self.ring_calls, self.ring_failures, self.ring_slow
        index = self.index
        ring_calls[index] = self.cur_calls
        ring_failures[index] = self.cur_failures
        ring_slow[index] = self.cur_slow
        self.sum_calls += self.cur_calls
        self.sum_failures += self.cur_failures
        self.sum_slow += self.cur_slow
        self.cur_calls = self.cur_failures = self.cur_slow = 0
        size = len(ring_calls)
        for _ in range(min(steps, size)):
            index = index + 1 if index + 1 < size else 0
            self.sum_calls -= ring_calls[index]
            self.sum_failures -= ring_failures[index]
            self.sum_slow -= ring_slow[index]
            ring_calls[index] = ring_failures[index] = ring_slow[index] = 0
        self.index = index
        self.bucket = bucket


class CircuitBreakers:
    """One circuit breaker per extension id, all sharing a default config and a clock.

    `clock` measures intervals (monotonic seconds); `wall_clock` (epoch seconds) only dates
    `opened_at` in snapshots. With `config.enabled` false every check admits, every record
    is ignored, every state reads `disabled` and forcing raises `Conflict`.
    """

    __slots__ = ("_callbacks", "_circuits", "_clock", "_disabled", "_wall_clock", "config")

    def __init__(
        self,
        config: BreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config or BreakerConfig()
        self._disabled = not self.config.enabled
        self._circuits: dict[str, _Circuit] = {}
        self._clock = clock
        self._wall_clock = wall_clock
        self._callbacks: list[StateCallback] = []

    @classmethod
    def from_settings(cls, settings: Settings, *, clock: Clock = SYSTEM_CLOCK) -> CircuitBreakers:
        """Breakers configured by the settings, on `clock` (both its readings)."""
        return cls(
            BreakerConfig.from_settings(settings), clock=clock.monotonic, wall_clock=clock.time
        )

    @property
    def enabled(self) -> bool:
        return not self._disabled

    # -- the hot path ------------------------------------------------------------------------

    def check_circuit(self, extension_id: str) -> Reading:
        """Admit a call or raise CircuitOpen; a half-open admission is counted here.

        Returns the state that admitted the call: `closed`, `half_open`, or `disabled`.
        """
        if self._disabled:
            return DISABLED
        try:
            circuit = self._circuits[extension_id]
        except KeyError:
            circuit = self._add(extension_id)
        if circuit.state is not CLOSED:
            self._admit(circuit)
        return circuit.state

    def record_success(self, extension_id: str, duration_s: float = 0.0) -> None:
        """Record a successful call that took `duration_s` seconds (0.0, unmeasured, is never
        slow); a slow one may open the circuit, any other closes a half-open one."""
        if self._disabled:
            return
        try:
            circuit = self._circuits[extension_id]
        except KeyError:
            circuit = self._add(extension_id)
        if circuit.state is CLOSED:
            now = self._clock()
            if now >= circuit.bucket_end:
                circuit.advance(now)
            circuit.cur_calls += 1
            circuit.consecutive = 0
            if duration_s > circuit.slow_s:
                self._record_slow(circuit, now)
        elif circuit.state is HALF_OPEN:
            if duration_s > circuit.slow_s:
                reason = (
                    f"a trial call was slower than {circuit.config.slow_call_duration_ms} ms "
                    "while half-open"
                )
                self._open(circuit, self._clock(), reason)
            else:
                self._close(circuit)

    def record_failure(self, extension_id: str) -> None:
        """Record a failed call; may open the circuit (see the module's rules)."""
        if self._disabled:
            return
        try:
            circuit = self._circuits[extension_id]
        except KeyError:
            circuit = self._add(extension_id)
        if circuit.state is CLOSED:
            now = self._clock()
            if now >= circuit.bucket_end:
                circuit.advance(now)
            circuit.cur_calls += 1
            circuit.cur_failures += 1
            circuit.consecutive += 1
            config = circuit.config
            if circuit.consecutive >= config.failure_threshold:
                self._open(circuit, now, f"{circuit.consecutive} consecutive failures")
                return
            calls = circuit.sum_calls + circuit.cur_calls
            if calls >= config.min_calls:
                failures = circuit.sum_failures + circuit.cur_failures
                if failures / calls >= config.error_rate_threshold:
                    self._open(circuit, now, f"{failures} of {calls} calls failed in the window")
        elif circuit.state is HALF_OPEN:
            self._open(circuit, self._clock(), "a trial call failed while half-open")

    # -- time-based transitions and queries --------------------------------------------------

    def update_state(self, extension_id: str) -> Reading:
        """Apply the time-based transition (open -> half_open) if due; return the state."""
        if self._disabled:
            return DISABLED
        circuit = self._circuits.get(extension_id)
        if circuit is None:
            return CLOSED
        if circuit.state is OPEN and not circuit.forced:
            now = self._clock()
            if now - circuit.opened_at >= circuit.config.timeout_seconds:
                self._half_open(circuit, now)
        return circuit.state

    def should_attempt_recovery(self, extension_id: str) -> bool:
        """True when the circuit is open (not forced) and its timeout has passed."""
        circuit = self._circuits.get(extension_id)
        if self._disabled or circuit is None or circuit.state is not OPEN or circuit.forced:
            return False
        return self._clock() - circuit.opened_at >= circuit.config.timeout_seconds

    def state(self, extension_id: str) -> Reading:
        """`closed`, `open` or `half_open`, after any due time-based transition; `disabled`
        when breakers are off."""
        return self.update_state(extension_id)

    def states(self) -> dict[str, Reading]:
        """The state of every extension the breaker has seen (after due transitions)."""
        return {extension_id: self.update_state(extension_id) for extension_id in self._circuits}

    def snapshot(self, extension_id: str) -> CircuitSnapshot:
        """The counters of one extension (an unseen one reads as a fresh closed circuit, or a
        `disabled` one when breakers are off)."""
        state = self.update_state(extension_id)
        circuit = self._circuits.get(extension_id) or _Circuit(extension_id, self.config)
        if circuit.state is CLOSED and circuit.bucket is not None:
            now = self._clock()
            if now >= circuit.bucket_end:
                circuit.advance(now)
        opened = circuit.opened_wall if circuit.state is not CLOSED else None
        return CircuitSnapshot(
            extension_id=extension_id,
            state=state,
            consecutive_failures=circuit.consecutive,
            window_calls=circuit.sum_calls + circuit.cur_calls,
            window_failures=circuit.sum_failures + circuit.cur_failures,
            window_slow_calls=circuit.sum_slow + circuit.cur_slow,
            half_open_admitted=circuit.admitted if state is HALF_OPEN else 0,
            opened_at=None if opened is None else datetime.fromtimestamp(opened, UTC),
            open_reason=circuit.open_reason if state is not CLOSED else None,
            forced=circuit.forced,
            config=circuit.config,
        )

    def snapshots(self) -> dict[str, CircuitSnapshot]:
        return {extension_id: self.snapshot(extension_id) for extension_id in self._circuits}

    # -- configuration, manual control, callbacks --------------------------------------------

    def configure(self, extension_id: str, metadata: Mapping[str, Any]) -> BreakerConfig:
        """Apply an extension's metadata overrides (none: the defaults); return its config.

        Raises InvalidRecord naming each bad metadata field. A changed window starts empty;
        the state and the failure streak are kept otherwise.
        """
        values, problems = _read_overrides(metadata)
        if problems:
            raise InvalidRecord(extension_id, problems)
        config = replace(self.config, **values) if values else self.config
        circuit = self._circuits.get(extension_id) or self._add(extension_id)
        circuit.set_config(config)
        return config

    def force_open(self, extension_id: str) -> State:
        """Open the circuit and keep it open until `force_close` or `reset`; its versions'
        circuits too (and those made later, see `_add`): an operator's stop stops every call.

        Raises `Conflict` when breakers are off: nothing would enforce the state.
        """
        self._require_enabled()
        circuit = self._circuits.get(extension_id) or self._add(extension_id)
        for each in [circuit, *self._versions_of(extension_id)]:
            each.forced = True
            self._open(each, self._clock(), "opened by an operator")
        return circuit.state

    def force_close(self, extension_id: str) -> State:
        """Close the circuit and clear its counters (same effect as `reset`)."""
        return self.reset(extension_id)

    def reset(self, extension_id: str) -> State:
        """Back to a fresh closed circuit: no streak, an empty window; the config is kept.
        Its versions' circuits too.

        Raises `Conflict` when breakers are off.
        """
        self._require_enabled()
        circuit = self._circuits.get(extension_id) or self._add(extension_id)
        for each in [circuit, *self._versions_of(extension_id)]:
            each.forced = False
            self._close(each)
        return circuit.state

    def remove(self, extension_id: str) -> None:
        """Forget an extension (it was deleted); no callback is called."""
        self._circuits.pop(extension_id, None)

    def on_state_change(self, callback: StateCallback) -> None:
        """Call `callback(extension_id, old, new)` synchronously on every transition.

        An exception from a callback is logged and swallowed: a listener cannot break a call.
        """
        self._callbacks.append(callback)

    # -- transitions (the slow path) ---------------------------------------------------------

    def _require_enabled(self) -> None:
        if self._disabled:
            raise Conflict(ENABLE_HINT)

    def _add(self, key: str) -> _Circuit:
        circuit = self._circuits[key] = _Circuit(key, self.config)
        extension_id, version = split_circuit(key)
        owner = self._circuits.get(extension_id) if version is not None else None
        if owner is not None and owner.forced:  # a version first called while its
            circuit.forced = True  # extension is held open by an operator
            self._open(circuit, self._clock(), "opened by an operator")
        return circuit

    def _versions_of(self, extension_id: str) -> list[_Circuit]:
        prefix = extension_id + VERSION_SEPARATOR
        return [c for key, c in self._circuits.items() if key.startswith(prefix)]

    def _admit(self, circuit: _Circuit) -> None:
        now = self._clock()
        if circuit.state is OPEN:
            if circuit.forced:
                raise _refusal(circuit, "was opened by an operator")
            remaining = circuit.config.timeout_seconds - (now - circuit.opened_at)
            if remaining > 0:
                raise _refusal(
                    circuit, f"is open ({circuit.open_reason}); retry in {remaining:.1f}s"
                )
            self._half_open(circuit, now)
        config = circuit.config
        if circuit.admitted and now - circuit.half_open_since >= config.timeout_seconds:
            circuit.half_open_since = now  # the last trials never reported: a new round
            circuit.admitted = 0
        if circuit.admitted >= config.half_open_max_requests:
            raise _refusal(
                circuit,
                f"is half-open and its {config.half_open_max_requests} trial call(s) are in flight",
            )
        circuit.admitted += 1

    def _record_slow(self, circuit: _Circuit, now: float) -> None:
        """Count a slow success of a closed circuit (already counted as a call) and apply the
        slow-call rule; kept apart so the common success stays short."""
        circuit.cur_slow += 1
        config = circuit.config
        calls = circuit.sum_calls + circuit.cur_calls
        if calls >= config.min_calls:
            slow = circuit.sum_slow + circuit.cur_slow
            if slow / calls >= config.slow_call_rate_threshold:
                reason = (
                    f"{slow} of {calls} calls were slower than {config.slow_call_duration_ms} ms "
                    "in the window"
                )
                self._open(circuit, now, reason)

    def _open(self, circuit: _Circuit, now: float, reason: str) -> None:
        circuit.opened_at = now
        circuit.opened_wall = self._wall_clock()
        circuit.open_reason = reason
        circuit.admitted = 0
        circuit.clear_counts()
        self._transition(circuit, OPEN)

    def _half_open(self, circuit: _Circuit, now: float) -> None:
        circuit.half_open_since = now
        circuit.admitted = 0
        self._transition(circuit, HALF_OPEN)

    def _close(self, circuit: _Circuit) -> None:
        circuit.admitted = 0
        circuit.open_reason = None
        circuit.clear_counts()
        self._transition(circuit, CLOSED)

    def _transition(self, circuit: _Circuit, new: State) -> None:
        old = circuit.state
        if old is new:
            return
        circuit.state = new
        for callback in self._callbacks:
            try:
                callback(circuit.extension_id, old, new)
            except Exception:  # a listener's bug must not fail the call that moved the state
                log.exception(
                    "circuit_callback_failed",
                    extension_id=circuit.extension_id,
                    old_state=old,
                    new_state=new,
                )


def _refusal(circuit: _Circuit, what: str) -> CircuitOpen:
    """The `CircuitOpen` of a refused call: for the extension (never a circuit key), its
    reason naming the version whose circuit refused, if it was a version's."""
    extension_id, version = split_circuit(circuit.extension_id)
    whose = "circuit breaker" if version is None else f"version {version}'s circuit breaker"
    return CircuitOpen(extension_id, f"{whose} {what}", 0)
