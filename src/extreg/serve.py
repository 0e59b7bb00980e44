"""`extreg serve`: one lifespan that owns every resource of the running registry."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog

from . import tracing
from .api.server import serve_api
from .errors import NatsUnavailable, SourceUnavailable
from .invoke import Invoker
from .local.embedded import resolve_database, uses_embedded
from .registry import Registry
from .runtime import Runtime
from .settings import Settings
from .tokens import TokenStore, ensure_admin_token

log = structlog.get_logger("extreg.serve")

INVOKER_RETRY_MIN_S, INVOKER_RETRY_MAX_S = 1.0, 15.0


async def serve(settings: Settings, *, host: str, port: int, demo: bool = False) -> None:
    """Start the embedded database when none is configured (and with `demo`, NATS, the sample
    extensions and traffic), then serve until stopped. Ctrl-C stops everything started here.
    Traces are exported when `OTEL_EXPORTER_OTLP_ENDPOINT` is set (`tracing.export_from_env`)."""
    stop_tracing = tracing.export_from_env()
    embedded = uses_embedded(settings)
    settings = await resolve_database(settings)
    if embedded:
        log.info("embedded_database", data_dir=str(settings.data_dir.resolve()))
    elif settings.database_configured:
        await _migrate_if_reachable(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    admin_token = await _first_admin_token(settings) if embedded else None
    async with contextlib.AsyncExitStack() as stack:
        if stop_tracing is not None:  # last out: flushes the spans of everything below
            stack.push_async_callback(asyncio.to_thread, stop_tracing)
        services = None
        if demo:  # the demo's parts (NATS server, samples) load only for --demo
            from .local.demo import demo_nats_file, demo_services, register_samples, traffic

            services = await stack.enter_async_context(demo_services(settings))
            _announce_demo(services.nats.url, demo_nats_file(settings))
            settings = services.settings
            await register_samples(settings)
        registry = await stack.enter_async_context(Registry.open(settings))
        invoker = await _open_invoker(stack, registry, settings)
        runtime = await stack.enter_async_context(Runtime.open(settings, registry, invoker))
        if invoker is None:
            _background(stack, _attach_invoker_later(stack, runtime))
        elif services is not None:
            _background(stack, traffic(invoker, services.samples, stop))
        log.info("serving", **registry.status.as_dict())
        await serve_api(runtime, host, port, stop, admin_token=admin_token)
        log.info("stopping")


async def _open_invoker(
    stack: contextlib.AsyncExitStack, registry: Registry, settings: Settings
) -> Invoker | None:
    """The NATS invoker, or None (logged) when NATS cannot be reached yet."""
    try:
        return await stack.enter_async_context(Invoker.open(registry, settings))
    except NatsUnavailable as exc:
        log.warning(
            "invoker_unavailable",
            error=str(exc),
            nats_url=settings.nats_display,
            retry="every few seconds; invoke and circuit routes answer 503 meanwhile",
        )
        return None


async def _attach_invoker_later(stack: contextlib.AsyncExitStack, runtime: Runtime) -> None:
    """Keep trying NATS; once it answers, give the running API its invoker (no restart)."""
    delay = INVOKER_RETRY_MIN_S
    while True:
        await asyncio.sleep(delay)
        try:
            invoker = await stack.enter_async_context(
                Invoker.open(runtime.registry, runtime.settings)
            )
        except NatsUnavailable:
            delay = min(delay * 2, INVOKER_RETRY_MAX_S)
            continue
        runtime.metrics.watch_invoker(invoker)
        runtime.invoker = invoker
        log.info("invoker_connected", nats_url=runtime.settings.nats_display)
        return


def _announce_demo(nats_url: str, published_in: Path) -> None:
    """Print where the demo's NATS is, for the person who started it (`extreg invoke`, the
    docs' examples and `Settings()` in this folder find it through `published_in`)."""
    sys.stdout.write(f"demo NATS server: {nats_url} (published in {published_in})\n")
    sys.stdout.flush()


def _background(stack: contextlib.AsyncExitStack, coro: Coroutine[Any, Any, None]) -> None:
    """Run `coro` until the stack unwinds (cancelled then, before what it entered closes)."""
    stack.push_async_callback(_stop_task, asyncio.create_task(coro))


async def _stop_task(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def _first_admin_token(settings: Settings) -> str | None:
    """The embedded default's admin token, created on its first start only."""
    return await ensure_admin_token(TokenStore.from_settings(settings))


async def _migrate_if_reachable(settings: Settings) -> None:
    from .adapters.migrate import migrate

    try:
        applied = await asyncio.to_thread(migrate, settings.conninfo)
    except SourceUnavailable as exc:
        log.warning("migrate_skipped", error=str(exc))
        return
    if applied:
        log.info("migrated", applied=applied)
