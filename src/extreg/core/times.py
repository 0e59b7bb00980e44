"""Moments as text: the one way extreg writes a time, in every answer and file."""

from __future__ import annotations

from datetime import UTC, datetime


def iso_seconds(moment: datetime | None) -> str | None:
    """ISO 8601 in UTC to the second with a `Z`, as in the contract's examples
    (`2025-01-27T12:00:00Z`); None stays None. A naive moment is taken as UTC."""
    if moment is None:
        return None
    utc = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return utc.isoformat(timespec="seconds").replace("+00:00", "Z")


def iso_epoch(epoch: float | None) -> str | None:
    """`iso_seconds` of epoch seconds."""
    return None if epoch is None else iso_seconds(datetime.fromtimestamp(epoch, UTC))
