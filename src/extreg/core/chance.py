"""extreg's random draws: backoff jitter and the weighted choice of an instance.

They come from a private `random.Random`, never from the `random` module's shared one: a
library that draws from the shared generator moves the sequence an application seeded for
its own reproducible runs (and Hypothesis, which our tests use, reports such draws as flaky).
None of these draws is a secret; tokens come from `secrets`.
"""

from __future__ import annotations

import random

_draws = random.Random()

draw = _draws.random
"""A float in [0, 1), from extreg's own generator."""


def jitter(seconds: float) -> float:
    """`seconds` spread over 0.5-1.5 times itself, so that the retries of many processes that
    failed together do not come back together."""
    return seconds * (0.5 + _draws.random())
