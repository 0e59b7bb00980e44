"""The cache's unit of truth: an immutable snapshot of every extension and routing policy.

Readers take one reference to the current snapshot and use it; writers build a whole new
snapshot and swap the reference. In CPython a reference assignment is atomic, so readers need
no lock, never see a half-built state, and an id present before and after a change is present
at every instant in between. This is the product's core, so it is ours rather than a library's:
no cache library offers copy-on-write snapshots with by-type indexes and incremental patching.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from operator import attrgetter

from .model import TYPES, Extension
from .policy import Policy, availability

_by_id = attrgetter("id")


@dataclass(frozen=True, slots=True)
class Snapshot:
    """Every cached extension and policy, indexed for the router's reads. Never mutated
    after creation. `unusable_policies` names the policies that reference an extension that
    is deleted, disabled or of another type in this snapshot, and why (status, metrics)."""

    # Plain dicts, not MappingProxyType: a proxy costs a third more per lookup. Nothing
    # writes to them after `build`; that is the contract of this class.
    by_id: dict[str, Extension]
    enabled: dict[str, Extension]
    by_type: dict[str, tuple[Extension, ...]]
    generation: int
    policies: dict[str, Policy] = field(default_factory=dict)
    unusable_policies: dict[str, list[str]] = field(default_factory=dict)
    loaded_at: datetime = field(default_factory=lambda: datetime.now(UTC))

    @classmethod
    def build(
        cls,
        extensions: Iterable[Extension],
        generation: int = 1,
        policies: Iterable[Policy] = (),
    ) -> Snapshot:
        by_id = {ext.id: ext for ext in extensions}
        by_policy = {p.policy_id: p for p in policies}
        enabled = {k: v for k, v in by_id.items() if v.enabled}
        by_type: dict[str, list[Extension]] = {t: [] for t in TYPES}
        for ext in sorted(enabled.values(), key=_by_id):
            by_type[ext.type].append(ext)
        return cls(
            by_id=by_id,
            enabled=enabled,
            by_type={t: tuple(v) for t, v in by_type.items()},
            generation=generation,
            policies=by_policy,
            unusable_policies=_unusable(by_policy, by_id),
        )

    @classmethod
    def empty(cls) -> Snapshot:
        return cls.build((), generation=0)

    def patched(
        self,
        upserts: Iterable[Extension],
        deleted: Iterable[str],
        policy_upserts: Iterable[Policy] = (),
        policies_deleted: Iterable[str] = (),
    ) -> Snapshot:
        """A new snapshot with some records replaced or removed; `self` is left as it was.

        Costs two dict copies plus a copy of each type's list touched (changes placed by bisection), so a notification about
        one record among 10,000 does not rebuild every index. Policies are few (one per
        scenario), so their availability is worked out again whole each time.
        """
        by_id = dict(self.by_id)
        enabled = dict(self.enabled)
        touched: set[str] = set()
        changed: dict[str, Extension | None] = {}
        for ext in upserts:
            old = by_id.get(ext.id)
            if old is not None:
                touched.add(old.type)
            touched.add(ext.type)
            by_id[ext.id] = ext
            changed[ext.id] = ext
            if ext.enabled:
                enabled[ext.id] = ext
            else:
                enabled.pop(ext.id, None)
        for ext_id in deleted:
            gone = by_id.pop(ext_id, None)
            if gone is not None:
                touched.add(gone.type)
                enabled.pop(ext_id, None)
                changed[ext_id] = None
        by_type = dict(self.by_type)
        for ext_type in touched:  # each kept sorted by id: changes go in by bisection
            kept = list(self.by_type.get(ext_type, ()))
            for ext_id, now in changed.items():
                i = bisect.bisect_left(kept, ext_id, key=_by_id)
                present = i < len(kept) and kept[i].id == ext_id
                if now is not None and now.type == ext_type and now.enabled:
                    if present:
                        kept[i] = now
                    else:
                        kept.insert(i, now)
                elif present:
                    del kept[i]
            by_type[ext_type] = tuple(kept)
        policies = self.policies
        policy_upserts, policies_deleted = list(policy_upserts), list(policies_deleted)
        if policy_upserts or policies_deleted:
            policies = {**policies, **{p.policy_id: p for p in policy_upserts}}
            for policy_id in policies_deleted:
                policies.pop(policy_id, None)
        return Snapshot(
            by_id, enabled, by_type, self.generation + 1, policies, _unusable(policies, by_id)
        )

    def __len__(self) -> int:
        return len(self.by_id)


def _unusable(policies: dict[str, Policy], by_id: dict[str, Extension]) -> dict[str, list[str]]:
    found = {pid: availability(p, by_id) for pid, p in policies.items()}
    return {pid: problems for pid, problems in found.items() if problems}
