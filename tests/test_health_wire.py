"""The wire form of health batches (`extreg.adapters.health_wire`): what a node without a
database sends over NATS must write, on the node that has one, exactly what it would have
written itself.

Batches are built as `HealthFlusher._file` builds them, from the real classes: calls go through
`CircuitBreakers` (check, then record) and `HealthMonitor.record`; each flush drains the
monitor, takes `CircuitBreakers.snapshot` of the circuits that moved or were called, and
absorbs all of it into the open batch (or a new one once the last is sealed). Random
transitions are added on top. Properties: the decoded batch equals the original field by field
(sketches by their form, counts, sums and quantiles; intervals bucket by bucket) and encodes to
the same bytes; written through `PostgresSource.update_health` into a second fresh database it
leaves the same rows as the original in the first; malformed bytes raise `InvalidRecord` (kind
`health batch`) naming the field, and whatever decodes can be written.
"""

from __future__ import annotations

import asyncio
import copy
import json
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import psycopg
import pytest
from ddsketch import DDSketch
from helpers import make_settings, record
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from extreg.adapters import postgres_health
from extreg.adapters.health_wire import (
    KIND,
    MAX_LATENCY_MS,
    WireBatch,
    WireBucket,
    WireCircuit,
    WireConfig,
    WireDelta,
    WireSketch,
    WireTransition,
    decode_batch,
    encode_batch,
)
from extreg.adapters.migrate import migrate
from extreg.adapters.postgres import PostgresSource
from extreg.adapters.postgres_health import HealthBatch, HealthRow
from extreg.core.breaker import BreakerConfig, CircuitBreakers, CircuitSnapshot
from extreg.core.health import HealthDelta, HealthMonitor, Transition, sketch_to_dict
from extreg.core.intervals import Bucket
from extreg.core.model import parse_extension
from extreg.errors import CircuitOpen, InvalidRecord
from testsupport.pgprocess import PostgresProcess

T0 = 1_700_000_000.0
EXTENSIONS = [f"ext-{i:02d}" for i in range(20)]
GHOST = "ghost"  # measured, but without a row in `extensions`: the writer drops its numbers
STATES = ("closed", "open", "half_open")
QUANTILES = (0.0, 0.01, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 1.0)

# -- batches as the flusher builds them ---------------------------------------------------------


class Node:
    """One node's measuring side as the invoker wires it (breakers, a monitor on them, one
    clock), filing batches as `HealthFlusher._file` does."""

    def __init__(self, node_id: str, config: BreakerConfig, start: float = T0) -> None:
        self.now = start
        self.node_id = node_id
        self.breakers = CircuitBreakers(config, clock=self.clock, wall_clock=self.clock)
        self.monitor = HealthMonitor(self.breakers, clock=self.clock)
        self.batches: list[HealthBatch] = []
        self._seq = 0
        self._dirty: set[str] = set()
        self.breakers.on_state_change(lambda key, old, new: self._dirty.add(key))

    def clock(self) -> float:
        return self.now

    def call(self, extension_id: str, ok: bool, latency_ms: float, after_s: float) -> None:
        """One invocation `after_s` seconds after the previous one (refused if open)."""
        self.now += after_s
        try:
            self.breakers.check_circuit(extension_id)
        except CircuitOpen:
            return
        if ok:
            self.breakers.record_success(extension_id, max(latency_ms, 0.0) / 1000)
        else:
            self.breakers.record_failure(extension_id)
        self.monitor.record(extension_id, ok, latency_ms)

    def file(self, extra: Iterable[Transition] = (), *, seal: bool = False) -> None:
        """One flush's filing; `seal` then marks the batch as the writer marks it at the
        commit (so the next filing starts a new batch)."""
        deltas = self.monitor.drain_deltas()
        ids = self._dirty.union(d.extension_id for d in deltas)
        self._dirty.clear()
        circuits = {i: self.breakers.snapshot(i) for i in ids}
        transitions = [*self.monitor.drain_transitions(), *extra]
        if deltas or circuits or transitions:
            batch = self.batches[-1] if self.batches else None
            if batch is None or batch.sealed:
                self._seq += 1
                batch = HealthBatch(self.node_id, self._seq)
                self.batches.append(batch)
            batch.absorb(deltas, circuits, transitions)
        if seal and self.batches:
            self.batches[-1].sealed = True


