"""The pipeline runner: one routing policy run over NATS (`Invoker.run_policy`).

    result = await inv.run_policy("support_en", message, {"trace_id": "t-1"}, provider=hook)
    result.message, result.context, result.provider_id, result.steps

The decisions are `extreg.core.pipeline`'s (pure); this module only sequences the calls. The
context is checked first (`context_problems`). Every extension step goes through
`Invoker.invoke`, so breakers, health, health-based routing, limits and retries apply to a
step exactly as to a direct call, once its extension is found still of the stage's type (one
`Registry.get`; `retyped`). Order (SPEC.md, "Routing policies and the pipeline"):

- `pre`, then (after the provider) `post`: sequential awaits, each step on the message the
  previous one left. An error is a `failed` step; a `required` item then stops the run with
  `StepFailed`, an `optional` one is passed over.
- `validators`: one asyncio task each (a single one is just awaited), decided as a
  sequential run in policy order would be (`settle`), the rest cancelled as soon as that is
  certain. A cancelled `invoke` records nothing: its `CancelledError` is no `ExtensionError`,
  so neither the breaker nor the health monitor hears of it, and the transport forgets the
  reply inbox, so a late reply is dropped unread. Only the steps a sequential run would list
  are listed (up to the blocking one).
- `providers`: tried in order until one answers; a `name:model` entry goes to the caller's
  `provider` hook (copies of message and context, bounded by `extension_max_timeout_ms`, no
  breaker or health). A policy without providers ends after its validators.

With tracing active (`extreg.tracing`), a run is an `extreg.policy <id>` span with its outcome
(`extreg.policy.outcome`; a block is no error there), its steps' invocations (and provider-hook
calls) its children, and a run without a `trace_id` takes the span's trace id as its own, so
log lines and envelopes name the same trace.

A run reports to each of `observers` (the metrics, the dashboard's recent runs) once, at its end, with
its outcome (`OUTCOMES`), its duration and its steps, so the per-step path does no metric
work. A blocked run logs one info line, a failed one one warning.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from time import perf_counter
from typing import TYPE_CHECKING, Any
from uuid import uuid4

import structlog

from .. import tracing
from ..core.model import Extension
from ..core.pipeline import (
    SKIPPED_REASON,
    Step,
    Verdict,
    apply_reply,
    bounded,
    context_problems,
    failed_status,
    provider_message,
    settle,
    step_metadata,
    step_request,
    verdict_of,
    when_matches,
)
from ..core.policy import STAGE_TYPES, Policy, Stage, StepItem, ValidatorItem
from ..errors import (
    ExtensionError,
    ExtensionNotFound,
    ExtensionTimeout,
    InvalidRecord,
    InvalidResponse,
    InvocationError,
    NoProvider,
    PolicyDisabled,
    PolicyError,
    PolicyNotFound,
    StepFailed,
    ValidatorBlocked,
)

if TYPE_CHECKING:
    from .invoker import Invoker

log = structlog.get_logger("extreg.invoke.pipeline")

ProviderHook = Callable[[str, dict[str, Any], dict[str, Any]], Awaitable[Mapping[str, Any]]]
"""`await provider(name, message, context)` serves a `name:model` provider entry; it answers
a provider-like reply (`{"output": ..., "metadata": {...}}`)."""
PolicyObserver = Callable[[str, str, float, Sequence[Step]], None]
"""`observer(policy_id, outcome, seconds, steps)` after every run (metrics, recent runs)."""

OUTCOMES = ("ok", "blocked", "step_failed", "no_provider", "not_found", "disabled")
"""A run's outcome, as `PolicyObserver` gets it: `ok` (a result), `blocked`
(`ValidatorBlocked`), `step_failed` (`StepFailed`), `no_provider` (`NoProvider`),
`not_found` / `disabled` (`PolicyNotFound` / `PolicyDisabled`, nothing ran). A cancelled run,
or one ended by an exception outside `PolicyError`, is not reported."""
NO_HOOK_REASON = "no provider hook was given for this name:model provider"
_NO_STEPS: tuple[Step, ...] = ()
_NO_CONFIG: Mapping[str, Any] = {}
_VALIDATOR, _PROVIDER = STAGE_TYPES["validators"], STAGE_TYPES["providers"]


@dataclass(slots=True)
class PolicyResult:
    """What a run answers: the final message (after post), the merged context, the provider
    that answered (None for a policy without providers) and every step, in policy order."""

    policy_id: str
    message: dict[str, Any]
    context: dict[str, Any]
    provider_id: str | None
    steps: list[Step]

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, steps as dicts (the HTTP answer)."""
        return {
            "policy_id": self.policy_id,
            "message": self.message,
            "context": self.context,
            "provider_id": self.provider_id,
            "steps": [step.as_dict() for step in self.steps],
        }


