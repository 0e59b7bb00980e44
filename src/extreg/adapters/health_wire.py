"""The wire form of a `HealthBatch`: JSON bytes a node can send over NATS.

Why it exists: a node without a database connection still measures the calls it makes, and
its health must reach `extension_health` like everyone else's. It sends each batch, as built
by its `HealthFlusher`, to a node that has the connection, which decodes it and writes it with
`PostgresSource.update_health`, exactly as if the batch had been written where it was made.
Exactly once survives the trip unchanged: the batch keeps its sender's `(node_id, seq)`, and
the writer's claim on `extreg_health_nodes` skips a batch applied before (see
`extreg.invoke.health_store` and `extreg.adapters.postgres_health`), so a resent or
duplicated message counts nothing twice.

The bytes come from the network, so nothing here is pickled: explicit msgspec Structs say what
may arrive, and `decode_batch` checks every field before anything is built. It refuses, with
`InvalidRecord` (kind `health batch`, naming each field at fault), anything the writer could
not store or that would fail its transaction on every retry: a negative count, a number past
its column, a naive time, an interval start off the interval grid, a circuit state the
database cannot hold, an id longer than its column or holding a NUL, a sketch of another
accuracy (it would not merge with the stored one) or with keys past `MAX_LATENCY_MS` (its
percentiles would not fit their columns, and merging it could allocate without bound), a
latency sum more than `MAX_LATENCY_MS` per call, or one id twice. Sketches travel in the one portable form the database stores them in
(`core.health.sketch_to_dict` / `sketch_from_dict`); the Struct only types that form. Times
are RFC 3339 strings with their offset; floats are written so they read back bit for bit.

`FORMAT` numbers the wire form; a receiver refuses a format it does not know rather than
guess. `sealed` travels as the sender had it (the receiver only writes the batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from datetime import datetime
from typing import Annotated, Final, Literal, cast

import msgspec
from ddsketch import DDSketch, LogarithmicMapping

from ..core.breaker import BreakerConfig, CircuitSnapshot, State
from ..core.health import RELATIVE_ACCURACY, HealthDelta, Transition
from ..core.health import sketch_from_dict as _sketch_from_dict
from ..core.health import sketch_to_dict as _sketch_to_dict
from ..core.intervals import INTERVAL_S, Bucket
from ..errors import InvalidRecord, printable
from .postgres_health import HealthBatch

__all__ = ["FORMAT", "KIND", "MAX_LATENCY_MS", "decode_batch", "encode_batch"]

FORMAT: Final = 1
KIND: Final = "health batch"  # the `kind` of the InvalidRecord that `decode_batch` raises

# Bounds no real batch comes near, so that nothing decoded can fail the writer's transaction:
_MAX_EPOCH = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a datetime can hold
_MAX_EXACT = 2**53  # counts and milliseconds: sums stay exact and inside bigint columns
_MAX_INT4 = 2**31 - 1  # integer columns: thresholds, half-open counts
# One call's latency (27.5 hours): the numeric(10, 2) columns (average, p50/p95/p99) hold less
# than 1e8, and a sketch reads a value back up to 1 % high.
MAX_LATENCY_MS: Final = 99_000_000.0
_MAPPING = LogarithmicMapping(RELATIVE_ACCURACY)  # DDSketch's default: the keys it can make
_KEYS = (_MAPPING.key(_MAPPING.min_possible), _MAPPING.key(MAX_LATENCY_MS))

Count = Annotated[int, msgspec.Meta(ge=0, le=_MAX_EXACT)]
Millis = Annotated[float, msgspec.Meta(ge=0, le=_MAX_EXACT)]  # a sum of latencies
Latency = Annotated[float, msgspec.Meta(ge=0, le=MAX_LATENCY_MS)]  # one call's
Weight = Annotated[float, msgspec.Meta(ge=0, le=_MAX_EXACT)]  # a sketch's count of values
Int4 = Annotated[int, msgspec.Meta(le=_MAX_INT4)]
Moment = Annotated[datetime, msgspec.Meta(tz=True)]
# varchar(255) columns, which hold no NUL (nor does jsonb)
Id = Annotated[str, msgspec.Meta(min_length=1, max_length=255, pattern="^[^\x00]+$")]
IntervalStart = Annotated[int, msgspec.Meta(ge=0, le=_MAX_EPOCH, multiple_of=INTERVAL_S)]
Epoch = Annotated[float, msgspec.Meta(ge=0, le=_MAX_EPOCH)]
Problems = list[tuple[str, str]]  # (where, what), as InvalidRecord takes them
_SHOWN = 200  # characters of a message quoting what arrived


class _Wire(msgspec.Struct, forbid_unknown_fields=True, omit_defaults=True):
    """Base of the wire Structs: a field nobody knows is an error, not silently dropped."""


class WireSketch(_Wire):
    """`core.health.sketch_to_dict`'s form, typed (the sketch itself is built by
    `sketch_from_dict`, the database's reader)."""

    relative_accuracy: float
    offset: int
    bins: list[Weight]
    zero_count: Weight
    count: Weight
    sum: Annotated[float, msgspec.Meta(ge=0)]  # of latencies: never negative
    min: Latency | None = None
    max: Latency | None = None