@dataclass
class Round:
    """Between two flushes: calls (`("call", id, ok, ms, after_s)`) and operator actions
    (`("force_open" | "reset", id)`), random transitions filed with them, whether the writer
    reached the commit of the batch afterwards, and a quiet pause before the flush."""

    ops: list[tuple[Any, ...]]
    transitions: list[Transition] = field(default_factory=list)
    seal: bool = False
    pause_s: float = 0.0  # before the flush: an open circuit may turn half-open meanwhile


def play(node: Node, rounds: Iterable[Round]) -> list[HealthBatch]:
    for each in rounds:
        for op in each.ops:
            if op[0] == "call":
                node.call(*op[1:])
            elif op[0] == "force_open":
                node.breakers.force_open(op[1])
            else:
                node.breakers.reset(op[1])
        node.now += each.pause_s
        node.file(each.transitions, seal=each.seal)
    return node.batches


IDS = st.sampled_from(["ext-00", "ext-01", "ext-02", "a.b_c-9"])
LATENCIES = st.one_of(
    st.floats(0, 120_000, allow_nan=False),
    st.floats(0.5, 500, allow_nan=False),
    st.sampled_from([0.0, -3.0, 1e-12, 0.1, 60_000.0]),
)
CALLS = st.tuples(st.just("call"), IDS, st.booleans(), LATENCIES, st.floats(0, 8))
CONTROLS = st.tuples(st.sampled_from(["force_open", "reset"]), IDS)
TRANSITIONS = st.builds(
    Transition, at=st.floats(0, 4e9), extension_id=IDS, state=st.sampled_from(STATES)
)
ROUNDS = st.builds(
    Round,
    ops=st.lists(st.one_of(*[CALLS] * 8, CONTROLS), max_size=40),
    transitions=st.lists(TRANSITIONS, max_size=3),
    seal=st.booleans(),
    pause_s=st.floats(0, 30),
)
CONFIGS = st.builds(
    BreakerConfig,
    enabled=st.just(True),
    failure_threshold=st.integers(1, 5),
    timeout_seconds=st.floats(0.5, 20),
    half_open_max_requests=st.integers(1, 3),
    error_rate_threshold=st.floats(0.1, 1),
    window_seconds=st.floats(1, 120),
    min_calls=st.integers(1, 10),
    slow_call_duration_ms=st.integers(0, 300),
    slow_call_rate_threshold=st.floats(0.1, 1),
)
NODE_IDS = st.text(
    st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), min_size=1, max_size=60
)


@st.composite
def batches(draw: st.DrawFn) -> list[HealthBatch]:
    node = Node(draw(NODE_IDS), draw(CONFIGS), start=draw(st.floats(T0, T0 + 1e6)))
    return play(node, draw(st.lists(ROUNDS, min_size=1, max_size=4)))


# -- comparing what a batch writes --------------------------------------------------------------


def sketch_view(sketch: DDSketch) -> tuple[Any, ...]:
    """Everything a sketch tells: its stored form, count, sum and quantiles."""
    return (
        sketch_to_dict(sketch),
        sketch.count,
        sketch.sum,
        [sketch.get_quantile_value(q) for q in QUANTILES],
    )


def bucket_view(bucket: Bucket) -> tuple[Any, ...]:
    return (bucket.successes, bucket.failures, bucket.latency_sum_ms, sketch_view(bucket.sketch))


def delta_view(delta: HealthDelta) -> dict[str, Any]:
    """Every field of the delta (a new one is compared too), sketches and buckets opened."""
    view = {f.name: getattr(delta, f.name) for f in fields(HealthDelta)}
    view["sketch"] = sketch_view(delta.sketch)
    view["intervals"] = {start: bucket_view(b) for start, b in delta.intervals.items()}
    return view


def batch_view(batch: HealthBatch) -> dict[str, Any]:
    view = {f.name: getattr(batch, f.name) for f in fields(HealthBatch)}
    view["deltas"] = {key: delta_view(d) for key, d in batch.deltas.items()}
    return view  # circuits: CircuitSnapshot (and its config) compare field by field