class PipelineRunner:
    """Runs policies with one invoker (`Invoker.pipeline`); see the module docstring."""

    def __init__(self, invoker: Invoker) -> None:
        self._invoker = invoker
        self.observers: list[PolicyObserver] = []

    async def run(
        self,
        policy_id: str,
        message: Mapping[str, Any],
        context: Mapping[str, Any] | None = None,
        provider: ProviderHook | None = None,
    ) -> PolicyResult:
        """Run the policy on `message`; a `PolicyResult` or a `PolicyError`. A context that
        `context_problems` refuses (a `dry_run` key, an id that is no short string) raises
        `InvalidRecord` (kind "context") before anything is sent."""
        if context and (problems := context_problems(context)):
            raise InvalidRecord(policy_id, problems, kind="context")
        if not tracing.active():
            return await self._run(policy_id, message, context, provider)
        name, attributes = f"extreg.policy {policy_id}", {"extreg.policy.id": policy_id}
        with tracing.span(name, attributes=attributes, expected=(ValidatorBlocked,)) as span:
            try:
                result = await self._run(policy_id, message, context, provider)
            except PolicyError as exc:
                span.set_attribute("extreg.policy.outcome", _outcome_of(exc))
                raise
            span.set_attribute("extreg.policy.outcome", "ok")
            return result

    async def _run(
        self,
        policy_id: str,
        message: Mapping[str, Any],
        context: Mapping[str, Any] | None,
        provider: ProviderHook | None,
    ) -> PolicyResult:
        started = perf_counter()
        observers = self.observers
        try:
            policy = self._invoker.registry.lookup_policy(policy_id)
        except PolicyNotFound:
            _tell(observers, policy_id, "not_found", started, _NO_STEPS)
            raise
        except PolicyDisabled:
            _tell(observers, policy_id, "disabled", started, _NO_STEPS)
            raise
        ctx = dict(context) if context else {}
        if ctx.get("tenant_id") is None and policy.tenant_id is not None:
            ctx["tenant_id"] = policy.tenant_id
        if not ctx.get("trace_id"):  # one id for every step: the run's trace when traced
            ctx["trace_id"] = tracing.trace_id_hex() or uuid4().hex
        steps: list[Step] = []
        try:
            result = await _Run(self._invoker, policy, steps, provider).run(dict(message), ctx)
        except PolicyError as exc:
            outcome = _outcome_of(exc)
            _tell(observers, policy_id, outcome, started, steps)
            last = steps[-1] if steps else None
            # A block is the policy doing its job (info); a failed run is trouble (warning).
            blocked = isinstance(exc, ValidatorBlocked)
            (log.info if blocked else log.warning)(
                "policy_run_blocked" if blocked else "policy_run_failed",
                policy_id=policy_id,
                outcome=outcome,
                stage=last.stage if last else None,
                step=last.id if last else None,
                reason=exc.reason,
                trace_id=ctx.get("trace_id"),
                tenant_id=ctx.get("tenant_id"),
            )
            raise
        _tell(observers, policy_id, "ok", started, steps)
        return result