class WireBucket(_Wire):
    """One interval of a delta (`core.intervals.Bucket`) with its start."""

    start: IntervalStart
    successes: Count
    failures: Count
    latency_sum_ms: Millis
    sketch: WireSketch


class WireDelta(_Wire):
    """A `core.health.HealthDelta`."""

    extension_id: Id
    success_count: Count
    failure_count: Count
    latency_sum_ms: Millis
    sketch: WireSketch
    last_latency_ms: Latency | None = None
    last_success: Moment | None = None
    last_failure: Moment | None = None
    intervals: list[WireBucket] = []


class WireConfig(_Wire):
    """A `core.breaker.BreakerConfig` (checked again by its own constructor)."""

    enabled: bool
    failure_threshold: Int4
    timeout_seconds: float
    half_open_max_requests: Int4
    error_rate_threshold: float
    window_seconds: Annotated[float, msgspec.Meta(le=2**30)]  # rounded into an integer column
    min_calls: int
    slow_call_duration_ms: int
    slow_call_rate_threshold: float


class WireCircuit(_Wire):
    """A `core.breaker.CircuitSnapshot`. Its state is one the database can hold: never
    `disabled` (with breakers off the flusher sends no circuit)."""

    extension_id: Id
    state: State
    consecutive_failures: Count
    window_calls: Count
    window_failures: Count
    window_slow_calls: Count
    half_open_admitted: Annotated[int, msgspec.Meta(ge=0, le=_MAX_INT4)]
    forced: bool
    config: WireConfig
    opened_at: Moment | None = None
    open_reason: str | None = None


class WireTransition(_Wire):
    """A `core.health.Transition`."""

    at: Epoch
    extension_id: Id
    state: State


class WireBatch(_Wire):
    """A `postgres_health.HealthBatch`; `format` first, so a reader sees it before the rest."""

    format: Literal[1]
    node_id: Id
    seq: Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]  # a bigint
    sealed: bool = False
    deltas: list[WireDelta] = []
    circuits: list[WireCircuit] = []
    transitions: list[WireTransition] = []


class _Label(msgspec.Struct):
    """What names a batch in an error, read leniently from bytes that failed to decode."""

    node_id: str = "?"
    seq: int | str = "?"


_ENCODER = msgspec.json.Encoder()
_DECODER = msgspec.json.Decoder(WireBatch)
_LABEL_DECODER = msgspec.json.Decoder(_Label)


