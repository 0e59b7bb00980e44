"""The recent outcomes of each policy's runs through this server, for the dashboard.

Fed by the invoker's pipeline runner, as one of its `observers` (`following`), so every run
this process's invoker makes counts: through the API (`extreg policy run --url` among them) or
the demo's traffic; a CLI run without --url has an invoker of its own and is not seen here. A
small ring per policy (the last `per_policy` runs) and at most `policies` rings, the least
recently run dropped first, so memory stays bounded whatever ids are run. It lives in this
process only: it shows what this server saw lately, not a cluster-wide history (the metrics
`extreg_policy_runs_total` are for that).
"""

from __future__ import annotations

import time
from collections import Counter, OrderedDict, deque
from collections.abc import Sequence
from typing import Any

PER_POLICY = 50
POLICIES = 1000
# The runner's outcomes of runs that ran nothing of a stored policy: not kept (an unknown id
# would otherwise take a ring).
NOT_RUNS = frozenset({"not_found"})


class RecentRuns:
    """See the module docstring. `outcome` is the runner's (`ok`, `blocked`, `step_failed`,
    `no_provider`, `disabled`: `extreg.invoke.pipeline.OUTCOMES`)."""

    def __init__(self, per_policy: int = PER_POLICY, policies: int = POLICIES) -> None:
        self.per_policy = per_policy
        self.policies = policies
        self._rings: OrderedDict[str, deque[tuple[str, float]]] = OrderedDict()

    @classmethod
    def following(cls, pipeline: Any) -> RecentRuns:
        """The rings told of every run of `pipeline` (an `Invoker.pipeline`): the ones among
        its `observers` already, else new ones added there. One per pipeline, however many
        apps are made over it (each `create_app`), so the list never grows with them."""
        for observer in pipeline.observers:
            if isinstance(observer, cls):
                return observer
        runs = cls()
        pipeline.observers.append(runs)
        return runs

    def __call__(self, policy_id: str, outcome: str, seconds: float, steps: Sequence[Any]) -> None:
        """A `PolicyObserver`: one run's end."""
        self.record(policy_id, outcome)

    def record(self, policy_id: str, outcome: str) -> None:
        if outcome in NOT_RUNS:
            return
        ring = self._rings.pop(policy_id, None)
        if ring is None:
            ring = deque(maxlen=self.per_policy)
        ring.append((outcome, time.time()))
        self._rings[policy_id] = ring  # the most recently run last
        while len(self._rings) > self.policies:
            self._rings.popitem(last=False)

    def summary(self, policy_id: str) -> dict[str, Any]:
        """`{"total", "outcomes": {outcome: count}, "last_outcome", "last_at"}` over the ring."""
        ring = self._rings.get(policy_id, ())
        last = ring[-1] if ring else None
        return {
            "total": len(ring),
            "outcomes": dict(Counter(outcome for outcome, _ in ring)),
            "last_outcome": last[0] if last else None,
            "last_at": _iso(last[1]) if last else None,
        }


def _iso(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))
