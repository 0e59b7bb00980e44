"""Extension records: list, read, create, replace, patch, delete, enable, disable.

Reads come from the registry's cache. Writes go to the database with the token's name as the
actor, so the audit trigger records who made them and the change notification updates every
registry's cache, this one's included; the cache is never patched by hand. A write then
re-reads its record into this registry's cache (`Registry.refresh`), so that a GET right
after a write reads what was written. Every write, enable and disable included, goes through
`PostgresSource.write` (`writes.write_one`, the same sequence as a policy's), which checks
`If-Match` inside the transaction, under the per-id lock.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import msgspec
from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse

from ..auth import Principal
from ..core.model import Extension, ExtensionType, to_plain
from ..core.routing import routing_report
from ..errors import Conflict, ExtensionNotFound
from ..registry import Registry
from .bodies import json_object, json_response, record, request_body, same_id
from .etag import STALE, IfMatch, etag_of, existing
from .requestlog import bind_extension_id
from .security import Admin, Operator, Viewer
from .state import runtime_of
from .writes import writable, write_one

NOT_FOUND: dict[int | str, dict[str, Any]] = {404: {"description": "No such extension."}}

router = APIRouter(
    prefix="/admin/extensions", tags=["extensions"], dependencies=[Depends(bind_extension_id)]
)


@router.get("", responses={200: json_response("Extension", "Every cached extension.", array=True)})
async def list_extensions(
    request: Request,
    _: Viewer,
    type: ExtensionType | None = None,  # the contract's query parameter name
    enabled: bool | None = None,
) -> JSONResponse:
    """Every extension in the cache, disabled ones too, by id; filter by `type` and `enabled`."""
    found = [
        e
        for e in runtime_of(request).registry.all()
        if (type is None or e.type == type) and (enabled is None or e.enabled == enabled)
    ]
    return JSONResponse([to_plain(e) for e in found])


@router.get(
    "/{extension_id}", responses={200: json_response("Extension", "The record."), **NOT_FOUND}
)
async def get_extension(extension_id: str, request: Request, _: Viewer) -> JSONResponse:
    """One record, with its `ETag` for a later conditional PUT or PATCH."""
    ext = runtime_of(request).registry.get(extension_id)
    if ext is None:
        raise ExtensionNotFound(extension_id)
    return _record_response(ext)


@router.get(
    "/{extension_id}/versions",
    responses={200: {"description": "The versions in the order calls try them."}, **NOT_FOUND},
)
async def get_versions(extension_id: str, request: Request, _: Viewer) -> JSONResponse:
    """The record's versions in the order calls try them, with their rules and percent
    split, then its own row (the fallback): `extreg versions ID --json`'s answer."""
    ext = runtime_of(request).registry.get(extension_id)
    if ext is None:
        raise ExtensionNotFound(extension_id)
    return JSONResponse(routing_report(ext))


@router.post(
    "",
    status_code=201,
    openapi_extra=request_body("ExtensionCreate"),
    responses={
        201: json_response("Extension", "Created."),
        409: {"description": "The id exists, or the registry serves fixtures."},
    },
)
async def create_extension(request: Request, principal: Admin) -> JSONResponse:
    """Create a record; 409 when the id exists."""
    runtime = runtime_of(request)
    writable(runtime.registry)  # 409 in fixtures mode before even reading the body
    ext = record(await json_object(request, "<new record>"), runtime.settings, "<new record>")

    def change(current: Extension | None) -> Extension:
        if current is not None:
            raise Conflict(f"extension {ext.id!r} already exists")
        return ext

    after = await _write(runtime.registry, ext.id, change, principal)
    assert after is not None  # a create stores a record
    response = _record_response(after, 201)
    response.headers["Location"] = f"/admin/extensions/{after.id}"
    return response


