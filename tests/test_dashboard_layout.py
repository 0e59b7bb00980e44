"""The dashboard at phone (390 px) and desktop (1440 px) widths in a real headless Chromium,
and the files it loads besides itself: the vendored chart library under `/static/` (public,
cached for a year, admitted by the page's CSP as 'self' and nothing wider) and the favicon."""

from __future__ import annotations

import httpx
import pytest
from api_helpers import LiveServer
from playwright.async_api import Browser, Page, expect
from test_dashboard import WAIT_MS, browser, pick, row, server, signed_in

__all__ = ["browser", "server"]  # the fixtures, shared with test_dashboard

WIDTHS = [pytest.param(390, 844, id="phone"), pytest.param(1440, 900, id="desktop")]

# Elements wider than the viewport, or sticking out of their card, named for the failure.
OVERFLOWING = """() => {
  const width = innerWidth, found = [];
  for (const node of document.querySelectorAll("main *, header *, dialog[open] *")) {
    if (node.closest(".visually-hidden")) continue;  // clipped on purpose
    const box = node.getBoundingClientRect();
    if (box.width && (box.left < -0.5 || box.right > width + 0.5))
      found.push(`${node.tagName}#${node.id}.${node.className} ${box.left}..${box.right}`);
  }
  return found;
}"""


async def fits(page: Page) -> None:
    width = await page.evaluate("innerWidth")
    assert await page.evaluate("document.documentElement.scrollWidth") <= width
    assert [] == await page.evaluate(OVERFLOWING)


@pytest.mark.parametrize(("width", "height"), WIDTHS)
async def test_the_page_fits_the_screen_and_keeps_its_controls_in_view(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, width: int, height: int
) -> None:
    """Nothing is wider than the viewport, before and after picking an extension and with
    the confirmation dialog open; the controls an operator needs are visible; subjects break
    at their dots and underscores only (each line of one starts a part of it)."""
    live, tokens = server
    page = await signed_in(
        browser, live.url, tokens["operator"], viewport={"width": width, "height": height}
    )
    await expect(page.locator("#charts")).to_have_attribute("data-state", "ok", timeout=WAIT_MS)
    await fits(page)
    for control in ("#sign-out", "#tab-policies", ".range button >> nth=0", "#summary"):
        await expect(page.locator(control)).to_be_visible()
    flaky = row(page, "flaky")
    for action in ("disable", "open", "reset"):
        await expect(flaky.locator(f'button[data-action="{action}"]')).to_be_visible()

    await pick(page, "test_provider")
    await expect(page.locator("#chart-calls canvas")).to_be_visible()
    await expect(page.locator("#audit > li").first).to_be_visible()
    await expect(page.locator("#invoke")).to_be_visible()
    await expect(page.locator("#show-all")).to_be_visible()
    await fits(page)
    chart = await page.locator("#chart-calls canvas").bounding_box()
    panel = await page.locator("#charts").bounding_box()
    assert chart is not None and panel is not None
    assert chart["x"] + chart["width"] <= panel["x"] + panel["width"]

    subject = row(page, "test_provider").locator("code.subject")
    assert "beamline.provider.test_provider.v1" == await subject.text_content()
    broken = await subject.evaluate(  # parts (text between <wbr>s) laid out on two lines
        """code => [...code.childNodes].filter((node) => node.nodeType === Node.TEXT_NODE)
          .filter((node) => { const range = document.createRange(); range.selectNodeContents(node);
            return new Set([...range.getClientRects()].map((r) => Math.round(r.top))).size > 1; })
          .map((node) => node.textContent)"""
    )
    assert [] == broken

    await flaky.locator('button[data-action="disable"]').click()
    await expect(page.locator("#confirm")).to_be_visible()
    await fits(page)
    await page.click("#confirm-cancel")


@pytest.mark.parametrize(("width", "height"), WIDTHS)
async def test_the_sign_in_form_keeps_the_token_field_inside_its_card(
    server: tuple[LiveServer, dict[str, str]], browser: Browser, width: int, height: int
) -> None:
    live, _ = server
    page = await (await browser.new_context(viewport={"width": width, "height": height})).new_page()
    await page.goto(live.url + "/")
    field = await page.locator("#token").bounding_box()
    card = await page.locator("form").bounding_box()
    assert field is not None and card is not None
    assert card["x"] <= field["x"] and field["x"] + field["width"] <= card["x"] + card["width"]
    await fits(page)


async def test_favicon_and_static_files(server: tuple[LiveServer, dict[str, str]]) -> None:
    """/favicon.ico answers 200 with an icon (no session needed); the chart library and its
    stylesheet answer with their types and a year's caching; the page itself and unknown names
    are not static files (404); the dashboard's CSP admits this origin's scripts and styles
    and inline code by hash only."""
    live, tokens = server
    async with httpx.AsyncClient(base_url=live.url) as client:
        icon = await client.get("/favicon.ico")
        assert 200 == icon.status_code
        assert "image/x-icon" == icon.headers["content-type"]
        assert icon.content.startswith(b"\x00\x00\x01\x00")
        for name, kind in (
            ("uPlot.iife.min.js", "text/javascript"),
            ("uPlot.min.css", "text/css"),
            ("favicon.svg", "image/svg+xml"),
        ):
            answer = await client.get(f"/static/{name}?v=1.6.32")
            assert 200 == answer.status_code, name
            assert answer.headers["content-type"].startswith(kind)
            assert "immutable" in answer.headers["cache-control"]
            again = await client.get(
                f"/static/{name}", headers={"If-None-Match": answer.headers["etag"]}
            )
            assert 304 == again.status_code
        for missing in ("dashboard.html", "uPlot.LICENSE", "nothing.js"):
            assert 404 == (await client.get(f"/static/{missing}")).status_code, missing
        signed = await client.post(
            "/session", data={"token": tokens["viewer"]}, headers={"Origin": live.url}
        )
        assert 303 == signed.status_code
        page = await client.get("/")
    policy = dict(
        part.strip().split(" ", 1) for part in page.headers["content-security-policy"].split(";")
    )
    for directive in ("script-src", "style-src"):
        sources = policy[directive].split()
        assert "'self'" == sources[0]
        assert all(s.startswith("'sha256-") for s in sources[1:]), sources
    assert "'none'" == policy["default-src"]
    assert '<link rel="icon"' in page.text