def row_view(row: HealthRow) -> dict[str, Any]:
    view = {f.name: getattr(row, f.name) for f in fields(HealthRow)}
    view["totals"] = delta_view(row.totals)
    del view["updated_at"]  # the writing transaction's now()
    return view


# -- the round trip -----------------------------------------------------------------------------


@settings(deadline=None)
@given(batches())
def test_decoded_batch_is_the_batch_sent(sent: list[HealthBatch]) -> None:
    for batch in sent:
        data = encode_batch(batch)
        got = decode_batch(data)
        assert batch_view(batch) == batch_view(got)
        for key, delta in batch.deltas.items():
            assert list(delta.intervals) == list(got.deltas[key].intervals)
        assert data == encode_batch(got)


def test_wire_structs_carry_every_field() -> None:
    """A field added to a batch, a delta, a circuit, a transition or the sketch's form must be
    added to the wire form too, or this fails (instead of the field being lost on the way)."""

    def names(cls: type) -> set[str]:
        return set(getattr(cls, "__struct_fields__", ()))

    assert {f.name for f in fields(HealthBatch)} | {"format"} == names(WireBatch)
    assert {f.name for f in fields(HealthDelta)} == names(WireDelta)
    assert set(Bucket.__slots__) | {"start"} == names(WireBucket)
    assert {f.name for f in fields(CircuitSnapshot)} == names(WireCircuit)
    assert {f.name for f in fields(BreakerConfig)} == names(WireConfig)
    assert set(Transition._fields) == names(WireTransition)
    node = Node("n", BreakerConfig(enabled=True))
    node.call("x", True, 12.0, 0.0)
    assert set(sketch_to_dict(node.monitor.intervals("x")[1_700_000_000].sketch)) == names(
        WireSketch
    )


def test_sealed_travels_as_sent() -> None:
    """The receiver only writes the batch: `sealed` arrives as the sender had it."""
    node = Node("n", BreakerConfig(enabled=True))
    calls = [("call", "x", True, 5.0, 1.0)]
    sent = play(node, [Round(calls, seal=True), Round(calls, seal=False)])
    assert [True, False] == [decode_batch(encode_batch(b)).sealed for b in sent]


# -- through PostgreSQL -------------------------------------------------------------------------


def busy_node(node_id: str, seed: int, start: float) -> Node:
    """A node calling the 20 extensions (and the ghost) for a while: per extension its own
    failure rate and latency spread; circuits open, half-open and close, one is forced."""
    rng = random.Random(seed)
    config = BreakerConfig(
        enabled=True, failure_threshold=3, timeout_seconds=5.0, min_calls=5, window_seconds=30
    )
    node = Node(node_id, config, start)
    rounds = []
    for number in range(4):
        ops: list[tuple[Any, ...]] = []
        for _ in range(300):
            i = rng.randrange(len(EXTENSIONS) + 1)
            ext = EXTENSIONS[i] if i < len(EXTENSIONS) else GHOST
            ok = rng.random() >= i / 30
            ops.append(("call", ext, ok, rng.lognormvariate(2 + i / 5, 0.8), rng.random() / 20))
        if number == 1:
            ops.append(("force_open", EXTENSIONS[3]))
        if number == 3:
            ops.append(("reset", EXTENSIONS[3]))
        extra = [Transition(start + number, GHOST, "open")] if number == 2 else []
        # Round 1 is not sealed: round 2 grows the same batch, as during an outage.
        rounds.append(Round(ops, extra, seal=number != 1))
    play(node, rounds)
    return node


def dump(url: str) -> dict[str, list[Any]]:
    """Every health row the writer touches, minus the columns holding the write's now()."""
    queries = {
        "health": "SELECT to_jsonb(h) - 'updated_at' - 'latency_samples_window_start'"
        " FROM extension_health h ORDER BY extension_id",
        "intervals": "SELECT to_jsonb(i) FROM extension_health_intervals i"
        " ORDER BY extension_id, interval_start",
        "events": "SELECT to_jsonb(e) FROM extreg_circuit_events e"
        " ORDER BY extension_id, at, state, node_id",
        "nodes": "SELECT node_id, last_seq FROM extreg_health_nodes ORDER BY node_id",
    }
    with psycopg.connect(url, autocommit=True) as conn:
        return {name: conn.execute(sql).fetchall() for name, sql in queries.items()}