def encode_batch(batch: HealthBatch) -> bytes:
    """`batch` as JSON bytes for `decode_batch` on another node."""
    wire = WireBatch(
        format=FORMAT,
        node_id=batch.node_id,
        seq=batch.seq,
        sealed=batch.sealed,
        deltas=[_wire_delta(d) for d in batch.deltas.values()],
        circuits=[_wire_circuit(c) for c in batch.circuits.values()],
        transitions=[
            WireTransition(t.at, t.extension_id, cast(State, t.state)) for t in batch.transitions
        ],
    )
    return _ENCODER.encode(wire)


def decode_batch(data: bytes) -> HealthBatch:
    """The batch `encode_batch` made. Raises `InvalidRecord` (kind `health batch`) naming
    what is wrong, where (`$.deltas[0].success_count`), when `data` is not such a batch."""
    try:
        wire = _DECODER.decode(data)
    except msgspec.MsgspecError as exc:  # not JSON (DecodeError), or not a batch
        raise InvalidRecord(_label(data), [_problem(exc)], KIND) from None
    problems: Problems = []
    batch = HealthBatch(wire.node_id, wire.seq, sealed=wire.sealed)
    _unique(problems, "$.deltas", (d.extension_id for d in wire.deltas))
    for i, item in enumerate(wire.deltas):
        delta = _delta(item, f"$.deltas[{i}]", problems)
        if delta is not None:
            batch.deltas[delta.extension_id] = delta
    _unique(problems, "$.circuits", (c.extension_id for c in wire.circuits))
    for i, circuit in enumerate(wire.circuits):
        snapshot = _circuit(circuit, f"$.circuits[{i}]", problems)
        if snapshot is not None:
            batch.circuits[snapshot.extension_id] = snapshot
    batch.transitions = [Transition(t.at, t.extension_id, t.state) for t in wire.transitions]
    if problems:
        raise InvalidRecord(f"{wire.node_id} #{wire.seq}", problems, KIND)
    return batch


# -- to the wire -------------------------------------------------------------------------------


def _wire_sketch(sketch: DDSketch) -> WireSketch:
    return WireSketch(**_sketch_to_dict(sketch))


def _wire_delta(delta: HealthDelta) -> WireDelta:
    return WireDelta(
        extension_id=delta.extension_id,
        success_count=delta.success_count,
        failure_count=delta.failure_count,
        latency_sum_ms=delta.latency_sum_ms,
        sketch=_wire_sketch(delta.sketch),
        last_latency_ms=delta.last_latency_ms,
        last_success=delta.last_success,
        last_failure=delta.last_failure,
        intervals=[
            WireBucket(
                start=start,
                successes=bucket.successes,
                failures=bucket.failures,
                latency_sum_ms=bucket.latency_sum_ms,
                sketch=_wire_sketch(bucket.sketch),
            )
            for start, bucket in delta.intervals.items()
        ],
    )


def _wire_circuit(snapshot: CircuitSnapshot) -> WireCircuit:
    return WireCircuit(
        extension_id=snapshot.extension_id,
        state=cast(State, snapshot.state),  # `disabled` would be refused on arrival
        consecutive_failures=snapshot.consecutive_failures,
        window_calls=snapshot.window_calls,
        window_failures=snapshot.window_failures,
        window_slow_calls=snapshot.window_slow_calls,
        half_open_admitted=snapshot.half_open_admitted,
        forced=snapshot.forced,
        config=WireConfig(**dataclasses.asdict(snapshot.config)),
        opened_at=snapshot.opened_at,
        open_reason=snapshot.open_reason,
    )


# -- from the wire -----------------------------------------------------------------------------


def _problem(exc: msgspec.MsgspecError) -> tuple[str, str]:
    """(where, what) of a msgspec error: `Expected ... - at `$.seq`` names its place. The
    message may quote what arrived, so it is made printable and cut short."""
    message, at, where = str(exc).rpartition(" - at `")
    if not at:
        message, where = str(exc), "$`"
    return where.removesuffix("`"), printable(message, _SHOWN)


