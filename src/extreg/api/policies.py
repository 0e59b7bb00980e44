"""Routing policies: list, read, create, replace, patch, delete, run, and dry-run.

As for extension records (`records`): reads come from the registry's cache; writes go to the
database through its one write path for policies (`PostgresSource.write_policies`) with the
token's name as the actor, so the audit trigger records who made them (`policy_create`,
`policy_update`, `policy_delete`) and the change notification updates every registry. The
`change` given to the write runs under the write's locks on the policy as committed, so an
`If-Match` is checked there, and the write checks every extension id against the extensions
as committed (422 naming the field and item). A write then re-reads its policy into this
registry's cache, so that a GET right after it reads what was written (`writes.write_one`,
the sequence of an extension's write too).

A run goes through this process's invoker (`Invoker.run_policy`), so breakers, health and
retries apply to each step as to a direct call; its errors map to statuses in `errors`
(`policy_status`). A dry run plans the steps for the context (`core.pipeline.plan`) and
sends nothing.
"""

from __future__ import annotations

import time
from typing import Annotated, Any

import structlog
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from .. import tracing
from ..core.pipeline import context_problems, plan
from ..core.policy import Policy, complexity_warnings, policy_to_plain
from ..errors import (
    Conflict,
    InvalidRecord,
    NatsUnavailable,
    PolicyError,
    PolicyNotFound,
)
from .bodies import (
    json_object,
    json_response,
    policy_body,
    policy_record,
    request_body,
    same_policy_id,
    strict_body,
)
from .etag import STALE, IfMatch, check_if_match, etag_of, existing, unmatched
from .operate import NO_INVOKER
from .policy_runs import RecentRuns
from .security import Admin, Operator, Viewer
from .state import runtime_of
from .writes import ms_since, writable, write_one

log = structlog.get_logger("extreg.api")


async def bind_policy_id(request: Request) -> None:
    """Router dependency: put the path's `policy_id` on every log event of the request."""
    policy_id = request.path_params.get("policy_id")
    if policy_id is not None:
        structlog.contextvars.bind_contextvars(policy_id=policy_id)


StrictBody = Annotated[None, Depends(strict_body)]  # after the token check: a parameter
NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such policy."}}
INVALID: dict[int | str, dict[str, Any]] = {
    422: {
        "description": "The policy breaks a rule (a field, a depth limit, an id naming no "
        "extension of its stage's type); `detail[].loc` names the field and the item. "
        "Nothing is written."
    }
}
RUN_ERRORS: dict[int | str, dict[str, Any]] = {
    403: {"description": "ValidatorBlocked: a blocking validator rejected (or failed); its "
          "`reason` and `details` are top-level."},
    404: {"description": "PolicyNotFound."},
    409: {"description": "PolicyDisabled."},
    502: {"description": "StepFailed (a required pre or post failed) or NoProvider."},
    503: {"description": "The failing step's extension could not be called (circuit open, "
          "disabled, gone, NATS down), or this server runs without an invoker."},
    504: {"description": "The failing step timed out."},
}  # fmt: skip

router = APIRouter(
    prefix="/admin/policies", tags=["policies"], dependencies=[Depends(bind_policy_id)]
)


class RunBody(BaseModel):
    """A run's (or a dry run's) input."""

    model_config = ConfigDict(extra="forbid")
    message: dict[str, Any] = Field(
        default_factory=dict, description="The message the first step gets."
    )
    context: dict[str, Any] = Field(
        default_factory=dict,
        description="`trace_id`, `tenant_id` (else the policy's), and the keys `when` matches.",
    )


@router.get("", responses={200: json_response("PolicyListed", "Every cached policy.", array=True)})
async def list_policies(
    request: Request, _: Viewer, enabled: bool | None = None, tenant_id: str | None = None
) -> JSONResponse:
    """Every policy in the cache, disabled ones too, by id; each with `unusable` (what stops
    it from running as written: extensions it names that are gone or disabled) and
    `recent_runs` (the outcomes of this server's last runs of it)."""
    registry = runtime_of(request).registry
    return JSONResponse(
        [
            _listed(request, p)
            for p in registry.policies()
            if (enabled is None or p.enabled == enabled)
            and (tenant_id is None or p.tenant_id == tenant_id)
        ]
    )


