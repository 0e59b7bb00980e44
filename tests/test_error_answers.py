"""Every error answer has `error` and `detail`, FastAPI's and the HTTP server's own included,
and a client gone mid-body is logged as a disconnect, not a 500 (issue 9, item 7)."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time
from pathlib import Path

import httpx
import pytest
import structlog
from api_helpers import EchoInvoker, LiveServer, make_tokens, seed
from helpers import make_settings, record
from structlog.testing import capture_logs
from structlog.typing import EventDict
from test_connection_limits import closed_by_server, serving

from extreg.api import create_app
from extreg.api.errors import loc_of
from extreg.auth import generate_token, hash_token
from extreg.client import class_named
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime

DEADLINE_S = 60.0


def _error_shape(answer: httpx.Response) -> tuple[int, str, bool]:
    """(status, `error`, whether `detail` is there); `error` must name a class of the tree."""
    body = answer.json()
    assert answer.headers["content-type"].startswith("application/json")
    assert class_named(body["error"]) is not None, body
    return answer.status_code, body["error"], bool(body["detail"])


async def test_fastapi_own_errors_answer_error_and_detail(tmp_path: Path) -> None:
    """Unknown route (404), method not allowed (405), a body FastAPI cannot read (400), a body
    model or query parameter FastAPI refuses (422), a missing token (401) and invoke without an
    invoker (503) all answer JSON with `error` and `detail`, against the real app."""
    token = generate_token()
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(
        json.dumps({"tokens": {"root": {"role": "admin", "sha256": hash_token(token)}}}),
        encoding="utf-8",
    )
    settings = make_settings(tmp_path, source="fixtures", api_tokens_file=tokens_file)
    admin = {"Authorization": f"Bearer {token}"}
    as_json = {**admin, "Content-Type": "application/json"}
    invoke = "/admin/extensions/normalize_text/invoke"
    async with (
        Registry.open(settings) as registry,
        Runtime.open(settings, registry, metrics=Metrics()) as runtime,
    ):
        transport = httpx.ASGITransport(app=create_app(runtime))
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
            answers = {
                "unknown route": await client.get("/no/such/route", headers=admin),
                "method not allowed": await client.delete("/healthz"),
                "unreadable body": await client.post(
                    invoke, content=b"[" * 100_000, headers=as_json
                ),  # RecursionError
                "body model": await client.post(
                    invoke, content=b'{"payload": 1, "x": 2}', headers=as_json
                ),
                "invalid JSON": await client.post(invoke, content=b"{", headers=as_json),
                "query parameter": await client.get(
                    "/admin/extensions?enabled=maybe", headers=admin
                ),
                "no token": await client.get("/admin/status"),
                "no invoker": await client.post(invoke, json={"payload": {}}, headers=admin),
            }
    shapes = {case: _error_shape(answer) for case, answer in answers.items()}
    assert shapes == {
        "unknown route": (404, "ApiError", True),
        "method not allowed": (405, "ApiError", True),
        "unreadable body": (400, "InvalidRecord", True),
        "body model": (422, "InvalidRecord", True),
        "invalid JSON": (422, "InvalidRecord", True),
        "query parameter": (422, "InvalidRecord", True),
        "no token": (401, "AuthFailed", True),
        "no invoker": (503, "NatsUnavailable", True),
    }
    assert "GET" in answers["method not allowed"].headers["allow"]
    problem = answers["query parameter"].json()["detail"][0]
    assert (["query", "enabled"], {"loc", "msg", "type"}) == (problem["loc"], set(problem))


def test_the_servers_own_answer_to_malformed_http_is_json(tmp_path: Path) -> None:
    """A request line that is not HTTP gets the server's 400 (before any app code runs) as
    JSON with `error` and `detail`, then the connection is closed."""
    with serving(tmp_path) as served:
        sock = served.connect()
        sock.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        got = bytearray()
        deadline = time.monotonic() + DEADLINE_S
        while not closed_by_server(sock, got) and time.monotonic() < deadline:
            time.sleep(0.05)
        sock.close()
    head, _, body = bytes(got).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    assert {"error", "detail"} <= set(json.loads(body))


def _send_part_and_close(port: int, path: str, token: str) -> None:
    """Content-Length 1000, 10 bytes of it, then gone."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as sock:
        sock.sendall(
            f"POST {path} HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
            '{"payload"'.encode()
        )
        time.sleep(0.2)  # let the app start reading


def _wait_for(events: list[EventDict], name: str, count: int) -> list[EventDict]:
    deadline = time.monotonic() + DEADLINE_S
    while len(found := [e for e in events if e["event"] == name]) < count:
        assert time.monotonic() < deadline, f"fewer than {count} {name} events: {events}"
        time.sleep(0.05)
    return found


def test_a_client_gone_mid_body_is_logged_as_a_disconnect(
    tmp_path: Path, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """A record body read by hand (Starlette's ClientDisconnect) and a body model read by
    FastAPI (its 400 built from the disconnect), each cut off after 10 of 1000 bytes, against
    a live server: one `client_disconnected` line each and `http_request` with 499, no 500,
    no traceback from the app or from uvicorn."""
    settings = make_settings(tmp_path, source="database", database_url=db_url)
    asyncio.run(seed(db_url, settings, record("alpha")))
    tokens = asyncio.run(make_tokens(db_url))
    paths = ["/admin/extensions", "/admin/extensions/alpha/invoke"]
    caplog.set_level(logging.WARNING)
    with (
        capture_logs(processors=[structlog.contextvars.merge_contextvars]) as events,
        LiveServer(settings, invoker=EchoInvoker()) as server,
    ):
        for path in paths:
            _send_part_and_close(server.port, path, tokens["admin"])
        gone = _wait_for(events, "client_disconnected", 2)
        requests = _wait_for(events, "http_request", 2)
    assert [(p, 10, "1000") for p in paths] == [
        (e["path"], e["received_bytes"], e["declared_bytes"]) for e in gone
    ]
    assert [(p, 499) for p in paths] == [(e["path"], e["status"]) for e in requests]
    assert [] == [e for e in events if e.get("status") == 500 or "exc_info" in e]
    assert [] == [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_field_path_with_a_non_ascii_digit_key_is_a_name_not_an_index() -> None:
    """An unknown key such as '¹' (a digit to str.isdigit, not to int) stays a name in the
    422's loc: found by schemathesis as a 500."""
    assert ["body", "pre", 0, "¹"] == loc_of("pre[0].¹")
