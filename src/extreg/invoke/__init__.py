"""Calling extensions over NATS: the invoker, its routing, health persistence and automation.

`Invoker` is the entry point (see `extreg.invoke.invoker`); the rest are its parts, each with
one job: `routing` (where a call goes), `envelope` (what is sent), `transport` (NATS),
`health_store` (health to the database), `automation` (auto enable/disable, health gate),
`pipeline` (routing policy runs: `Invoker.run_policy`).
"""

from ..adapters.nats import NatsTransport
from ..core.routing import Limits, Route, Target, rules_match, select_version
from ..errors import HealthRefused, NatsUnavailable, TransportUnavailable
from .automation import AUTO_ACTOR, HealthGate
from .health_store import HealthFlusher, adopt_totals
from .invoker import Invoker
from .pipeline import OUTCOMES, PipelineRunner, PolicyObserver, PolicyResult, ProviderHook

__all__ = [
    "AUTO_ACTOR",
    "OUTCOMES",
    "HealthFlusher",
    "HealthGate",
    "HealthRefused",
    "Invoker",
    "Limits",
    "NatsTransport",
    "NatsUnavailable",
    "PipelineRunner",
    "PolicyObserver",
    "PolicyResult",
    "ProviderHook",
    "Route",
    "Target",
    "TransportUnavailable",
    "adopt_totals",
    "rules_match",
    "select_version",
]