def source(tmp_path: Path, url: str) -> PostgresSource:
    return PostgresSource(make_settings(tmp_path, source="database", database_url=url))


async def test_decoded_batches_write_the_same_rows(
    db_url: str, pg_server: PostgresProcess, tmp_path: Path
) -> None:
    """Two nodes' batches written as they are into one fresh database, and decoded from their
    bytes into another: the same rows, the same answers (applied, or applied before)."""
    other_url = pg_server.create_database(f"wire_{uuid.uuid4().hex[:12]}")
    migrate(other_url)
    a, b = busy_node("node-a", 1, T0), busy_node("node-b", 2, T0 + 3)
    sent = [x for pair in zip(a.batches, b.batches, strict=False) for x in pair]
    assert len(a.batches) == len(b.batches) == 3 and len(sent) == 6
    records = [
        parse_extension(record(e), max_timeout_ms=60_000, max_retries=10) for e in EXTENSIONS
    ]
    async with source(tmp_path, db_url) as here, source(tmp_path, other_url) as there:
        for db in (here, there):
            await db.import_extensions(records, "test")
        resend = encode_batch(sent[2])  # sealed: a retry after a lost commit outcome
        for batch in sent:
            data = encode_batch(batch)  # before the write, which seals the batch
            arrived = decode_batch(data)
            assert (True, True) == (
                await here.update_health(batch),
                await there.update_health(arrived),
            )
        assert (False, False) == (
            await here.update_health(decode_batch(resend)),
            await there.update_health(decode_batch(resend)),
        )
        _, rows_here = await here.read_health(None, recent_since=0.0)
        _, rows_there = await there.read_health(None, recent_since=0.0)
    assert [row_view(r) for r in rows_here] == [row_view(r) for r in rows_there]
    assert EXTENSIONS == [r.totals.extension_id for r in rows_here]
    assert {"open", "closed"} <= {r.circuit_breaker_state for r in rows_here}
    calls = sum(r.totals.calls for r in rows_here)
    assert calls == sum(b.calls for b in sent) - sum(
        b.deltas[GHOST].calls for b in sent if GHOST in b.deltas
    )
    written = dump(db_url)
    assert written == dump(other_url)
    assert written["intervals"] and written["events"]
    assert any(e[0]["extension_id"] == GHOST for e in written["events"])


# -- what the receiver refuses ------------------------------------------------------------------


def sample() -> dict[str, Any]:
    """A valid batch as decoded JSON: two extensions, intervals, circuits, transitions."""
    node = Node("node-a", BreakerConfig(enabled=True, failure_threshold=2))
    play(
        node,
        [
            Round(
                [
                    ("call", "ext-00", True, 12.5, 0.0),
                    ("call", "ext-00", True, 30.0, 11.0),
                    ("call", "ext-01", False, 80.0, 0.5),
                    ("call", "ext-01", False, 90.0, 0.5),
                ],
                [Transition(T0 + 5, "ext-00", "half_open")],
            )
        ],
    )
    (batch,) = node.batches
    doc: dict[str, Any] = json.loads(encode_batch(batch))
    assert len(doc["deltas"][0]["intervals"]) == 2 and doc["circuits"] and doc["transitions"]
    return doc


Mutation = Callable[[dict[str, Any]], None]


def setter(path: str, value: Any) -> Mutation:
    """Set `path` (dotted, numbers index lists) of the document to `value`."""

    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = doc
        for part in parents:
            target = target[part]
        target[last] = value

    return mutate


def dropped(key: str) -> Mutation:
    return lambda doc: doc.pop(key)


def twice(path: str) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        target: Any = doc
        for part in path.split("."):
            target = target[int(part) if part.isdigit() else part]
        target.append(copy.deepcopy(target[0]))

    return mutate


