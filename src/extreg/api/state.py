"""Where a request finds the runtime: `app.state.runtime`, set once by `create_app`."""

from __future__ import annotations

from fastapi import Request

from ..runtime import Runtime


def runtime_of(request: Request) -> Runtime:
    runtime: Runtime = request.app.state.runtime
    return runtime
