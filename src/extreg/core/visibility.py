"""Whether a read of PostgreSQL had already seen a given transaction's commit.

Why: a change notification that carries its record is applied without a read, but the cache
is also filled by reads (the full load, a sync, a writer's refresh). A notification queued
while such a read ran may describe a commit the read already saw, or one it did not; applying
the first kind would move the cache back to an older state, skipping the second would lose a
change. PostgreSQL answers the question exactly: every read also returns its MVCC snapshot
(`pg_current_snapshot()`), every notification the id of the transaction that wrote it
(`pg_current_xact_id()`), and a transaction is visible to a snapshot when it finished before
the snapshot's `xmin`, or before its `xmax` and is not among those still running then. A
notified transaction committed (it notified), so "visible" means "the read saw it".
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class TxSnapshot:
    """A PostgreSQL snapshot as `pg_current_snapshot()::text` writes it: `xmin:xmax:xip,...`."""

    xmin: int
    xmax: int
    running: frozenset[int]

    @classmethod
    def parse(cls, text: str) -> TxSnapshot:
        xmin, xmax, running = text.split(":")
        return cls(int(xmin), int(xmax), frozenset(int(x) for x in running.split(",") if x))

    def saw(self, xid: int) -> bool:
        """True when the transaction `xid` (committed) was visible to this snapshot."""
        return xid < self.xmin or (xid < self.xmax and xid not in self.running)


def saw_in_all(snapshots: tuple[TxSnapshot, ...], xid: int) -> bool:
    """Visible to every one of `snapshots` (the parts of a full load, read side by side):
    what such a load certainly holds, for ids it did not return."""
    return bool(snapshots) and all(s.saw(xid) for s in snapshots)
