"""How a node of the change feed judges each message (core/feed.py): the next change is
applied, a repeat skipped, anything that may hide a missed change is a gap."""

from __future__ import annotations

import pytest

from extreg.core.feed import Message, Position

AT = Position("e1", 5)


@pytest.mark.parametrize(
    ("message", "verdict"),
    [
        (Message("e1", 6, "change"), "apply"),
        (Message("e1", 5, "change"), "old"),
        (Message("e1", 3, "change"), "old"),
        (Message("e1", 7, "change"), "gap"),  # 6 was missed
        (Message("e2", 6, "change"), "gap"),  # another publisher: its numbers are not ours
        (Message("e2", 1, "change"), "gap"),
        (Message("e1", 5, "heartbeat"), "old"),
        (Message("e1", 4, "heartbeat"), "old"),  # sent before the snapshot this position is
        (Message("e1", 6, "heartbeat"), "gap"),  # the last change was missed
        (Message("e2", 5, "heartbeat"), "gap"),
        (Message("e1", 6, "reset"), "gap"),
        (Message("e1", 5, "reset"), "old"),  # the snapshot was taken after the reset
    ],
)
def test_judge(message: Message, verdict: str) -> None:
    assert AT.judge(message) == verdict
