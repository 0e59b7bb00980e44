"""extreg: the extension registry of a message router."""

from typing import TYPE_CHECKING, Any

from .core.model import Extension, Instance, Version
from .errors import (
    CircuitOpen,
    ConfigError,
    ExtensionDisabled,
    ExtensionError,
    ExtensionNotFound,
    ExtensionTimeout,
    ExtregError,
    InvalidResponse,
    InvocationError,
    MaxRetriesExceeded,
    NoProvider,
    Overloaded,
    PayloadTooLarge,
    PolicyDisabled,
    PolicyError,
    PolicyNotFound,
    StepFailed,
    ValidatorBlocked,
)
from .registry import Registry
from .settings import Settings

if TYPE_CHECKING:
    from .invoke import Invoker


def __getattr__(name: str) -> Any:
    """`Invoker` is imported on first use: it pulls in nats-py, which most commands never need."""
    if name == "Invoker":
        from .invoke import Invoker

        return Invoker
    raise AttributeError(f"module 'extreg' has no attribute {name!r}")


__all__ = [
    "CircuitOpen",
    "ConfigError",
    "Extension",
    "ExtensionDisabled",
    "ExtensionError",
    "ExtensionNotFound",
    "ExtensionTimeout",
    "ExtregError",
    "Instance",
    "InvalidResponse",
    "InvocationError",
    "Invoker",
    "MaxRetriesExceeded",
    "NoProvider",
    "Overloaded",
    "PayloadTooLarge",
    "PolicyDisabled",
    "PolicyError",
    "PolicyNotFound",
    "Registry",
    "Settings",
    "StepFailed",
    "ValidatorBlocked",
    "Version",
]
