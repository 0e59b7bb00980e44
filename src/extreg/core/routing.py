"""Where one call goes: version by routing rules, instance by weight, and the call's limits.

Pure and I/O-free. Everything that depends only on the extension record (the enabled
versions, the usable instances and their cumulative weights, the capped timeout and retries,
the size limits) is worked out once into a `Route`; the invoker caches routes by the record's
identity, so a call on an extension without versions or instances does no routing work at all.

Rules (the wire contract's, see `shared/reference/contract.md`):

- `routing_rules` `{}` matches every context; a list value means "the context value is one of
  these"; a string means equality; several keys must all match. A context value that is not a
  string is compared as `str(value)`; a missing key never matches.
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
from itertools import accumulate
from typing import TYPE_CHECKING, Any

from . import chance
from .model import Extension, Instance, Version

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


def select_version(
    versions: Sequence[tuple[Rules, Target]], lookup: Callable[[str], Any]
) -> Target | None:
    """The target of the first version whose rules match, or None."""
    for rules, target in versions:
        if rules_match(rules, lookup):
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
        "ext",
        "instances",
        "max_metadata_size",
        "max_payload_size",
        "versions",
    )

    def __init__(self, ext: Extension, limits: Limits) -> None:
        self.ext = ext
        self.default = self._target(ext.subject, ext.timeout_ms, ext.retry, ext.version, limits)
        self.versions: tuple[tuple[Rules, Target], ...] = tuple(
            (v.routing_rules, self._version_target(v, limits))
            for v in newest_first(ext.versions)
            if v.enabled
        )
        usable = usable_instances(ext.instances)
        self.instances: tuple[Target, ...] = tuple(
            self._target(i.subject, ext.timeout_ms, ext.retry, ext.version, limits) for i in usable
        )
        self.cumulative: tuple[int, ...] = tuple(accumulate(i.weight for i in usable))
        if len(self.instances) == 1:  # one instance: always it, no draw needed
            self.default = self.instances[0]
            self.instances = ()
        self.dynamic = bool(self.versions or self.instances)
        self.max_payload_size = _limit(ext.metadata, "max_payload_size", limits.max_payload_size)
        self.max_metadata_size = _limit(ext.metadata, "max_metadata_size", limits.max_metadata_size)

    @staticmethod
    def _target(subject: str, timeout_ms: int, retry: int, version: str, limits: Limits) -> Target:
        return Target(
            subject=subject,
            timeout_s=min(timeout_ms, limits.max_timeout_ms) / 1000,
            retries=min(retry, limits.max_retries),
            version=version,
        )

    def _version_target(self, v: Version, limits: Limits) -> Target:
        return self._target(v.subject, v.timeout_ms, v.retry, v.version, limits)

    def pick(self, lookup: Callable[[str], Any], draw: Callable[[], float] = chance.draw) -> Target:
        """The target of one call: a matching version, else a weighted instance, else the row."""
        if self.versions:
            target = select_version(self.versions, lookup)
            if target is not None:
                return target
        if self.instances:
            return self.instances[choose_weighted(self.cumulative, draw())]
        return self.default