@router.get(
    "/{policy_id}",
    responses={200: json_response("PolicyListed", "The policy, as listed."), **NOT_FOUND},
)
async def get_policy(policy_id: str, request: Request, _: Viewer) -> JSONResponse:
    """One policy as the list shows it (with `unusable` and `recent_runs`), and its `ETag`
    for a later conditional PUT, PATCH or DELETE; what it answers can be sent back as is."""
    policy = runtime_of(request).registry.policy(policy_id)
    if policy is None:
        raise PolicyNotFound(policy_id)
    return JSONResponse(_listed(request, policy), headers={"ETag": etag_of(policy)})


@router.post(
    "",
    status_code=201,
    openapi_extra=request_body("PolicyCreate"),
    responses={
        201: json_response("PolicyWritten", "Created."),
        409: {"description": "The id exists, or the registry serves fixtures."},
        **INVALID,
    },
)
async def create_policy(request: Request, principal: Admin) -> JSONResponse:
    """Create a policy; 409 when the id exists. The answer carries `warnings`."""
    runtime = runtime_of(request)
    writable(runtime.registry)  # 409 in fixtures mode before even reading the body
    data = policy_body(await json_object(request, "<new policy>"))
    policy = policy_record(data, runtime.settings, "<new policy>")

    def change(current: Policy | None) -> Policy:
        if current is not None:
            raise Conflict(f"policy {policy.policy_id!r} already exists")
        return policy

    _, after = await write_one(runtime.registry, "policy", policy.policy_id, change, principal.name)
    response = _written(after, 201)
    response.headers["Location"] = f"/admin/policies/{policy.policy_id}"
    return response


@router.put(
    "/{policy_id}",
    openapi_extra=request_body("PolicyReplace"),
    responses={
        200: json_response("PolicyWritten", "Replaced."),
        201: json_response("PolicyWritten", "Created (there was no policy of this id)."),
        **STALE,
        **INVALID,
    },
)
async def replace_policy(
    policy_id: str, request: Request, principal: Admin, if_match: IfMatch = None
) -> JSONResponse:
    """Replace a whole policy (fields not given take their defaults), or create it when there
    is none (201), so that applying a policy file is one idempotent request (`extreg policy
    apply`); with `If-Match`, only replace (412 when there is none, or it changed)."""
    runtime = runtime_of(request)
    writable(runtime.registry)
    data = same_policy_id(policy_body(await json_object(request, policy_id)), policy_id)
    policy = policy_record(data, runtime.settings, policy_id)

    def change(current: Policy | None) -> Policy:
        if current is None and if_match is not None:
            raise unmatched(f"policy {policy_id!r}", if_match, "create it")
        if current is not None:
            check_if_match(if_match, current)
        return policy

    outcome, after = await write_one(runtime.registry, "policy", policy_id, change, principal.name)
    return _written(after, 201 if outcome == "created" else 200)


@router.patch(
    "/{policy_id}",
    openapi_extra=request_body("PolicyPatch"),
    responses={
        200: json_response("PolicyWritten", "Changed."),
        **NOT_FOUND,
        **STALE,
        **INVALID,
    },
)
async def patch_policy(
    policy_id: str, request: Request, principal: Admin, if_match: IfMatch = None
) -> JSONResponse:
    """Change the given top-level fields (a stage list such as `pre` is replaced whole)."""
    runtime = runtime_of(request)
    writable(runtime.registry)
    patch = same_policy_id(policy_body(await json_object(request, policy_id)), policy_id)

    def change(current: Policy | None) -> Policy:
        merged = {
            **policy_to_plain(existing(current, if_match, "policy", policy_id), writable_only=True),
            **patch,
        }
        return policy_record(merged, runtime.settings, policy_id)

    return _written(
        (await write_one(runtime.registry, "policy", policy_id, change, principal.name))[1]
    )


