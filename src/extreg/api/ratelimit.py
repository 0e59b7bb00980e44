"""Limits failed authentications per client address, against token guessing.

After `limit` failures within `window_s` seconds an address is refused (HTTP 429 with
Retry-After) until its oldest counted failure leaves the window; that includes requests with
a valid token, since letting them through would tell a guesser when it guessed right.
Memory is bounded: at most `max_clients` addresses are tracked, the quietest dropped first.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable


class FailedAuthLimiter:
    def __init__(
        self,
        limit: int = 10,
        window_s: float = 60.0,
        *,
        max_clients: int = 10_000,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limit = limit
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}

    def retry_after(self, client: str) -> float | None:
        """Seconds until `client` may try again, or None when it is not blocked."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.limit:
            return None
        return max(failures[0] + self.window_s - self._clock(), 0.001)

    def failed(self, client: str) -> None:
        """Count one failed authentication of `client`."""
        failures = self._recent(client)
        if failures is None:
            if len(self._failures) >= self.max_clients:
                self._forget_quietest()
            failures = self._failures[client] = deque(maxlen=self.limit)
        failures.append(self._clock())

    def _recent(self, client: str) -> deque[float] | None:
        failures = self._failures.get(client)
        if failures is None:
            return None
        horizon = self._clock() - self.window_s
        while failures and failures[0] <= horizon:
            failures.popleft()
        if not failures:
            del self._failures[client]
            return None
        return failures

    def _forget_quietest(self) -> None:
        quietest = min(self._failures, key=lambda c: self._failures[c][-1])
        del self._failures[quietest]
