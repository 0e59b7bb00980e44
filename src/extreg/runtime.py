"""What the HTTP API serves from: settings, the registry, the invoker, tokens and metrics.

`Runtime` is a plain value so tests and embedders can build one by hand; `Runtime.open`
is the lifespan piece that fills the token book, keeps it fresh (and a copy of the database's
tokens beside the snapshot file, for a boot while the database is down), and wires the metrics
to the registry and the invoker, and stops all of that on exit.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from .auth import TokenBook
from .metrics import Metrics
from .registry import Registry
from .settings import Settings
from .tokens import KnownTokens, TokenFollower, TokenStore


@dataclass
class Runtime:
    """Everything a request handler may need. `invoker` is None when no NATS invoker runs."""

    settings: Settings
    registry: Registry
    invoker: Any | None = None
    tokens: TokenBook = field(default_factory=TokenBook)
    metrics: Metrics = field(default_factory=Metrics)

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls,
        settings: Settings,
        registry: Registry,
        invoker: Any | None = None,
        *,
        metrics: Metrics | None = None,
    ) -> AsyncIterator[Runtime]:
        """A runtime whose tokens follow the database (when one is configured) and the tokens
        file (setting `api_tokens_file`), with metrics attached to the registry and invoker."""
        runtime = cls(settings, registry, invoker, metrics=metrics or Metrics())
        runtime.metrics.watch_registry(registry)
        if invoker is not None:
            runtime.metrics.watch_invoker(invoker)
        store, known = None, None
        if settings.database_configured:
            store, known = TokenStore.from_settings(settings), KnownTokens.from_settings(settings)
        follower = TokenFollower(
            runtime.tokens, store, settings.api_tokens_file, known, registry.token_relay
        )
        await follower.first_load()
        task = asyncio.create_task(follower.run())
        try:
            yield runtime
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
