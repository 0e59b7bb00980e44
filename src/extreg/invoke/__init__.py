"""Calling extensions over NATS: the invoker, its routing, health persistence and automation.

`Invoker` is the entry point (see `extreg.invoke.invoker`); the rest are its parts, each with
one job: `routing` (where a call goes), `envelope` (what is sent), `transport` (NATS),
`health_store` (health to the database), `automation` (auto enable/disable, health gate).
"""

from ..adapters.nats import NatsTransport
from ..core.routing import Limits, Route, Target, rules_match, select_version
from ..errors import HealthRefused, NatsUnavailable, TransportUnavailable
from .automation import AUTO_ACTOR, HealthGate
from .health_store import HealthFlusher, adopt_totals
from .invoker import Invoker

__all__ = [
    "AUTO_ACTOR",
    "HealthFlusher",
    "HealthGate",
    "HealthRefused",
    "Invoker",
    "Limits",
    "NatsTransport",
    "NatsUnavailable",
    "Route",
    "Target",
    "TransportUnavailable",
    "adopt_totals",
    "rules_match",
    "select_version",
]
