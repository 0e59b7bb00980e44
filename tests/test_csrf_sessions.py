"""The dashboard's browser session (issue 9, "CSRF and framing"): the cookie holds a
server-side session id, a cookie-authenticated change needs the server's own origin plus the
session's CSRF token, every page forbids framing, and sign-out, revocation and expiry end a
session. In-process over a real registry on a real PostgreSQL; the same in a real browser is
in tests/test_dashboard.py."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re
import time
from pathlib import Path

import httpx
from api_helpers import ROLE_TOKENS, Api, database_api, sql

from extreg.tokens import TokenStore

ORIGIN = "http://extreg.test"  # the in-process client's own origin (its base URL)
DISABLE_ALPHA = "/admin/extensions/alpha/disable"


async def sign_in(client: httpx.AsyncClient, token: str) -> tuple[str, str]:
    """Sign in through the form; the session cookie and the CSRF token the dashboard gets."""
    answer = await client.post("/session", data={"token": token}, headers={"Origin": ORIGIN})
    assert 303 == answer.status_code, answer.text
    page = await client.get("/")
    assert 200 == page.status_code
    found = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert found, "the dashboard carries its CSRF token"
    return client.cookies["extreg_session"], found.group(1)


def disables_of_alpha(api: Api) -> list[tuple[str, str]]:
    assert api.db_url is not None
    return sql(
        api.db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'alpha' AND action = 'disable'",
    )


def alpha_enabled(api: Api) -> bool:
    assert api.db_url is not None
    rows = sql(api.db_url, "SELECT enabled FROM extensions WHERE id = 'alpha'")
    return bool(rows[0][0])


async def test_the_session_cookie_is_a_server_side_id_not_the_token(
    tmp_path: Path, db_url: str
) -> None:
    """The cookie is a random session id: not the token, nor derived from it, new on each
    sign-in (which ends the browser's previous session); HttpOnly and SameSite=Strict."""
    async with database_api(tmp_path, db_url) as api:
        token = api.tokens["operator"]
        answer = await api.client.post(
            "/session", data={"token": token}, headers={"Origin": ORIGIN}
        )
        first = api.client.cookies["extreg_session"]
        second, _ = await sign_in(api.client, token)  # signing in again replaces the session
        api.client.cookies.clear()
        api.client.cookies.set("extreg_session", first)
        replaced = await api.client.get("/admin/me")
    assert 401 == replaced.status_code
    cookie_header = answer.headers["set-cookie"]
    assert token not in cookie_header and token[7:20] not in first
    assert first != second and len(first) >= 43
    assert "httponly" in cookie_header.lower() and "samesite=strict" in cookie_header.lower()


async def test_a_cross_origin_post_with_the_cookie_is_refused_and_writes_nothing(
    tmp_path: Path, db_url: str
) -> None:
    """A signed-in browser's POST from another port of the same host (same site, so the
    SameSite cookie goes along), from an opaque origin, or without any origin proof, is 403
    even with the right CSRF token; alpha stays enabled and nothing is audited."""
    async with database_api(tmp_path, db_url) as api:
        _, csrf = await sign_in(api.client, api.tokens["operator"])
        attempts = [
            {"Origin": "http://extreg.test:8081", "X-CSRF-Token": csrf},
            {"Origin": "https://evil.example", "X-CSRF-Token": csrf},
            {"Origin": "null", "X-CSRF-Token": csrf},
            {"Sec-Fetch-Site": "same-site", "X-CSRF-Token": csrf},
            {"X-CSRF-Token": csrf},
        ]
        answers = [await api.client.post(DISABLE_ALPHA, headers=h) for h in attempts]
        assert [403] * 5 == [a.status_code for a in answers]
        assert all("origin" in a.json()["detail"] for a in answers)
        assert (True, []) == (alpha_enabled(api), disables_of_alpha(api))


async def test_a_same_origin_post_needs_the_sessions_csrf_token(
    tmp_path: Path, db_url: str
) -> None:
    """With the server's own Origin but no CSRF token, a wrong one, or another session's, the
    POST is 403 and writes nothing; with the session's own token it is done and audited as
    the signed-in token's name. `Sec-Fetch-Site: same-origin` stands in for a missing
    Origin."""
    async with database_api(tmp_path, db_url) as api:
        _, other_csrf = await sign_in(api.client, api.tokens["admin"])
        api.client.cookies.clear()
        _, csrf = await sign_in(api.client, api.tokens["operator"])
        refused = [
            await api.client.post(DISABLE_ALPHA, headers=h)
            for h in (
                {"Origin": ORIGIN},
                {"Origin": ORIGIN, "X-CSRF-Token": "x" * len(csrf)},
                {"Origin": ORIGIN, "X-CSRF-Token": other_csrf},
            )
        ]
        assert [403] * 3 == [r.status_code for r in refused]
        assert all("CSRF" in r.json()["detail"] for r in refused)
        assert (True, []) == (alpha_enabled(api), disables_of_alpha(api))
        done = await api.client.post(
            DISABLE_ALPHA, headers={"Origin": ORIGIN, "X-CSRF-Token": csrf}
        )
        fetch_meta = await api.client.post(
            "/admin/extensions/alpha/enable",
            headers={"Sec-Fetch-Site": "same-origin", "X-CSRF-Token": csrf},
        )
        assert (200, 200) == (done.status_code, fetch_meta.status_code)
        assert [("disable", ROLE_TOKENS["operator"])] == disables_of_alpha(api)


async def test_bearer_requests_need_no_origin_or_csrf_token(tmp_path: Path, db_url: str) -> None:
    """A bearer token involves no cookie, so no CSRF proof is asked for, whatever Origin says."""
    async with database_api(tmp_path, db_url) as api:
        answer = await api.client.post(
            DISABLE_ALPHA, headers={**api.auth("operator"), "Origin": "https://elsewhere.example"}
        )
    assert 200 == answer.status_code


def csp_directives(answer: httpx.Response) -> dict[str, list[str]]:
    policy = answer.headers["content-security-policy"]
    return {d.split()[0]: d.split()[1:] for d in policy.split(";") if d.strip()}


def inline_hash(html: str, tag: str) -> str:
    found = re.search(f"<{tag}>(.*?)</{tag}>", html, re.S)
    assert found, tag
    digest = hashlib.sha256(found.group(1).encode()).digest()
    return f"'sha256-{base64.b64encode(digest).decode()}'"


async def test_every_page_forbids_framing(tmp_path: Path, db_url: str) -> None:
    """The sign-in form, the dashboard and API answers (errors included) carry
    `X-Frame-Options: DENY` and a CSP with `frame-ancestors 'none'`; the dashboard's CSP
    admits exactly its own inline script and style (by hash) and its own origin (the vendored
    chart library), never 'unsafe-inline'."""
    async with database_api(tmp_path, db_url) as api:
        sign_in_page = await api.client.get("/")
        await sign_in(api.client, api.tokens["viewer"])
        dashboard = await api.client.get("/")
        others = [
            await api.client.get("/admin/status"),
            await api.client.get("/healthz"),
            await api.client.get("/nowhere"),
        ]
    for answer in (sign_in_page, dashboard, *others):
        assert "DENY" == answer.headers["x-frame-options"], answer.url
        assert ["'none'"] == csp_directives(answer)["frame-ancestors"], answer.url
    page = csp_directives(dashboard)
    # its own inline script by hash, and the vendored chart library from its own origin
    assert ["'self'", inline_hash(dashboard.text, "script")] == page["script-src"]
    assert ["'self'", inline_hash(dashboard.text, "style")] == page["style-src"]
    assert [inline_hash(sign_in_page.text, "style")] == csp_directives(sign_in_page)["style-src"]
    assert ["'none'"] == page["default-src"] and " style=" not in dashboard.text
    assert "no-store" == dashboard.headers["cache-control"]


async def test_sign_in_from_another_origin_is_refused(tmp_path: Path, db_url: str) -> None:
    """A sign-in form posted from another origin (login CSRF) is 403 and sets no cookie."""
    async with database_api(tmp_path, db_url) as api:
        answer = await api.client.post(
            "/session",
            data={"token": api.tokens["viewer"]},
            headers={"Origin": "http://extreg.test:9999"},
        )
    assert (403, None) == (answer.status_code, answer.headers.get("set-cookie"))


async def test_sign_out_ends_the_session(tmp_path: Path, db_url: str) -> None:
    """`POST /session/logout` without the CSRF token is 403 and ends nothing; with it, 204 and
    the cookie is cleared; the old cookie then answers 401 on the API and the sign-in form on
    `/`, even when a client keeps sending it."""
    async with database_api(tmp_path, db_url) as api:
        cookie, csrf = await sign_in(api.client, api.tokens["operator"])
        forged = await api.client.post("/session/logout", headers={"Origin": ORIGIN})
        still = await api.client.get("/admin/me")
        out = await api.client.post(
            "/session/logout", headers={"Origin": ORIGIN, "X-CSRF-Token": csrf}
        )
        api.client.cookies.set("extreg_session", cookie)
        me = await api.client.get("/admin/me")
        page = await api.client.get("/")
        change = await api.client.post(
            DISABLE_ALPHA, headers={"Origin": ORIGIN, "X-CSRF-Token": csrf}
        )
    assert (403, 200) == (forged.status_code, still.status_code)
    assert 204 == out.status_code and 'extreg_session=""' in out.headers["set-cookie"]
    assert (401, 401, 401) == (me.status_code, page.status_code, change.status_code)
    assert 'id="token"' in page.text


async def test_revoking_the_token_ends_its_sessions(tmp_path: Path, db_url: str) -> None:
    """`extreg token revoke` (TokenStore.revoke, seen by the token follower) ends every session
    signed in with that token; sessions of other tokens go on."""
    async with database_api(tmp_path, db_url) as api:
        operator_cookie, _ = await sign_in(api.client, api.tokens["operator"])
        api.client.cookies.clear()
        viewer_cookie, _ = await sign_in(api.client, api.tokens["viewer"])
        await TokenStore(db_url).revoke(ROLE_TOKENS["operator"])

        async def status_with(cookie: str) -> int:
            api.client.cookies.clear()
            api.client.cookies.set("extreg_session", cookie)
            return (await api.client.get("/admin/me")).status_code

        deadline = time.monotonic() + 10
        while await status_with(operator_cookie) != 401:
            assert time.monotonic() < deadline, "the revoked token's session still works"
            await asyncio.sleep(0.02)
        assert 200 == await status_with(viewer_cookie)


async def test_a_session_expires(tmp_path: Path, db_url: str) -> None:
    """A session lasts `session_ttl_s` (12 hours by default), then the cookie answers 401."""
    async with database_api(tmp_path, db_url, session_ttl_s=0.5) as api:
        await sign_in(api.client, api.tokens["viewer"])
        assert 200 == (await api.client.get("/admin/me")).status_code
        deadline = time.monotonic() + 10
        while (await api.client.get("/admin/me")).status_code != 401:
            assert time.monotonic() < deadline, "the session did not expire"
            await asyncio.sleep(0.05)