def _sketch(wire: WireSketch, where: str, problems: Problems) -> DDSketch | None:
    if wire.relative_accuracy != RELATIVE_ACCURACY:
        problems.append(
            (
                f"{where}.relative_accuracy",
                f"must be {RELATIVE_ACCURACY} (got {wire.relative_accuracy!r}): a sketch "
                "of another accuracy does not merge with the stored ones",
            )
        )
        return None
    low, high = _KEYS
    if wire.bins and not low <= wire.offset <= wire.offset + len(wire.bins) - 1 <= high:
        problems.append(
            (
                f"{where}.offset",
                f"bins {wire.offset}..{wire.offset + len(wire.bins) - 1} reach past the keys "
                f"a sketch can have ({low}..{high})",
            )
        )
        return None
    try:
        return _sketch_from_dict(msgspec.structs.asdict(wire))
    except ValueError as exc:
        problems.append((where, str(exc)))
        return None


def _delta(wire: WireDelta, where: str, problems: Problems) -> HealthDelta | None:
    found = len(problems)
    _latency_sum(wire.success_count + wire.failure_count, wire.latency_sum_ms, where, problems)
    sketch = _sketch(wire.sketch, f"{where}.sketch", problems)
    _unique(problems, f"{where}.intervals", (b.start for b in wire.intervals))
    intervals: dict[int, Bucket] = {}
    for i, item in enumerate(wire.intervals):
        at = f"{where}.intervals[{i}]"
        _latency_sum(item.successes + item.failures, item.latency_sum_ms, at, problems)
        bucket_sketch = _sketch(item.sketch, f"{at}.sketch", problems)
        if bucket_sketch is not None:
            bucket = Bucket(item.successes, item.failures, item.latency_sum_ms, bucket_sketch)
            intervals[item.start] = bucket
    if sketch is None or len(problems) > found:
        return None
    return HealthDelta(
        extension_id=wire.extension_id,
        success_count=wire.success_count,
        failure_count=wire.failure_count,
        latency_sum_ms=wire.latency_sum_ms,
        sketch=sketch,
        last_latency_ms=wire.last_latency_ms,
        last_success=wire.last_success,
        last_failure=wire.last_failure,
        intervals=intervals,
    )


def _latency_sum(calls: int, latency_sum_ms: float, where: str, problems: Problems) -> None:
    if latency_sum_ms > calls * MAX_LATENCY_MS:
        problems.append(
            (
                f"{where}.latency_sum_ms",
                f"{latency_sum_ms!r} ms for {calls} calls: more than {MAX_LATENCY_MS:.0f} ms "
                "a call",
            )
        )


def _circuit(wire: WireCircuit, where: str, problems: Problems) -> CircuitSnapshot | None:
    try:
        config = BreakerConfig(**msgspec.structs.asdict(wire.config))
    except ValueError as exc:
        problems.append((f"{where}.config", str(exc)))
        return None
    return CircuitSnapshot(
        extension_id=wire.extension_id,
        state=wire.state,
        consecutive_failures=wire.consecutive_failures,
        window_calls=wire.window_calls,
        window_failures=wire.window_failures,
        window_slow_calls=wire.window_slow_calls,
        half_open_admitted=wire.half_open_admitted,
        opened_at=wire.opened_at,
        open_reason=wire.open_reason,
        forced=wire.forced,
        config=config,
    )


def _unique(problems: Problems, where: str, keys: Iterable[object]) -> None:
    seen: set[object] = set()
    for key in keys:
        if key in seen:
            problems.append((where, f"{key!r} appears more than once"))
        seen.add(key)


def _label(data: bytes) -> str:
    """`node #seq` of bytes that did not decode, as far as they tell."""
    try:
        label = _LABEL_DECODER.decode(data)
    except msgspec.MsgspecError:
        return "?"
    return f"{label.node_id} #{label.seq}"
