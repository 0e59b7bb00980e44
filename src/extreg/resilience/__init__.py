"""The I/O-free resilience core: per-extension circuit breakers and health measurements."""

from .breaker import (
    CLOSED,
    DISABLED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreakers,
    CircuitSnapshot,
    Reading,
    State,
    StateCallback,
    breaker_override_problems,
)
from .health import HealthDelta, HealthMonitor, sketch_from_dict, sketch_to_dict

__all__ = [
    "CLOSED",
    "DISABLED",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "CircuitBreakers",
    "CircuitSnapshot",
    "HealthDelta",
    "HealthMonitor",
    "Reading",
    "State",
    "StateCallback",
    "breaker_override_problems",
    "sketch_from_dict",
    "sketch_to_dict",
]
