"""The clock the invoker, its breaker, health monitor and automation, and the registry read.

One object with two readings, passed down from `Invoker.open(..., clock=...)` and
`Registry.open(..., clock=...)`, so a test can move time forward explicitly instead of
sleeping past a breaker timeout (and racing it on a loaded machine):

- `monotonic()`: seconds for measuring intervals (breaker timeouts and windows, sync pacing);
- `time()`: epoch seconds for dating things (a circuit's `opened_at`, a last success, a load).

`SYSTEM_CLOCK` is the default: the process's own clocks. Its readings are the `time`
module's functions themselves, so the breaker's hot path pays no extra call.
"""

from __future__ import annotations

import time as _time
from datetime import UTC, datetime
from typing import Protocol

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "utc_now"]


class Clock(Protocol):
    """What a clock must read (see the module docstring)."""

    def monotonic(self) -> float: ...

    def time(self) -> float: ...


class SystemClock:
    """The process's clocks: `time.monotonic` and `time.time`."""

    monotonic = staticmethod(_time.monotonic)
    time = staticmethod(_time.time)


SYSTEM_CLOCK: Clock = SystemClock()


def utc_now(clock: Clock) -> datetime:
    """The clock's wall time as an aware UTC datetime."""
    return datetime.fromtimestamp(clock.time(), UTC)
