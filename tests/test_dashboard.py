"""The dashboard in a real headless Chromium (Debian's, driven by Playwright), against a live
server with a real registry, invoker, NATS server and sample extensions.

Set EXTREG_SCREENSHOT=1 to refresh docs/dashboard.png and docs/dashboard-phone.png (from
tests/test_dashboard_charts.py, once the flaky extension has failed).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import shutil
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import LiveServer, samples_server, sql
from playwright.async_api import Browser, Page, async_playwright, expect

from extreg.local.samples import SAMPLE_EXTENSIONS

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
WAIT_MS = 30_000  # generous: a poll is every 2 s, a chart reload every interval (10 s)


@pytest.fixture
async def server(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: Any
) -> AsyncIterator[tuple[LiveServer, dict[str, str]]]:
    """A live server on a database holding the sample extensions, with tokens for each role."""
    live, tokens = await samples_server(
        tmp_path, db_url, nats_url, health_flush_interval_seconds=0.5
    )
    with live:
        yield live, tokens


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    async with async_playwright() as p:
        chromium = await p.chromium.launch(
            executable_path=CHROMIUM,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        yield chromium
        await chromium.close()


async def signed_in(browser: Browser, url: str, token: str, **context: Any) -> Page:
    page = await (await browser.new_context(**context)).new_page()
    await page.goto(url + "/")
    await page.fill("#token", token)
    await page.click("button[type=submit]")
    await expect(page.locator("tr.ext").first).to_be_visible(timeout=10_000)
    return page


def row(page: Page, ext_id: str) -> Any:
    return page.locator(f'tr.ext[data-id="{ext_id}"]')


async def pick(page: Page, ext_id: str) -> None:
    """Select an extension by its name cell (the row's middle may hold a circuit button)."""
    await row(page, ext_id).locator("td").first.click()
    await expect(page.locator("#charts")).to_have_attribute("data-extension", ext_id)


async def confirm(page: Page, answer: str) -> None:
    """Answer the confirmation dialog: `ok` or `cancel`."""
    dialog = page.locator("#confirm")
    await expect(dialog).to_be_visible()
    await page.click(f"#confirm-{answer}")
    await expect(dialog).to_be_hidden()


async def test_dashboard_loads_and_shows_every_extension(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Without a token the page is a sign-in form (401, no data); after signing in it lists
    every extension with its type, version, subject and circuit badge, and the summary bar."""
    live, tokens = server
    async with httpx.AsyncClient() as client:
        anonymous = await client.get(live.url + "/")
    assert 401 == anonymous.status_code
    assert "normalize_text" not in anonymous.text
    page = await signed_in(browser, live.url, tokens["operator"])
    for sample in SAMPLE_EXTENSIONS:
        line = row(page, sample.id)
        await expect(line).to_contain_text(sample.id)
        await expect(line).to_contain_text(sample.subject)
        await expect(line.locator(".circuit")).to_contain_text("closed")
    await expect(page.locator("#summary")).to_contain_text("Extensions")
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{live.url}/admin/extensions/normalize_text/invoke",
            headers={"Authorization": f"Bearer {tokens['operator']}"},
            json={"payload": {"payload": "Hello  World"}, "metadata": {}},
        )
    assert 200 == reply.status_code
    await expect(row(page, "normalize_text")).to_contain_text("1 ok / 0 failed", timeout=10_000)


async def test_badge_changes_when_a_circuit_opens(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Opening a circuit (here by an operator through the API) turns that row's badge to
    'open' without reloading the page; the badge carries text, not only colour."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["viewer"])
    await expect(row(page, "flaky").locator(".circuit")).to_contain_text("closed")
    async with httpx.AsyncClient() as client:
        reply = await client.post(
            f"{live.url}/admin/extensions/flaky/circuit",
            headers={"Authorization": f"Bearer {tokens['operator']}"},
            json={"action": "open"},
        )
    assert 200 == reply.status_code
    badge = row(page, "flaky").locator(".circuit .badge")
    await expect(badge).to_contain_text("open", timeout=10_000)
    assert "badge open" == await badge.get_attribute("class")


async def test_operator_disable_click_reaches_database_and_audit(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, db_url: str
) -> None:
    """An operator's Disable click asks first (Cancel changes nothing); confirmed, it disables
    the extension in the database, the audit log records it with the token's name, and the
    row shows it disabled; the audit trail says what changed (enabled: true → false)."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["operator"])
    disable = row(page, "mask_pii").locator('button[data-action="disable"]')
    await disable.click()
    await expect(page.locator("#confirm-title")).to_have_text("Disable mask_pii?")
    await confirm(page, "cancel")
    assert [(True,)] == sql(db_url, "SELECT enabled FROM extensions WHERE id = 'mask_pii'")
    await disable.click()
    await confirm(page, "ok")
    await expect(row(page, "mask_pii")).to_contain_text("disabled", timeout=10_000)
    assert [(False,)] == sql(db_url, "SELECT enabled FROM extensions WHERE id = 'mask_pii'")
    audit = sql(
        db_url,
        "SELECT action, changed_by FROM extension_audit_log"
        " WHERE extension_id = 'mask_pii' AND action = 'disable'",
    )
    assert [("disable", "otto-operator")] == audit
    await pick(page, "mask_pii")
    entry = page.locator('#audit > li[data-action="disable"]')
    await expect(entry).to_contain_text("disable by otto-operator", timeout=WAIT_MS)
    await expect(entry.locator('.changes li[data-field="enabled"]')).to_have_text(
        "enabled: true → false"
    )


async def test_viewer_sees_no_controls(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """A viewer gets the data but no enable/disable, reset or invoke controls."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["viewer"])
    await expect(row(page, "pii_guard")).to_be_visible()
    assert 0 == await page.locator("button[data-action]").count()
    await pick(page, "pii_guard")
    await expect(page.locator("#invoke-box")).to_be_hidden()


async def test_plain_sql_write_appears_live_on_a_phone(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, db_url: str
) -> None:
    """On a phone-sized screen, an extension inserted with plain SQL appears on the open page
    (change notification to cache to the next poll) without a reload."""
    live, tokens = server
    page = await signed_in(
        browser, live.url, tokens["viewer"], viewport={"width": 390, "height": 844}
    )
    sql(
        db_url,
        "INSERT INTO extensions (id, type, subject, timeout_ms) VALUES"
        " ('sql_made', 'post', 'beamline.ext.post.sql_made.v1', 100)",
    )
    await expect(row(page, "sql_made")).to_be_visible(timeout=10_000)
    width = await page.evaluate("document.documentElement.scrollWidth")
    assert width <= 390


async def test_breaker_off_shows_no_protection(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: Any, browser: Browser
) -> None:
    """With circuit breakers off (the default settings) no row claims a `closed` circuit: each
    shows a distinct "breaker off" badge whose tooltip says how to enable breakers, the page
    says calls are not protected, and an operator gets no circuit-reset button."""
    live, tokens = await samples_server(tmp_path, db_url, nats_url, circuit_breaker_enabled=False)
    with live:
        page = await signed_in(browser, live.url, tokens["operator"])
        for sample in SAMPLE_EXTENSIONS:
            badge = row(page, sample.id).locator(".circuit .badge")
            await expect(badge).to_have_text("○ breaker off")
            assert "badge breaker-off" == await badge.get_attribute("class")
            assert "EXTENSION_REGISTRY_CIRCUIT_BREAKER_ENABLED=true" in (
                await badge.get_attribute("title") or ""
            )
        await expect(page.locator("#breaker-note")).to_be_visible()
        await expect(page.locator("#breaker-note")).to_contain_text("not protected")
        await expect(row(page, "flaky").locator('button[data-action="disable"]')).to_be_visible()
        assert 0 == await page.locator('button[data-action="reset"]').count()


async def test_sign_out_ends_the_session(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """The Sign out button ends the session: the page shows the sign-in form, and the cookie
    the browser held no longer works anywhere."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["operator"])
    [cookie] = [c["value"] for c in await page.context.cookies() if c["name"] == "extreg_session"]
    assert tokens["operator"] != cookie
    await page.click("#sign-out")
    await expect(page.locator("#token")).to_be_visible(timeout=10_000)
    async with httpx.AsyncClient(cookies={"extreg_session": cookie}) as client:
        me = await client.get(live.url + "/admin/me")
    assert 401 == me.status_code


ATTACKER_PAGE = """<!doctype html><title>waiting</title>
<iframe id="framed" src="{target}/"></iframe>
<iframe name="sink"></iframe>
<form id="forged" method="post" target="sink" action="{target}/admin/extensions/pii_guard/disable">
</form>
<script>
document.getElementById("forged").submit();
fetch("{target}/admin/extensions/pii_guard/disable", {{method: "POST", credentials: "include",
      mode: "no-cors"}}).finally(() => {{ document.title = "sent"; }});
</script>"""


@contextlib.contextmanager
def attacker_site(target: str) -> Iterator[str]:
    """A page on another port of the same host (so same-site with the server) that frames the
    dashboard and posts a disable with the browser's cookie, by form and by fetch."""
    body = ATTACKER_PAGE.format(target=target).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/"
    finally:
        httpd.shutdown()
        thread.join(10)
        httpd.server_close()


async def test_a_page_on_another_port_cannot_act_for_the_signed_in_operator(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, db_url: str
) -> None:
    """issue 9's attack: an operator signed in, then a page on http://127.0.0.1:OTHER frames
    the dashboard and POSTs a disable by form and by fetch (the SameSite cookie goes along,
    since ports do not make another site). Both posts are refused (403), pii_guard stays
    enabled, nothing is audited, and the framed dashboard does not render."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["operator"])
    statuses: list[int] = []
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/disable") else None)
    with attacker_site(live.url) as attacker:
        await page.goto(attacker)
        await expect(page).to_have_title("sent", timeout=10_000)
        deadline = asyncio.get_running_loop().time() + 10
        while len(statuses) < 2 and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.05)
        framed = page.frame_locator("#framed")
        assert 0 == await framed.locator("tr.ext, #token").count()
    assert [403, 403] == statuses
    assert [(True,)] == sql(db_url, "SELECT enabled FROM extensions WHERE id = 'pii_guard'")
    assert [] == sql(
        db_url,
        "SELECT action FROM extension_audit_log"
        " WHERE extension_id = 'pii_guard' AND action = 'disable'",
    )


async def test_the_dashboard_runs_within_its_content_security_policy(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Under its CSP (inline script and style admitted by hash, the chart library's files from
    this origin, nothing else) the dashboard works and the browser reports no violation:
    sign-in form, table, charts, audit, confirmation dialog and test invocation."""
    live, tokens = server
    context = await browser.new_context()
    page = await context.new_page()
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    await page.goto(live.url + "/")
    await page.fill("#token", tokens["operator"])
    await page.click("button[type=submit]")
    await pick(page, "normalize_text")
    await page.click("#invoke")
    await expect(page.locator("#invoke-result")).to_contain_text("payload", timeout=10_000)
    await expect(page.locator("#chart-calls canvas")).to_be_attached()
    await expect(page.locator("#audit > li").first).to_be_visible()
    await row(page, "normalize_text").locator('button[data-action="open"]').click()
    await confirm(page, "cancel")
    assert [] == violations
