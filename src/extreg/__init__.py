"""extreg: the extension registry of a message router."""

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
    PayloadTooLarge,
)
from .model import Extension, Instance, Version
from .registry import Registry
from .settings import Settings

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
    "MaxRetriesExceeded",
    "PayloadTooLarge",
    "Registry",
    "Settings",
    "Version",
]
