"""Where one call goes: version by routing rules, instance by weight, and the call's limits.

Pure and I/O-free. Everything that depends only on the extension record (the enabled
versions, the usable instances and their cumulative weights, the capped timeout and retries,
the size limits) is worked out once into a `Route`; the invoker caches routes by the record's
identity, so a call on an extension without versions or instances does no routing work at all.

Rules (the wire contract's, see `shared/reference/contract.md`):

- `routing_rules` `{}` matches every context; a list value means "the context value is one of
  these"; a string means equality; several keys must all match. A context value that is not a
  string is compared as `str(value)`; a missing key never matches.
- Percentage rollout (`Rollout`): `"percent": P` (0 to 100, fractions allowed) takes the
  contexts whose point falls below P, where the point of a context is a stable hash of
  (extension id, version, key value) in [0, 100) (`rollout_point`); the key is `hash_on`, by
  default `tenant_id`, else `trace_id` when the context has no tenant. A context without the
  key (or with it empty) is not taken, so it goes on to the next version or the row. Its
  other keys must match too. The hash is BLAKE2b, never Python's `hash()` (salted per
  process), so every node, process and restart takes the same contexts; the version is part
  of it, so two versions at 10% draw their contexts independently; raising P only adds some.
- Enabled versions are tried newest first (`created_at` descending, as the original's
  `router_extension_versioning` reads them), whatever order the record lists them in; the
  first match wins; with no match, the extension's own row is used. A version without
  `created_at` (fixtures) counts as older than any dated one, and between versions of equal or
  no `created_at`, the one later in the record is the newer (see `newest_first`). This is what
  makes the canary recipe work: a `{}` default created first and a tenant-list version created
  later send the listed tenants to the later one.
- A matched version is its own target: its subject, timeout and retry. Instances
  (`extension_instances`, one subject each, weight 0-100) belong to the extension's own row:
  when no version matched, one of the enabled instances whose health is not `unhealthy` and
  whose weight is above 0 is drawn with probability weight / total; with none usable, the
  extension's own subject is used. (Instances carry no version, so sending a version's
  tenants to them would undo the version routing.)
- `timeout_ms` is capped by `extension_max_timeout_ms`, `retry` by `extension_max_retries`.
- `metadata.max_payload_size` / `metadata.max_metadata_size` (positive integers, bytes)
  replace the global limits for one extension; a record with an unusable value is refused
  when written or read (`extreg.core.model.record_problems`).
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from fractions import Fraction
from hashlib import blake2b
from itertools import accumulate
from math import ceil
from typing import TYPE_CHECKING, Any, cast

from . import chance
from .breaker import version_circuit
from .model import HASH_ON, PERCENT, ROLLOUT_KEYS, Extension, Instance, Version

if TYPE_CHECKING:
    from ..settings import Settings

Rules = Mapping[str, str | Sequence[str]]


@dataclass(frozen=True, slots=True)
class Limits:
    """The global caps and size limits a route is built under (from `Settings`)."""

    max_payload_size: int = 1_048_576
    max_metadata_size: int = 65_536
    max_timeout_ms: int = 60_000
    max_retries: int = 10

    @classmethod
    def from_settings(cls, settings: Settings) -> Limits:
        return cls(
            max_payload_size=settings.extension_max_payload_size,
            max_metadata_size=settings.extension_max_metadata_size,
            max_timeout_ms=settings.extension_max_timeout_ms,
            max_retries=settings.extension_max_retries,
        )


@dataclass(frozen=True, slots=True)
class Target:
    """One place to send a call: subject, per-attempt timeout in seconds, extra attempts."""

    subject: str
    timeout_s: float
    retries: int
    version: str
    circuit: str  # the breaker's key: the extension id, or `version_circuit` for a version
    instance_id: str | None = None  # the instance called, when one was drawn


def rules_match(rules: Rules, lookup: Callable[[str], Any]) -> bool:
    """True when every key of `rules` matches the context value `lookup(key)`."""
    for key, wanted in rules.items():
        value = lookup(key)
        if value is None:
            return False
        if not isinstance(value, str):
            value = str(value)
        if isinstance(wanted, str):
            if value != wanted:
                return False
        elif value not in wanted:
            return False
    return True


# The hash: BLAKE2b with an 8-byte digest of the UTF-8 bytes of `id NUL version NUL value`,
# read as a big-endian integer h in [0, 2**64); the point is h * 100 / 2**64. 64 bits leave
# fractional percents exact to far below one context in a billion. (Ids and version names
# never hold NUL: the database cannot store it.)
_DIGEST_SIZE = 8
_SPAN = 1 << (8 * _DIGEST_SIZE)
DEFAULT_KEYS = ("tenant_id", "trace_id")  # hashed without hash_on: the first one present


def _seeded(extension_id: str, version: str) -> blake2b:
    """The hash with `id NUL version NUL` already fed, copied once per call: a copy costs
    under half of a fresh `blake2b(..., digest_size=8)`, which sets up its parameter block."""
    return blake2b(f"{extension_id}\x00{version}\x00".encode(), digest_size=_DIGEST_SIZE)


def rollout_point(extension_id: str, version: str, value: str) -> float:
    """Where a context whose key is `value` falls for one version, in [0, 100): the version
    takes it when this is below its `percent`. The same on every node, process and restart."""
    hashed = _seeded(extension_id, version)
    hashed.update(value.encode())
    return int.from_bytes(hashed.digest(), "big") * 100 / _SPAN


class Rollout:
    """The `percent` and `hash_on` of one version's rules, ready for calls: one hash of a
    short string per call, its digest compared as bytes (which order as the big-endian
    integers they spell), so no integer is built on the hot path."""

    __slots__ = ("_last", "_seed", "keys", "percent")

    def __init__(
        self, extension_id: str, version: str, percent: float, hash_on: str | None
    ) -> None:
        self.percent = percent
        self.keys: tuple[str, ...] = (hash_on,) if hash_on else DEFAULT_KEYS
        self._seed = _seeded(extension_id, version)
        # Points below `percent` are hashes below `taken` (exact, whatever the fraction); the
        # last hash taken as bytes, b"" when none is (no 8 bytes are <= b"").
        taken = ceil(Fraction(percent) * _SPAN / 100)
        self._last = (taken - 1).to_bytes(_DIGEST_SIZE, "big") if taken else b""

    def takes(self, lookup: Callable[[str], Any]) -> bool:
        """True when the context has the key and its hash falls below `percent`."""
        for key in self.keys:
            value = lookup(key)
            if value is not None and value != "":
                hashed = self._seed.copy()
                hashed.update((value if isinstance(value, str) else str(value)).encode())
                return hashed.digest() <= self._last
        return False


@dataclass(frozen=True, slots=True)
class Rule:
    """One version's `routing_rules` ready for calls: the keys matched against the context
    (as `rules_match` reads them) and the rollout, if the rules have a `percent`."""

    match: Rules
    rollout: Rollout | None = None

    @classmethod
    def of(cls, extension_id: str, v: Version) -> Rule:
        """The rule of version `v` (its rules validated by `model.rules_problems`, so
        `percent` is a number, `hash_on` a string and every other value a string or list)."""
        rules = v.routing_rules
        match = cast(Rules, {k: w for k, w in rules.items() if k not in ROLLOUT_KEYS})
        percent = rules.get(PERCENT)
        if percent is None:
            return cls(match)
        hash_on = cast(str | None, rules.get(HASH_ON))
        return cls(match, Rollout(extension_id, v.version, cast(float, percent), hash_on))

    def matches(self, lookup: Callable[[str], Any]) -> bool:
        """The other keys first (dict lookups), the hash only for a context they let in."""
        return rules_match(self.match, lookup) and (
            self.rollout is None or self.rollout.takes(lookup)
        )


def select_version(
    versions: Sequence[tuple[Rule, Target]], lookup: Callable[[str], Any]
) -> Target | None:
    """The target of the first version whose rule matches, or None."""
    for rule, target in versions:
        if rule.matches(lookup):
            return target
    return None


def newest_first(versions: Sequence[Version]) -> list[Version]:
    """`versions` in the order they are tried: newest `created_at` first.

    Undated versions count as older than dated ones; ties (equal or no `created_at`) go to the
    one later in the sequence, so a fixtures file reads "later in the list = newer". A naive
    `created_at` is taken as UTC, so mixed values still compare.
    """

    def age(item: tuple[int, Version]) -> tuple[bool, datetime, int]:
        index, v = item
        moment = v.created_at
        if moment is None:
            return (False, _EPOCH, index)
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return (True, moment, index)

    return [v for _, v in sorted(enumerate(versions), key=age, reverse=True)]


_EPOCH = datetime.fromtimestamp(0, UTC)


def routing_report(ext: Extension) -> dict[str, Any]:
    """`{"id", "enabled", "versions": routing_plan(ext)}`: what `extreg versions --json` prints
    and `GET /admin/extensions/{id}/versions` answers."""
    return {"id": ext.id, "enabled": ext.enabled, "versions": routing_plan(ext)}


def routing_plan(ext: Extension) -> list[dict[str, Any]]:
    """What `extreg versions` shows: every version in the order calls try them (a disabled
    one in its place, marked, as calls skip it), with its rules and its split (`percent`, and
    the keys hashed in order of preference), then the extension's own row: the fallback."""
    plan = []
    for v in newest_first(ext.versions):
        rollout = Rule.of(ext.id, v).rollout
        plan.append(
            {
                "version": v.version,
                "enabled": v.enabled,
                "subject": v.subject,
                "routing_rules": v.routing_rules,
                "percent": None if rollout is None else rollout.percent,
                "hash_on": None if rollout is None else list(rollout.keys),
                "fallback": False,
            }
        )
    fallback = {"version": ext.version, "enabled": ext.enabled, "subject": ext.subject}
    plan.append(
        {**fallback, "routing_rules": None, "percent": None, "hash_on": None, "fallback": True}
    )
    return plan