class _Run:
    """One run's state: the policy, the steps so far, the hook. Made per run so the stage
    methods share it without passing it around."""

    __slots__ = (
        "get",
        "hook_timeout_ms",
        "invoke",
        "meta",
        "meta_of",
        "policy",
        "policy_id",
        "provider",
        "steps",
    )

    def __init__(
        self,
        invoker: Invoker,
        policy: Policy,
        steps: list[Step],
        provider: ProviderHook | None,
    ) -> None:
        self.invoke = invoker.invoke  # read per run, so a replaced `invoke` is honoured
        self.get = invoker.registry.get
        self.policy = policy
        self.policy_id = policy.policy_id
        self.steps = steps
        self.provider = provider
        self.hook_timeout_ms = invoker.settings.extension_max_timeout_ms
        self.meta_of: dict[str, Any] | None = None  # the context `meta` was made from
        self.meta: dict[str, Any] = {}

    def request(
        self, message: dict[str, Any], ctx: dict[str, Any], config: Mapping[str, Any]
    ) -> dict[str, Any]:
        """`step_request`, its `step_metadata` made once per context (a context is never
        changed in place: a reply's metadata makes a new one, the hook gets a copy)."""
        if ctx is not self.meta_of:
            self.meta, self.meta_of = step_metadata(ctx, self.policy_id), ctx
        return step_request(message, self.meta, config)

    async def run(self, message: dict[str, Any], ctx: dict[str, Any]) -> PolicyResult:
        policy = self.policy
        if policy.pre:
            message, ctx = await self.sequence("pre", policy.pre, message, ctx)
        if policy.validators:
            await self.validate(message, ctx)
        provider_id = None
        if policy.providers:
            message, provider_id = await self.provide(message, ctx)
            if policy.post:
                message, ctx = await self.sequence("post", policy.post, message, ctx)
        return PolicyResult(self.policy_id, message, ctx, provider_id, self.steps)

    # -- pre and post ---------------------------------------------------------------------

    async def sequence(
        self,
        stage: Stage,
        items: Sequence[StepItem],
        message: dict[str, Any],
        ctx: dict[str, Any],
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        steps, invoke, policy_id, get = self.steps, self.invoke, self.policy_id, self.get
        wanted = STAGE_TYPES[stage]
        for item in items:
            if not when_matches(item.when, ctx):
                steps.append(Step(stage, item.id, "skipped", 0.0, SKIPPED_REASON))
                continue
            started = perf_counter()
            try:
                if (ext := get(item.id)) is not None and ext.type != wanted:
                    raise retyped(ext, wanted)
                reply = await invoke(item.id, self.request(message, ctx, item.config), ctx)
            except ExtensionError as exc:
                reason = bounded(exc.reason)
                steps.append(
                    Step(stage, item.id, "failed", (perf_counter() - started) * 1000.0, reason)
                )
                if item.mode == "required":
                    raise StepFailed(
                        policy_id,
                        f"required {stage} step {item.id} failed: {reason}",
                        steps,
                        exc,
                    ) from exc
                continue
            steps.append(Step(stage, item.id, "ok", (perf_counter() - started) * 1000.0))
            message, ctx = apply_reply(message, ctx, reply)
        return message, ctx

    # -- validators -----------------------------------------------------------------------

    async def validate(self, message: dict[str, Any], ctx: dict[str, Any]) -> None:
        """Run the validators; list their steps as a sequential run would; raise
        `ValidatorBlocked` at the first blocking reject."""
        items = self.policy.validators
        answers: list[_Answer | None] = [None] * len(items)
        active = []
        for index, item in enumerate(items):
            if not when_matches(item.when, ctx):
                answers[index] = _SKIPPED
            else:
                active.append(index)
        if len(active) == 1:
            index = active[0]
            answers[index] = await self.ask(items[index], message, ctx)
        elif active:
            await self.ask_together(items, active, answers, message, ctx)
        self.list_validators(items, answers, ctx)

    async def ask(
        self, item: ValidatorItem, message: dict[str, Any], ctx: dict[str, Any]
    ) -> _Answer:
        started = perf_counter()
        try:
            if (ext := self.get(item.id)) is not None and ext.type != _VALIDATOR:
                raise retyped(ext, _VALIDATOR)
            reply = await self.invoke(item.id, self.request(message, ctx, item.config), ctx)
        except ExtensionError as exc:  # a timeout or an error counts as a reject
            return _Answer(
                Verdict(False, bounded(exc.reason)), (perf_counter() - started) * 1000.0, exc
            )
        return _Answer(verdict_of(reply), (perf_counter() - started) * 1000.0, None)

    async def ask_together(
        self,
        items: Sequence[ValidatorItem],
        active: list[int],
        answers: list[_Answer | None],
        message: dict[str, Any],
        ctx: dict[str, Any],
    ) -> None:
        """Ask the `active` validators at once; fill `answers` until the outcome is certain
        (`settle`), then cancel the ones still asking."""
        tasks: dict[asyncio.Future[_Answer], int] = {
            asyncio.create_task(self.ask(items[i], message, ctx)): i for i in active
        }
        pending: set[asyncio.Future[_Answer]] = set(tasks)
        verdicts: list[Verdict | None] = [a.verdict if a is not None else None for a in answers]
        try:
            while settle(items, verdicts) is None:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    index = tasks[task]
                    answer = answers[index] = task.result()
                    verdicts[index] = answer.verdict
        finally:
            if pending:  # the outcome is certain (or this run was cancelled): stop asking
                for task in pending:
                    task.cancel()
                await asyncio.wait(pending)

    def list_validators(
        self, items: Sequence[ValidatorItem], answers: list[_Answer | None], ctx: dict[str, Any]
    ) -> None:
        steps = self.steps
        for item, answer in zip(items, answers, strict=True):
            assert answer is not None  # settled: every answer up to the blocking one is in
            verdict = answer.verdict
            if answer is _SKIPPED:
                steps.append(Step("validator", item.id, "skipped", 0.0, SKIPPED_REASON))
                continue
            if verdict.ok:
                steps.append(Step("validator", item.id, "ok", answer.latency_ms))
                continue
            status = failed_status(item)
            steps.append(Step("validator", item.id, status, answer.latency_ms, verdict.reason))
            if status == "rejected":
                raise ValidatorBlocked(
                    self.policy_id,
                    item.id,
                    verdict.reason,
                    verdict.details,
                    steps,
                    answer.error,
                )
            if status == "warned":
                log.warning(
                    "validator_warned",
                    policy_id=self.policy_id,
                    stage="validator",
                    step=item.id,
                    reason=verdict.reason,
                    trace_id=ctx.get("trace_id"),
                    tenant_id=ctx.get("tenant_id"),
                )

    # -- providers ------------------------------------------------------------------------

    async def provide(
        self, message: dict[str, Any], ctx: dict[str, Any]
    ) -> tuple[dict[str, Any], str]:
        """The first provider that answers, in order; `NoProvider` when none does."""
        steps, invoke, get = self.steps, self.invoke, self.get
        last_error: ExtensionError | None = None
        for name in self.policy.providers:
            if ":" in name and self.provider is None:
                steps.append(Step("provider", name, "failed", 0.0, NO_HOOK_REASON))
                continue
            started = perf_counter()
            try:
                if ":" in name:
                    reply = await self.hook(name, message, ctx)
                else:
                    if (ext := get(name)) is not None and ext.type != _PROVIDER:
                        raise retyped(ext, _PROVIDER)
                    reply = await invoke(name, self.request(message, ctx, _NO_CONFIG), ctx)
            except ExtensionError as exc:  # open circuit, disabled, timeout, error: next one
                last_error = exc
                steps.append(
                    Step(
                        "provider",
                        name,
                        "failed",
                        (perf_counter() - started) * 1000.0,
                        bounded(exc.reason),
                    )
                )
                continue
            steps.append(Step("provider", name, "ok", (perf_counter() - started) * 1000.0))
            return provider_message(message, reply, name), name
        reason = "no provider answered"
        if last_error is not None:
            reason += f"; last: {last_error.extension_id}: {bounded(last_error.reason)}"
        raise NoProvider(self.policy_id, reason, steps, last_error)

    async def hook(
        self, name: str, message: dict[str, Any], ctx: dict[str, Any]
    ) -> Mapping[str, Any]:
        """The caller's hook for a `name:model` entry, bounded by `extension_max_timeout_ms`
        (no breaker, health or limits: it is no extension). It gets copies of the message and
        the context, so changing them in place changes nothing of the run (whose request
        metadata is cached per context object). Its failures are this provider's: an
        `ExtensionError` as raised, a `TimeoutError` (the bound's, or its own) an
        `ExtensionTimeout`, anything else an `InvocationError` naming the exception's class
        only (its text may hold a key or a URL). Traced as `extreg.provider_hook <name>`."""
        if not tracing.active():
            return await self._hook(name, message, ctx)
        with tracing.span(f"extreg.provider_hook {name}"):
            return await self._hook(name, message, ctx)

    async def _hook(
        self, name: str, message: dict[str, Any], ctx: dict[str, Any]
    ) -> Mapping[str, Any]:
        hook = self.provider
        assert hook is not None  # `provide` passes over hook entries without one
        limit_ms = self.hook_timeout_ms
        try:
            async with asyncio.timeout(limit_ms / 1000):
                reply = await hook(name, dict(message), dict(ctx))
        except ExtensionError:
            raise
        except TimeoutError as exc:
            raise ExtensionTimeout(
                name, f"provider hook did not answer within {limit_ms} ms", 1
            ) from exc
        except Exception as exc:
            raise InvocationError(name, f"provider hook raised {type(exc).__name__}", 1) from exc
        if not isinstance(reply, Mapping):
            raise InvalidResponse(
                name, f"provider hook answered {type(reply).__name__}, not an object", 1
            )
        return reply


@dataclass(slots=True)
class _Answer:
    """A validator's answer: its verdict, how long it took, the error behind a reject."""

    verdict: Verdict
    latency_ms: float
    error: ExtensionError | None


_SKIPPED = _Answer(Verdict(True), 0.0, None)


def retyped(ext: Extension, wanted: str) -> ExtensionNotFound:
    """A step whose id now names an extension of another type (deleted and recreated since
    the policy was written) is unavailable, as a missing one is: calling it would misread
    its reply (a `pre` answers no `status`, which a validator's reading takes for ok)."""
    return ExtensionNotFound(ext.id, f"is now a {ext.type} extension, not a {wanted}")


def _tell(
    observers: list[PolicyObserver],
    policy_id: str,
    outcome: str,
    started: float,
    steps: Sequence[Step],
) -> None:
    """Tell each observer of the run. One that raises is logged and passed over: watching a
    run must never change its outcome, nor keep the others from hearing of it."""
    if observers:
        seconds = perf_counter() - started
        for observe in observers:
            try:
                observe(policy_id, outcome, seconds, steps)
            except Exception as exc:
                log.error(
                    "policy_observer_failed",
                    policy_id=policy_id,
                    outcome=outcome,
                    error=type(exc).__name__,
                )


def _outcome_of(exc: PolicyError) -> str:
    if isinstance(exc, ValidatorBlocked):
        return "blocked"
    if isinstance(exc, StepFailed):
        return "step_failed"
    if isinstance(exc, NoProvider):
        return "no_provider"
    return "disabled" if isinstance(exc, PolicyDisabled) else "not_found"
