"""The I/O-free resilience core: per-extension circuit breakers and health measurements."""

from .breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreakers,
    CircuitSnapshot,
    State,
    breaker_override_problems,
)

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "CircuitBreakers",
    "CircuitSnapshot",
    "State",
    "breaker_override_problems",
]