def usable_instances(instances: Sequence[Instance]) -> list[Instance]:
    """Instances a call may go to: enabled, not `unhealthy`, weight above 0."""
    return [i for i in instances if i.enabled and i.health_status != "unhealthy" and i.weight > 0]


def choose_weighted(cumulative: Sequence[int], draw: float) -> int:
    """The index picked by `draw` in [0, 1) over cumulative weights (last = total)."""
    return bisect_right(cumulative, draw * cumulative[-1])


def _limit(metadata: Mapping[str, Any], key: str, default: int) -> int:
    value = metadata.get(key)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    return default


class Route:
    """Everything about calling one extension record that does not depend on the call."""

    __slots__ = (
        "cumulative",
        "default",
        "dynamic",
        "eligible",
        "ext",
        "instances",
        "max_metadata_size",
        "max_payload_size",
        "unhealthy",
        "versions",
    )

    def __init__(
        self, ext: Extension, limits: Limits, ejected: frozenset[str] = frozenset()
    ) -> None:
        """`ejected`: instances this node's outlier detection has taken out (see `outliers`);
        calls skip them as they skip `unhealthy` ones."""
        self.ext = ext
        self.default = self._target(
            ext.subject, ext.timeout_ms, ext.retry, ext.version, ext.id, limits
        )
        self.versions: tuple[tuple[Rule, Target], ...] = tuple(
            (Rule.of(ext.id, v), self._version_target(v, limits))
            for v in newest_first(ext.versions)
            if v.enabled
        )
        usable = [i for i in usable_instances(ext.instances) if i.instance_id not in ejected]
        self.instances: tuple[Target, ...] = tuple(
            self._instance_target(i, ext, limits) for i in usable
        )
        # What outlier ejection's cap is a share of (instances that take calls when healthy),
        # and those of them the record marks unhealthy: out already.
        eligible = [i for i in ext.instances if i.enabled and i.weight > 0]
        self.eligible = len(eligible)
        self.unhealthy = frozenset(
            i.instance_id for i in eligible if i.health_status == "unhealthy"
        )
        self.cumulative: tuple[int, ...] = tuple(accumulate(i.weight for i in usable))
        if len(self.instances) == 1:  # one instance: always it, no draw needed
            self.default = self.instances[0]
            self.instances = ()
        self.dynamic = bool(self.versions or self.instances)
        self.max_payload_size = _limit(ext.metadata, "max_payload_size", limits.max_payload_size)
        self.max_metadata_size = _limit(ext.metadata, "max_metadata_size", limits.max_metadata_size)

    @staticmethod
    def _target(
        subject: str,
        timeout_ms: int,
        retry: int,
        version: str,
        circuit: str,
        limits: Limits,
        instance_id: str | None = None,
    ) -> Target:
        return Target(
            subject=subject,
            timeout_s=min(timeout_ms, limits.max_timeout_ms) / 1000,
            retries=min(retry, limits.max_retries),
            version=version,
            circuit=circuit,
            instance_id=instance_id,
        )

    def _instance_target(self, i: Instance, ext: Extension, limits: Limits) -> Target:
        return self._target(
            i.subject, ext.timeout_ms, ext.retry, ext.version, ext.id, limits, i.instance_id
        )

    def _version_target(self, v: Version, limits: Limits) -> Target:
        """A version's target, on its own circuit (see `breaker.version_circuit`), unless it
        shares the row's version name: then it is the row's, and so is the circuit."""
        ext = self.ext
        circuit = ext.id if v.version == ext.version else version_circuit(ext.id, v.version)
        return self._target(v.subject, v.timeout_ms, v.retry, v.version, circuit, limits)

    def pick(self, lookup: Callable[[str], Any], draw: Callable[[], float] = chance.draw) -> Target:
        """The target of one call: a matching version, else a weighted instance, else the row."""
        if self.versions:
            target = select_version(self.versions, lookup)
            if target is not None:
                return target
        if self.instances:
            return self.instances[choose_weighted(self.cumulative, draw())]
        return self.default
