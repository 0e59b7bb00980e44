"""The dashboard's charts and event markers in a real headless Chromium, against a live server
with a real invoker, NATS server and the sample extensions: calls, failure rate and latency
per interval from `GET /admin/extensions[/{id}]/health/series`, for the whole registry before
anything is picked and per extension after.

The charts are canvases; what they plot is also on the page for screen readers (and for these
tests): the panel's `data-*` summary (`data-extension`, `data-minutes`, `data-calls`,
`data-failures`, `data-failed-intervals`, ...), a visually hidden table of the intervals with
calls, and the list of circuit changes, enables and disables.

Set EXTREG_SCREENSHOT=1 to refresh docs/dashboard.png (1440 px) and docs/dashboard-phone.png
(390 px) from the first test, once the flaky extension has failed and recovered.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import httpx
from api_helpers import LiveServer
from playwright.async_api import Browser, Page, expect
from test_dashboard import WAIT_MS, browser, confirm, pick, row, server, signed_in

from extreg.local.samples.flaky import Flaky

__all__ = ["browser", "server"]  # the fixtures, shared with test_dashboard

DOCS = Path(__file__).parent.parent / "docs"
FAILING: dict[str, Any] = {
    "failure_rate": 1.0,
    "failure_mode": "invalid",
}  # an immediate invalid reply
REQUEST = {"payload": {"payload": "Hello  World"}, "metadata": {}}


def charted(page: Page, condition: str) -> Any:
    """Wait until `condition` holds of the chart panel's data (`d`: its dataset)."""
    return page.wait_for_function(
        f"() => {{ const d = document.getElementById('charts').dataset; return {condition}; }}",
        timeout=WAIT_MS,
    )


async def fail_until_the_circuit_opens(client: httpx.AsyncClient, flaky: Flaky) -> int:
    """Call flaky while it fails until its circuit opens (503); how many calls failed."""
    flaky.control(FAILING)
    for failed in range(50):
        answer = await client.post("/admin/extensions/flaky/invoke", json=REQUEST)
        if answer.status_code == 503:
            return failed
        assert 502 == answer.status_code, answer.text
    raise AssertionError("flaky's circuit did not open after 50 failures")


async def test_the_chart_shows_the_flaky_extensions_failure_burst(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, flaky_extension: Flaky
) -> None:
    """Before anything is picked the panels show the whole registry (its audit trail too);
    after flaky fails until its circuit opens, the registry's series and flaky's own hold
    intervals with failures, the hidden table lists them, and the circuit's opening is marked
    (listed as an event); other extensions' series show none of flaky's failures; a reload
    keeps it all (the series come from the server, not from the page's memory)."""
    live, tokens = server
    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    page = await signed_in(browser, live.url, tokens["viewer"])
    panel = page.locator("#charts")
    await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    await expect(panel).to_have_attribute("data-extension", "")
    await expect(panel).to_have_attribute("data-minutes", "15")
    await expect(page.locator("#chart-title")).to_have_text("Whole registry")
    await expect(page.locator("#audit-title")).to_contain_text("whole registry")
    await expect(page.locator('#audit > li[data-action="create"]').first).to_be_visible()
    for chart in ("calls", "rate", "latency"):
        await expect(page.locator(f"#chart-{chart} canvas")).to_be_attached()

    async with httpx.AsyncClient(base_url=live.url, headers=operator) as client:
        for _ in range(3):
            assert (
                200
                == (
                    await client.post("/admin/extensions/normalize_text/invoke", json=REQUEST)
                ).status_code
            )
        failed = await fail_until_the_circuit_opens(client, flaky_extension)
    assert failed > 0
    await charted(page, "Number(d.failures) > 0 && Number(d.failedIntervals) > 0")

    await pick(page, "flaky")
    await expect(page.locator("#chart-title")).to_have_text("flaky")
    await charted(page, f"d.extension === 'flaky' && Number(d.failures) >= {failed}")
    failing = page.locator("#series-rows tr:not([data-failures='0'])")
    assert await failing.count() >= 1
    assert (
        sum(
            [
                int(await failing.nth(i).get_attribute("data-failures") or 0)
                for i in range(await failing.count())
            ]
        )
        >= failed
    )
    await expect(page.locator("#series-caption")).to_contain_text("flaky, last 15 min")
    opened = page.locator('#events li[data-kind="circuit"][data-state="open"][data-id="flaky"]')
    await expect(opened.first).to_contain_text("flaky: circuit open", timeout=WAIT_MS)
    await expect(row(page, "flaky").locator(".circuit .badge")).to_contain_text("open")

    await pick(page, "normalize_text")
    await charted(page, "d.extension === 'normalize_text' && Number(d.calls) >= 3")
    assert "0" == await panel.get_attribute("data-failures")

    await page.reload()
    await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    await charted(page, f"d.extension === '' && Number(d.failures) >= {failed}")

    if os.environ.get("EXTREG_SCREENSHOT"):
        await screenshots(browser, live.url, tokens["operator"], flaky_extension)


