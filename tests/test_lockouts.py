"""Failed-authentication limits that nobody else can turn against an admin (SPEC.md, "HTTP
admin API": a request without a token is not a failure, and a valid token is never refused
because of other requests' failures), `X-Forwarded-For` trusted only from
`forwarded_allow_ips`, and the dashboard's cookie check limited like the bearer check.

The address tests run the API as `extreg serve` does (`serve_api`, its uvicorn set-up), since
it is the server that decides which address a request comes from.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import LiveServer, database_api
from helpers import make_settings

from extreg.api.server import serve_api
from extreg.auth import add_to_tokens_file, generate_token, hash_token
from extreg.errors import ConfigError
from extreg.metrics import Metrics
from extreg.registry import Registry
from extreg.runtime import Runtime
from extreg.settings import Settings

ORIGIN = {"Origin": "http://extreg.test"}  # the in-process client's own origin


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_tokenless_requests_are_not_failures(tmp_path: Path, db_url: str) -> None:
    """20 requests without any credentials (API and dashboard) answer 401 and count nothing:
    a valid admin token from the same address is answered 200 right after."""
    async with database_api(tmp_path, db_url) as api:
        tokenless = [(await api.client.get("/admin/status")).status_code for _ in range(20)]
        pages = [(await api.client.get("/")).status_code for _ in range(20)]
        admin = await api.client.get("/admin/status", headers=api.auth("admin"))
    assert ([401] * 20, [401] * 20, 200) == (tokenless, pages, admin.status_code)


async def test_wrong_tokens_do_not_stop_a_valid_token(tmp_path: Path, db_url: str) -> None:
    """30 wrong tokens from one address: the first 10 answer 401, the rest 429 with
    Retry-After; the valid tokens of every role from that same address still answer 200, and
    the guesser is still refused afterwards."""
    async with database_api(tmp_path, db_url) as api:
        wrong = [
            (await api.client.get("/admin/status", headers=bearer(generate_token())))
            for _ in range(30)
        ]
        valid = [
            (await api.client.get("/admin/status", headers=api.auth(role))).status_code
            for role in ("viewer", "operator", "admin")
        ]
        after = await api.client.get("/admin/status", headers=bearer(generate_token()))
    assert [401] * 10 + [429] * 20 == [w.status_code for w in wrong]
    assert 1 <= int(wrong[-1].headers["retry-after"]) <= 60
    assert ([200] * 3, 429) == (valid, after.status_code)


async def test_wrong_sign_ins_do_not_stop_a_valid_sign_in(tmp_path: Path, db_url: str) -> None:
    """The sign-in form counts wrong tokens (401, then 429) but a valid token signs in."""
    async with database_api(tmp_path, db_url) as api:
        wrong = [
            (
                await api.client.post("/session", data={"token": generate_token()}, headers=ORIGIN)
            ).status_code
            for _ in range(12)
        ]
        valid = await api.client.post(
            "/session", data={"token": api.tokens["viewer"]}, headers=ORIGIN
        )
    assert [401] * 10 + [429] * 2 == wrong
    assert 303 == valid.status_code


async def test_cookie_guesses_are_limited(tmp_path: Path, db_url: str) -> None:
    """Guessed session cookies count as failed authentications, on `/` as on the API: after 10,
    429; a real bearer token still works."""
    async with database_api(tmp_path, db_url) as api:
        guesses = []
        for n in range(12):
            api.client.cookies.set("extreg_session", generate_token())
            path = "/" if n % 2 else "/admin/status"
            guesses.append((await api.client.get(path)).status_code)
        api.client.cookies.clear()
        valid = await api.client.get("/admin/status", headers=api.auth("viewer"))
    assert [401] * 10 + [429] * 2 == guesses
    assert 200 == valid.status_code


# -- the address: X-Forwarded-For only from forwarded_allow_ips ---------------------------------


class ServedApi(LiveServer):
    """The API served by `serve_api` (extreg serve's uvicorn configuration) in a thread."""

    def __init__(self, settings: Settings) -> None:
        super().__init__(settings)
        self._stop: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def _serve_with(self, registry: Registry, invoker: Any | None) -> None:
        async with Runtime.open(self.settings, registry, invoker, metrics=Metrics()) as runtime:
            self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
            task = asyncio.create_task(serve_api(runtime, "127.0.0.1", self.port, self._stop))
            async with httpx.AsyncClient() as client:
                while True:
                    if task.done():
                        task.result()
                    try:
                        await client.get(self.url + "/healthz")
                        break
                    except httpx.TransportError:
                        await asyncio.sleep(0.02)
            self._ready.set()
            await task

    def __exit__(self, *exc: object) -> None:
        if self._loop is not None and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


@pytest.fixture
def tokens_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens.json"
    add_to_tokens_file(path, "ada", "admin", hash_token("extreg_the-admins-own-token"))
    return path


@contextlib.asynccontextmanager
async def served(settings: Settings) -> AsyncIterator[ServedApi]:
    server = await asyncio.to_thread(ServedApi(settings).__enter__)
    try:
        yield server
    finally:
        await asyncio.to_thread(server.__exit__)


async def statuses(url: str, attempts: list[dict[str, str]]) -> list[int]:
    async with httpx.AsyncClient(base_url=url) as client:
        return [(await client.get("/admin/status", headers=h)).status_code for h in attempts]


def guess(forwarded_for: str | None = None) -> dict[str, str]:
    headers = bearer(generate_token())
    if forwarded_for is not None:
        headers["X-Forwarded-For"] = forwarded_for
    return headers


async def test_forged_forwarded_for_is_ignored_by_default(
    tmp_path: Path, tokens_file: Path
) -> None:
    """Without `forwarded_allow_ips`, a loopback client rotating `X-Forwarded-For` is still
    one address: after 10 wrong tokens it gets 429 whatever the header says; and a forged
    header naming another address locks nobody else out (the admin's token still works)."""
    settings = make_settings(tmp_path, source="fixtures", api_tokens_file=tokens_file)
    async with served(settings) as server:
        rotating = await statuses(server.url, [guess(f"10.0.0.{n}") for n in range(15)])
        admin = await statuses(
            server.url, [{**bearer("extreg_the-admins-own-token"), "X-Forwarded-For": "10.0.0.1"}]
        )
    assert ([401] * 10 + [429] * 5, [200]) == (rotating, admin)


async def test_forwarded_for_is_trusted_from_forwarded_allow_ips(
    tmp_path: Path, tokens_file: Path
) -> None:
    """With `forwarded_allow_ips = "127.0.0.1"` the limiter keys on the forwarded address:
    the guessing client is refused, another client behind the same proxy is not."""
    settings = make_settings(
        tmp_path, source="fixtures", api_tokens_file=tokens_file, forwarded_allow_ips="127.0.0.1"
    )
    async with served(settings) as server:
        guesser = await statuses(server.url, [guess("203.0.113.7") for _ in range(12)])
        neighbour = await statuses(server.url, [guess("198.51.100.1, 203.0.113.8")])
        proxy_itself = await statuses(server.url, [guess()])
    assert ([401] * 10 + [429] * 2, [401], [401]) == (guesser, neighbour, proxy_itself)


def test_forwarded_allow_ips_setting_is_validated(tmp_path: Path) -> None:
    """Empty by default; a comma-separated string (environment, TOML) or a list of addresses
    or networks; anything else is a ConfigError naming the key and the bad entry."""
    assert () == make_settings(tmp_path).forwarded_allow_ips
    environ = {"EXTENSION_REGISTRY_FORWARDED_ALLOW_IPS": "127.0.0.1, 10.0.0.0/8,::1"}
    from_env = Settings.load(environ=environ, data_dir=tmp_path)
    assert ("127.0.0.1/32", "10.0.0.0/8", "::1/128") == from_env.forwarded_allow_ips
    listed = make_settings(tmp_path, forwarded_allow_ips=["192.0.2.1"])
    assert ("192.0.2.1/32",) == listed.forwarded_allow_ips
    with pytest.raises(ConfigError, match=r"forwarded_allow_ips.*'proxy\.local'"):
        make_settings(tmp_path, forwarded_allow_ips="127.0.0.1,proxy.local")