@router.put(
    "/{extension_id}",
    openapi_extra=request_body("ExtensionReplace"),
    responses={
        200: json_response("Extension", "Replaced."),
        **NOT_FOUND,
        **STALE,
    },
)
async def replace_extension(
    extension_id: str,
    request: Request,
    principal: Admin,
    if_match: IfMatch = None,
) -> JSONResponse:
    """Replace a whole record (fields not given take their defaults)."""
    runtime = runtime_of(request)
    writable(runtime.registry)
    data = same_id(await json_object(request, extension_id), extension_id)
    ext = record(data, runtime.settings, extension_id)

    def change(current: Extension | None) -> Extension:
        existing(current, if_match, "extension", extension_id)
        return ext

    return _record_response(await _write(runtime.registry, extension_id, change, principal))


@router.patch(
    "/{extension_id}",
    openapi_extra=request_body("ExtensionPatch"),
    responses={
        200: json_response("Extension", "Changed."),
        **NOT_FOUND,
        **STALE,
    },
)
async def patch_extension(
    extension_id: str,
    request: Request,
    principal: Admin,
    if_match: IfMatch = None,
) -> JSONResponse:
    """Change the given top-level fields (an object such as `config` is replaced whole)."""
    runtime = runtime_of(request)
    writable(runtime.registry)
    patch = same_id(await json_object(request, extension_id), extension_id)

    def change(current: Extension | None) -> Extension:
        merged = {
            **to_plain(existing(current, if_match, "extension", extension_id), writable_only=True),
            **patch,
        }
        return record(merged, runtime.settings, extension_id)

    return _record_response(await _write(runtime.registry, extension_id, change, principal))


@router.delete(
    "/{extension_id}",
    status_code=204,
    response_class=Response,
    responses={204: {"description": "Deleted."}, **NOT_FOUND},
)
async def delete_extension(
    extension_id: str,
    request: Request,
    principal: Admin,
    if_match: IfMatch = None,
) -> Response:
    """Delete a record; its audit trail stays."""
    registry = runtime_of(request).registry

    def change(current: Extension | None) -> None:
        existing(current, if_match, "extension", extension_id)

    await _write(registry, extension_id, change, principal)
    return Response(status_code=204)


@router.post(
    "/{extension_id}/enable",
    responses={
        200: json_response("Extension", "Enabled."),
        **NOT_FOUND,
        **STALE,
    },
)
async def enable_extension(
    extension_id: str, request: Request, principal: Operator, if_match: IfMatch = None
) -> JSONResponse:
    """Enable an extension (audited as `enable`)."""
    return await _set_enabled(request, extension_id, True, principal, if_match)


@router.post(
    "/{extension_id}/disable",
    responses={
        200: json_response("Extension", "Disabled."),
        **NOT_FOUND,
        **STALE,
    },
)
async def disable_extension(
    extension_id: str, request: Request, principal: Operator, if_match: IfMatch = None
) -> JSONResponse:
    """Disable an extension (audited as `disable`); routers stop calling it at once."""
    return await _set_enabled(request, extension_id, False, principal, if_match)


# -- helpers ----------------------------------------------------------------------------------


def _record_response(ext: Extension | None, status: int = 200) -> JSONResponse:
    assert ext is not None  # callers pass stored records
    return JSONResponse(to_plain(ext), status_code=status, headers={"ETag": etag_of(ext)})


async def _write(
    registry: Registry,
    extension_id: str,
    change: Callable[[Extension | None], Extension | None],
    principal: Principal,
) -> Extension | None:
    """The record after the write (`writes.write_one`)."""
    return (await write_one(registry, "extension", extension_id, change, principal.name))[1]


async def _set_enabled(
    request: Request,
    extension_id: str,
    enabled: bool,
    principal: Principal,
    if_match: str | None,
) -> JSONResponse:
    registry = runtime_of(request).registry
    writable(registry)

    def change(current: Extension | None) -> Extension:
        return msgspec.structs.replace(
            existing(current, if_match, "extension", extension_id), enabled=enabled
        )

    return _record_response(await _write(registry, extension_id, change, principal))
