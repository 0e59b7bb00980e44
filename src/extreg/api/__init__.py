"""The HTTP admin API of `extreg serve` (SPEC.md, "HTTP admin API"): `create_app(runtime)`."""

from .app import create_app

__all__ = ["create_app"]