def bumped(path: str, by: float) -> Mutation:
    def mutate(doc: dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
        target: Any = doc
        for part in parents:
            target = target[part]
        target[last] += by

    return mutate


D0, S0, I0 = "deltas.0", "deltas.0.sketch", "deltas.0.intervals.0"
MALFORMED: list[tuple[str, bytes | Mutation, str, str]] = [
    ("pickle", b"\x80\x04\x95\x10\x00\x00\x00", "$", "JSON is malformed"),
    ("empty", b"", "$", "truncated"),
    ("array", b"[]", "$", "Expected `object`, got `array`"),
    ("format", setter("format", 2), "$.format", "Invalid enum value 2"),
    ("no node", dropped("node_id"), "$", "missing required field `node_id`"),
    ("unknown field", setter("priority", 1), "$", "unknown field `priority`"),
    ("seq as text", setter("seq", "3"), "$.seq", "Expected `int`, got `str`"),
    ("seq zero", setter("seq", 0), "$.seq", "Expected `int` >= 1"),
    ("node NUL", setter("node_id", "a\x00b"), "$.node_id", "matching regex"),
    ("node too long", setter("node_id", "n" * 256), "$.node_id", "length <= 255"),
    ("empty id", setter(f"{D0}.extension_id", ""), "$.deltas[0].extension_id", "length >= 1"),
    (
        "negative count",
        setter(f"{D0}.success_count", -1),
        "$.deltas[0].success_count",
        "Expected `int` >= 0",
    ),
    ("bool count", setter(f"{D0}.failure_count", True), "$.deltas[0].failure_count", "`bool`"),
    (
        "negative interval count",
        setter(f"{I0}.failures", -2),
        "$.deltas[0].intervals[0].failures",
        ">= 0",
    ),
    (
        "negative latency",
        setter(f"{D0}.latency_sum_ms", -0.5),
        "$.deltas[0].latency_sum_ms",
        ">= 0",
    ),
    (
        "latency sum past its calls",
        setter(f"{D0}.latency_sum_ms", 3 * MAX_LATENCY_MS),
        "$.deltas[0].latency_sum_ms",
        "ms for 2 calls",
    ),
    (
        "last latency too long",
        setter(f"{D0}.last_latency_ms", 2 * MAX_LATENCY_MS),
        "$.deltas[0].last_latency_ms",
        "<= 99000000.0",
    ),
    (
        "naive time",
        setter(f"{D0}.last_success", "2024-05-01T12:00:00"),
        "$.deltas[0].last_success",
        "timezone",
    ),
    (
        "not a time",
        setter(f"{D0}.last_success", "yesterday"),
        "$.deltas[0].last_success",
        "Invalid RFC3339 encoded datetime",
    ),
    ("null sketch", setter(f"{D0}.sketch", None), "$.deltas[0].sketch", "got `null`"),
    ("negative bin", setter(f"{S0}.bins.0", -1.0), "$.deltas[0].sketch.bins[0]", ">= 0"),
    ("bins past count", bumped(f"{S0}.count", 1), "$.deltas[0].sketch", "do not add up"),
    ("no max", setter(f"{S0}.max", None), "$.deltas[0].sketch", "not a sketch description"),
    (
        "other accuracy",
        setter(f"{S0}.relative_accuracy", 0.02),
        "$.deltas[0].sketch.relative_accuracy",
        "must be 0.01",
    ),
    ("keys too high", setter(f"{S0}.offset", 10**9), "$.deltas[0].sketch.offset", "reach past"),
    ("keys too low", setter(f"{S0}.offset", -(10**6)), "$.deltas[0].sketch.offset", "reach past"),
    (
        "off the grid",
        bumped(f"{I0}.start", 1),
        "$.deltas[0].intervals[0].start",
        "multiple of 10",
    ),
    ("one id twice", twice("deltas"), "$.deltas", "'ext-00' appears more than once"),
    ("one interval twice", twice(f"{D0}.intervals"), "$.deltas[0].intervals", "more than once"),
    (
        "disabled circuit",
        setter("circuits.0.state", "disabled"),
        "$.circuits[0].state",
        "Invalid enum value 'disabled'",
    ),
    (
        "bad config",
        setter("circuits.0.config.failure_threshold", 0),
        "$.circuits[0].config",
        "failure_threshold: must be at least 1",
    ),
    ("bad transition", setter("transitions.0.state", "ajar"), "$.transitions[0].state", "'ajar'"),
]


def malformed(case: bytes | Mutation) -> bytes:
    if isinstance(case, bytes):
        return case
    doc = sample()
    case(doc)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("case", "where", "what"), [c[1:] for c in MALFORMED], ids=[c[0] for c in MALFORMED]
)
def test_malformed_batch_is_refused_naming_the_field(
    case: bytes | Mutation, where: str, what: str
) -> None:
    with pytest.raises(InvalidRecord) as caught:
        decode_batch(malformed(case))
    error = caught.value
    assert KIND == error.kind
    assert 1 == len(error.problems), error.problems
    assert where == error.problems[0][0]
    assert what in error.problems[0][1]
    assert str(error).startswith(f"{KIND} '")
    assert f"{where}: " in str(error)


