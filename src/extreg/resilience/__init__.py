"""The I/O-free resilience core: per-extension circuit breakers and health measurements."""

from .breaker import (
    CLOSED,
    HALF_OPEN,
    OPEN,
    BreakerConfig,
    CircuitBreakers,
    CircuitSnapshot,
    State,
    StateCallback,
    breaker_override_problems,
)
from .health import HealthDelta, HealthMonitor, sketch_from_dict, sketch_to_dict

__all__ = [
    "CLOSED",
    "HALF_OPEN",
    "OPEN",
    "BreakerConfig",
    "CircuitBreakers",
    "CircuitSnapshot",
    "HealthDelta",
    "HealthMonitor",
    "State",
    "StateCallback",
    "breaker_override_problems",
    "sketch_from_dict",
    "sketch_to_dict",
]