@router.delete(
    "/{policy_id}",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Deleted."}, **NOT_FOUND, **STALE},
)
async def delete_policy(
    policy_id: str, request: Request, principal: Admin, if_match: IfMatch = None
) -> Response:
    """Delete a policy; its audit trail stays. Without `If-Match` the row goes whatever it
    holds, one that plain SQL broke too (left out of the cache, `invalid_records` names it);
    with one, only a policy that reads and matches (412 otherwise)."""
    registry = runtime_of(request).registry
    writable(registry)

    def change(current: Policy | None) -> None:
        if if_match is None:
            return  # a broken row reads as None, yet the delete removes it
        if current is None:
            raise unmatched(f"policy {policy_id!r}", if_match, "delete it")
        check_if_match(if_match, current)

    outcome, _ = await write_one(registry, "policy", policy_id, change, principal.name)
    if outcome == "absent":
        raise PolicyNotFound(policy_id)
    return Response(status_code=204)


@router.post(
    "/{policy_id}/run",
    responses={
        200: {"description": "The result: `message`, `context`, `provider_id`, `steps`."},
        **RUN_ERRORS,
    },
)
async def run_policy(
    policy_id: str, body: RunBody, request: Request, _: Operator, __: StrictBody
) -> JSONResponse:
    """Run the policy on `message`, as the router would; every error answer carries `error`,
    `detail`, `reason` and the `steps` so far."""
    runtime = runtime_of(request)
    invoker = runtime.invoker
    context = _context(policy_id, body.context)
    if invoker is None:
        runtime.registry.lookup_policy(policy_id)  # 404 or 409 before "no invoker"
        raise NatsUnavailable(NO_INVOKER.format(what="policy runs are"))
    started = time.perf_counter()
    try:
        with tracing.continued(request.headers):
            result = await invoker.run_policy(policy_id, body.message, context)
    except PolicyError as exc:
        log.info(
            "policy_run_by_request",
            outcome=type(exc).__name__,
            duration_ms=ms_since(started),
        )
        raise
    log.info("policy_run_by_request", outcome="ok", duration_ms=ms_since(started))
    return JSONResponse(result.as_dict())


@router.post(
    "/{policy_id}/dry-run",
    responses={
        200: {"description": '`{"steps": [...]}`: each step `would_run` or `skipped`.'},
        404: {"description": "PolicyNotFound."},
        409: {"description": "PolicyDisabled: a run would do nothing."},
    },
)
async def dry_run_policy(
    policy_id: str, body: RunBody, request: Request, _: Viewer, __: StrictBody
) -> JSONResponse:
    """The steps a run would take for this context, by the policy's `when` conditions;
    sends nothing to any extension."""
    policy = runtime_of(request).registry.lookup_policy(policy_id)
    context = _context(policy_id, body.context)
    if context.get("tenant_id") is None and policy.tenant_id is not None:
        context["tenant_id"] = policy.tenant_id  # as a run fills it
    return JSONResponse({"steps": [step.as_dict() for step in plan(policy, context)]})


# -- helpers ----------------------------------------------------------------------------------


def recent_runs(request: Request) -> RecentRuns:
    runs: RecentRuns = request.app.state.policy_runs
    return runs


def _listed(request: Request, policy: Policy) -> dict[str, Any]:
    """A policy as the reads serve it: the record, what makes it unusable, its recent runs."""
    unusable = runtime_of(request).registry.snapshot.unusable_policies
    return {
        **policy_to_plain(policy),
        "unusable": unusable.get(policy.policy_id, []),
        "recent_runs": recent_runs(request).summary(policy.policy_id),
    }


def _context(policy_id: str, context: dict[str, Any]) -> dict[str, Any]:
    """The run's context, checked as the runner checks it (`context_problems`), so that a
    run answers 422 naming the field before it needs an invoker, and a dry run refuses what
    a run would."""
    if problems := context_problems(context):
        raise InvalidRecord(policy_id, problems, kind="context")  # as the runner raises it
    return dict(context)


def _written(policy: Policy | None, status: int = 200) -> JSONResponse:
    """A write's answer: the policy as stored, its `warnings`, and its ETag."""
    assert policy is not None  # callers pass stored policies
    return JSONResponse(
        {**policy_to_plain(policy), "warnings": complexity_warnings(policy)},
        status_code=status,
        headers={"ETag": etag_of(policy)},
    )