def test_the_error_names_the_batch_when_the_bytes_tell() -> None:
    doc = sample()
    doc["seq"] = 7
    doc["deltas"][0]["success_count"] = -1
    with pytest.raises(InvalidRecord, match=r"^health batch 'node-a #7': \$\.deltas\[0\]"):
        decode_batch(json.dumps(doc).encode())
    with pytest.raises(InvalidRecord, match=r"^health batch '\?': \$: JSON is malformed"):
        decode_batch(b"node-a #7")


def test_what_arrived_is_quoted_printable_and_short() -> None:
    doc = sample()
    doc["transitions"][0]["state"] = "\x1b[31m" + "x" * 5000
    with pytest.raises(InvalidRecord) as caught:
        decode_batch(json.dumps(doc).encode())
    ((where, what),) = caught.value.problems
    assert "$.transitions[0].state" == where
    assert what.startswith("Invalid enum value '\\x1b[31mxxx") and len(what) < 300


def test_a_number_past_any_float_is_refused() -> None:
    doc = sample()
    doc["deltas"][0]["latency_sum_ms"] = "HUGE"
    data = json.dumps(doc).encode().replace(b'"HUGE"', b"1e999")
    with pytest.raises(InvalidRecord) as caught:
        decode_batch(data)
    assert [("$.deltas[0].latency_sum_ms", "Number out of range")] == caught.value.problems


def test_every_problem_past_the_types_is_listed() -> None:
    doc = sample()
    doc["deltas"][0]["sketch"]["relative_accuracy"] = 0.05
    doc["deltas"][1]["intervals"][0]["sketch"]["count"] += 2
    doc["circuits"].append(copy.deepcopy(doc["circuits"][0]))
    doc["circuits"][0]["config"]["error_rate_threshold"] = 2.0
    with pytest.raises(InvalidRecord) as caught:
        decode_batch(json.dumps(doc).encode())
    assert [
        "$.deltas[0].sketch.relative_accuracy",
        "$.deltas[1].intervals[0].sketch",
        "$.circuits",
        "$.circuits[0].config",
    ] == [where for where, _ in caught.value.problems]


@settings(deadline=None)
@given(st.binary(max_size=200))
def test_any_bytes_decode_or_raise_invalid_record(data: bytes) -> None:
    try:
        decode_batch(data)
    except InvalidRecord as exc:
        assert exc.kind == KIND and exc.problems


# -- whatever decodes can be written ------------------------------------------------------------


