"""Limits failed authentications per client address, without letting anyone lock out an admin.

The scheme, and why (SPEC.md: "a request without a token is not a failure, and a valid token
is never refused because of other requests' failures"):

- Only a *wrong* credential counts: a bearer token, a session cookie or a sign-in token that
  the server does not know. A request with no credentials at all answers 401 and counts
  nothing, so a web page firing `fetch` at the server, a probe, or a browser that has not
  signed in yet cannot fill anyone's budget.
- Credentials are checked *before* the limiter is consulted, and a valid one is answered
  whatever the limiter says. Every local process shares 127.0.0.1, so a limiter that refused
  valid tokens would let any of them lock the admins out with a few wrong guesses.
- After `limit` failures within `window_s` seconds an address gets 429 with Retry-After for
  every further wrong credential (and each one extends the block), so a client that keeps
  failing is told to stop, and well-behaved clients (the CLI) do stop.

Brute force stays infeasible however many answers a guesser gets: a token is 256 random bits
(`extreg.auth`) and so is a session id, so at even a million guesses a second a hit is not
expected in the lifetime of the universe; the limiter is not what protects the secret, and
refusing valid tokens to "hide" a hit would buy nothing but the lockout above.
The address is the TCP peer, or the client named in `X-Forwarded-For` when the peer is a proxy
listed in `forwarded_allow_ips` (see `security.client_address`); a header from anyone else is
ignored, so it can neither dodge the limit nor charge someone else's address.
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
        """Seconds until `client` is below the limit again, or None when it is below it."""
        failures = self._recent(client)
        if failures is None or len(failures) < self.limit:
            return None
        return max(failures[0] + self.window_s - self._clock(), 0.001)

    def failed(self, client: str) -> float | None:
        """Count one failed authentication of `client`. When the client was already over the
        limit, the seconds it must now wait (answer 429); else None (answer 401)."""
        over = self.retry_after(client) is not None
        failures = self._recent(client)
        if failures is None:
            if len(self._failures) >= self.max_clients:
                self._forget_quietest()
            failures = self._failures[client] = deque(maxlen=self.limit)
        failures.append(self._clock())
        return self.retry_after(client) if over else None

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