async def traffic(url: str, token: str, flaky: Flaky) -> None:
    """A minute of calls for the screenshots: flaky fails a third of its calls, then all of
    them (its circuit opens), then none (an operator resets the circuit)."""
    phases: list[tuple[dict[str, Any], int]] = [
        ({"failure_rate": 0.3}, 30),
        (FAILING, 10),
        ({"reset": True}, 20),
    ]
    async with httpx.AsyncClient(
        base_url=url, headers={"Authorization": f"Bearer {token}"}
    ) as client:
        await client.post("/admin/extensions/flaky/circuit", json={"action": "reset"})
        for control, seconds in phases:
            flaky.control(control)
            if "reset" in control:
                await client.post("/admin/extensions/flaky/circuit", json={"action": "reset"})
            for _ in range(seconds * 4):
                for ext in ("flaky", "normalize_text", "mask_pii"):
                    await client.post(f"/admin/extensions/{ext}/invoke", json=REQUEST)
                await asyncio.sleep(0.25)


async def screenshots(browser: Browser, url: str, token: str, flaky: Flaky) -> None:
    """docs/dashboard.png at 1440 px with flaky picked, and docs/dashboard-phone.png at 390 px
    from the charts down, after a minute of traffic; both over the last 5 minutes."""
    await traffic(url, token, flaky)
    desktop = await signed_in(browser, url, token, viewport={"width": 1440, "height": 900})
    await desktop.click('.range button[data-minutes="5"]')
    await pick(desktop, "flaky")
    await charted(desktop, "d.extension === 'flaky' && Number(d.failures) > 0")
    await expect(desktop.locator("#events li").first).to_be_visible(timeout=WAIT_MS)
    await desktop.screenshot(path=str(DOCS / "dashboard.png"), full_page=True)
    phone = await signed_in(
        browser, url, token, viewport={"width": 390, "height": 844}, device_scale_factor=2
    )
    await phone.click('.range button[data-minutes="5"]')
    await pick(phone, "flaky")
    await charted(phone, "d.extension === 'flaky' && Number(d.failures) > 0")
    await phone.evaluate("document.getElementById('charts').scrollIntoView()")
    await phone.screenshot(path=str(DOCS / "dashboard-phone.png"))


async def test_the_time_range_can_be_chosen(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """15 minutes by default; 5 m, 1 h and 6 h ask the server for that range (at most ~360
    intervals, so longer ranges have longer intervals); the pressed button says which."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["viewer"])
    panel = page.locator("#charts")
    await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    seen: dict[str, int] = {}
    for label, minutes in (("5 m", 5), ("1 h", 60), ("6 h", 360), ("15 m", 15)):
        button = page.locator(f'.range button[data-minutes="{minutes}"]')
        await expect(button).to_have_text(label)
        await button.click()
        await expect(button).to_have_attribute("aria-pressed", "true")
        await expect(page.locator('.range button[aria-pressed="true"]')).to_have_count(1)
        await charted(page, f"d.minutes === '{minutes}' && Number(d.points) > 0")
        points = int(await panel.get_attribute("data-points") or 0)
        step = int(await panel.get_attribute("data-interval-seconds") or 0)
        assert 0 < points <= 370
        assert points * step >= minutes * 60 * 0.9
        seen[label] = step
    assert seen["6 h"] > seen["5 m"]
    await expect(page.locator("#chart-note")).to_contain_text("last 15 min")


async def test_opening_a_circuit_asks_first_and_is_marked_on_the_chart(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """An operator's "Open circuit" asks for confirmation: Cancel leaves the circuit closed;
    confirmed, the circuit opens, and the opening shows among the chart's events, beside the
    disable confirmed after it (with its actor)."""
    live, tokens = server
    page = await signed_in(browser, live.url, tokens["operator"])
    await pick(page, "echo")
    badge = row(page, "echo").locator(".circuit .badge")
    open_button = row(page, "echo").locator('button[data-action="open"]')
    await open_button.click()
    await expect(page.locator("#confirm-title")).to_have_text("Open the circuit of echo?")
    await confirm(page, "cancel")
    async with httpx.AsyncClient(base_url=live.url) as client:
        health = await client.get(
            "/admin/extensions/echo/health",
            headers={"Authorization": f"Bearer {tokens['viewer']}"},
        )
    assert "closed" == health.json()["health"]["circuit_breaker_state"]
    await expect(badge).to_contain_text("closed")

    await open_button.click()
    await confirm(page, "ok")
    await expect(badge).to_contain_text("open", timeout=WAIT_MS)
    events = page.locator("#events li")
    await expect(events.filter(has_text="echo: circuit open")).to_have_count(1, timeout=WAIT_MS)
    await row(page, "echo").locator('button[data-action="disable"]').click()
    await confirm(page, "ok")
    await expect(events.filter(has_text="echo: disabled by otto-operator")).to_have_count(
        1, timeout=WAIT_MS
    )
    assert "disable" == await events.first.get_attribute("data-kind")  # newest first


async def test_a_server_without_series_reads_as_no_data_yet(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Against a server that has no series route (404, as before it had one) the panel says
    there is no data yet and the rest of the page works; the charts fill once it answers."""
    live, tokens = server
    page = await (await browser.new_context()).new_page()
    missing = {"on": True}

    async def series(route: Any) -> None:
        if missing["on"]:
            await route.fulfill(status=404, json={"error": "ApiError", "detail": "Not Found"})
        else:
            await route.continue_()

    await page.route("**/health/series?*", series)
    await page.goto(live.url + "/")
    await page.fill("#token", tokens["viewer"])
    await page.click("button[type=submit]")
    panel = page.locator("#charts")
    await expect(panel).to_have_attribute("data-state", "no-data", timeout=WAIT_MS)
    await expect(page.locator("#chart-note")).to_contain_text("No data yet")
    await expect(page.locator("#error")).to_be_empty()
    await expect(row(page, "flaky")).to_be_visible()
    missing["on"] = False
    await expect(panel).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