def leaves(doc: Any, path: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """The paths of a document's leaves; of a sketch's bins only the first and the last (they
    would outnumber every other field)."""
    if isinstance(doc, dict):
        return [p for k, v in doc.items() for p in leaves(v, (*path, k))]
    if isinstance(doc, list):
        items = list(enumerate(doc))
        if path and path[-1] == "bins":
            items = items[:1] + items[1:][-1:]
        return [p for i, v in items for p in leaves(v, (*path, i))]
    return [path]


SAMPLE = sample()
NUMBER_EDGES: list[Any] = [0, -1, 1, 2**31 - 1, 2**31, 2**53, 2**53 + 1, 2**63 - 1, 2**63, 10**9, -(10**6),
                1000, 30_000, 0.5, -1e-300, 1e8, MAX_LATENCY_MS, MAX_LATENCY_MS * 1.5, 2.5e9,
                1e300]  # fmt: skip
TEXT_EDGES: list[Any] = ["", "0", "x" * 255, "x" * 256, "a\x00b", "closed", "open", "disabled",
              "1970-01-01T00:00:00Z", "2024-05-01T12:00:00", "9999-12-31T23:59:59-14:00",
              "0001-01-01T00:00:00+14:00"]  # fmt: skip
OTHER_EDGES: list[Any] = [None, True, [], {}, [1.0], [0.0, 1e15]]
NUMBERS = st.one_of(
    st.sampled_from(NUMBER_EDGES),
    st.integers(-(2**64), 2**64),
    st.floats(allow_nan=False, allow_infinity=False),
    st.floats(0, 2 * MAX_LATENCY_MS),
)
TEXTS = st.one_of(st.sampled_from(TEXT_EDGES), st.text(max_size=5))
ANY = st.one_of(st.sampled_from(OTHER_EDGES), NUMBERS, TEXTS)


def values_like(value: Any) -> st.SearchStrategy[Any]:
    """Mostly values of the leaf's own JSON type (so more of them pass the types and test the
    bounds), sometimes anything."""
    if isinstance(value, bool):
        own: st.SearchStrategy[Any] = st.booleans()
    elif isinstance(value, int | float):
        own = NUMBERS
    elif isinstance(value, str):
        own = TEXTS
    else:
        own = ANY
    return st.one_of(own, own, own, ANY)


@pytest.fixture(scope="module")
def fuzz_db(pg_server: PostgresProcess) -> str:
    """A database of the module's own (the fuzz reuses it for every example)."""
    url = pg_server.create_database(f"wire_fuzz_{uuid.uuid4().hex[:12]}")
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        for ext in ("ext-00", "ext-01"):
            conn.execute(
                "INSERT INTO extensions (id, type, subject) VALUES (%s, 'pre', %s)",
                (ext, f"beamline.ext.pre.{ext}.v1"),
            )
    return url


HEALTH_TABLES = (
    "extreg_health_nodes",
    "extension_health",
    "extension_health_intervals",
    "extreg_circuit_events",
)


async def write(url: str, batch: HealthBatch) -> bool:
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        return await write_on(conn, batch)


async def write_on(conn: psycopg.AsyncConnection[Any], batch: HealthBatch) -> bool:
    """Write `batch` alone: into empty health tables (no earlier write dilutes its numbers),
    and applied whatever its (node, seq)."""
    for table in HEALTH_TABLES:
        await conn.execute(f"DELETE FROM {table}")
    return await postgres_health.write_batch(conn, batch)


async def test_every_edge_value_is_refused_or_written(fuzz_db: str) -> None:
    """Each leaf of a valid batch set to each edge value of its JSON type in turn (bounds of
    the columns, of the wire's limits, of floats): refused with InvalidRecord, or written by
    the real writer without an error."""
    written = refused = 0
    async with await psycopg.AsyncConnection.connect(fuzz_db, autocommit=True) as conn:
        for path in leaves(SAMPLE):
            leaf: Any = SAMPLE
            for part in path:
                leaf = leaf[part]
            edges = TEXT_EDGES if isinstance(leaf, str) else NUMBER_EDGES + OTHER_EDGES
            for value in edges:
                doc = copy.deepcopy(SAMPLE)
                target: Any = doc
                for part in path[:-1]:
                    target = target[part]
                target[path[-1]] = copy.deepcopy(value)
                try:
                    batch = decode_batch(json.dumps(doc).encode())
                except InvalidRecord:
                    refused += 1
                    continue
                try:
                    assert await write_on(conn, batch)
                except psycopg.Error as exc:
                    pytest.fail(f"{path} = {value!r} decoded, but the write failed: {exc}")
                written += 1
    assert written > 100 and refused > 500, (written, refused)


@settings(deadline=None, max_examples=200, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_whatever_decodes_can_be_written(fuzz_db: str, data: st.DataObject) -> None:
    """One leaf of a valid batch replaced by an edge value: either refused with InvalidRecord,
    or written by the real writer without an error (nothing decoded poisons the writer)."""
    doc = copy.deepcopy(SAMPLE)
    for _ in range(data.draw(st.integers(1, 2))):
        path = data.draw(st.sampled_from(leaves(doc) or [()]))
        if not path:
            break
        target: Any = doc
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = copy.deepcopy(data.draw(values_like(target[path[-1]])))
    try:
        batch = decode_batch(json.dumps(doc).encode())
    except InvalidRecord:
        event("refused")
        return
    event("decoded and written")
    assert asyncio.run(write(fuzz_db, batch)) is True
