"""The change feed over NATS: its messages and how a node decides what to do with each.

Why (SPEC.md "Scale"): with `change_feed=nats`, one node per database, the publisher, follows
PostgreSQL and tells every other node what changed, so they never hold a database connection.
Each publisher takes a fresh `epoch` (a random id) when it starts publishing and numbers its
messages 1, 2, 3, ... without gaps; a node holds the position of the last message it applied
and its cache is exactly the publisher's as of that message. Anything else (another epoch, a
number skipped, a `reset`) means the node may have missed something, and it asks the
publisher for a whole snapshot, which carries the position it was taken at. Heartbeats repeat
the current position, so a lost last message is noticed within a heartbeat, and their absence
tells nodes that the publisher is gone.

Nothing here does I/O; `adapters/nats_feed.py` carries these over NATS.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import msgspec

from .model import Extension
from .policy import Policy

HEARTBEAT_S = 1.0  # the publisher's heartbeat
SILENCE_S = 3.5  # no message for this long: the publisher is gone (or unreachable)

Kind = Literal["change", "heartbeat", "reset"]
Verdict = Literal["apply", "old", "gap"]


class Message(msgspec.Struct, forbid_unknown_fields=True):
    """One message of the feed: `change` carries records (deleted ones by id), `heartbeat`
    repeats the position, `reset` says "everything may have changed: take a snapshot"."""

    epoch: str
    seq: int
    kind: Kind
    extensions: list[Extension] = []
    deleted: list[str] = []
    policies: list[Policy] = []
    policies_deleted: list[str] = []


class Snapshot(msgspec.Struct, forbid_unknown_fields=True):
    """Every record of the publisher's cache at position (`epoch`, `seq`)."""

    epoch: str
    seq: int
    extensions: list[Extension]
    policies: list[Policy]
    origin: tuple[str, str, str]  # the database's location, name and system identifier


@dataclass(frozen=True, slots=True)
class Position:
    """Where a node stands in the feed: the last message applied."""

    epoch: str
    seq: int

    def judge(self, message: Message) -> Verdict:
        """`apply` the next change; skip what this position already covers (a message of a
        snapshot taken after it was sent: nodes subscribe before they ask for one); report a
        `gap` otherwise (another epoch, a number skipped, a newer heartbeat or reset): take
        a snapshot."""
        if message.epoch != self.epoch:
            return "gap"
        if message.seq <= self.seq:
            return "old"
        if message.kind == "change" and message.seq == self.seq + 1:
            return "apply"
        return "gap"
