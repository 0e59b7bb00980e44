"""The dashboard's Policies view in a real headless Chromium (Debian's, driven by Playwright),
against a live server with a real registry, invoker, NATS server and the sample extensions,
holding the bundled support_en policy (normalize_text -> pii_guard -> test_provider ->
mask_pii)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from api_helpers import SUPPORT_EN, LiveServer, samples_server
from playwright.async_api import Browser, Page, expect
from test_dashboard import browser, signed_in

__all__ = ["browser"]  # the Chromium fixture, shared with test_dashboard

STAGES = [
    ("pre", "normalize_text"),
    ("validator", "pii_guard"),
    ("provider", "test_provider"),
    ("post", "mask_pii"),
]
WAIT_MS = 10_000  # generous: a poll is every 2 s


@pytest.fixture
async def server(
    tmp_path: Path, db_url: str, nats_url: str, sample_extensions: Any
) -> AsyncIterator[tuple[LiveServer, dict[str, str]]]:
    """A live server on a database holding the sample extensions and support_en, with
    tokens for each role."""
    live, tokens = await samples_server(tmp_path, db_url, nats_url)
    with live:
        async with httpx.AsyncClient(base_url=live.url) as client:
            created = await client.post(
                "/admin/policies",
                json=SUPPORT_EN,
                headers={"Authorization": f"Bearer {tokens['admin']}"},
            )
            assert 201 == created.status_code, created.text
        yield live, tokens


async def policies_view(browser: Browser, url: str, token: str) -> Page:
    page = await signed_in(browser, url, token)
    await page.click("#tab-policies")
    await expect(page.locator("#view-policies")).to_be_visible()
    return page


def policy_row(page: Page, policy_id: str) -> Any:
    return page.locator(f'tr.policy[data-id="{policy_id}"]')


async def test_the_policies_view_shows_support_en_with_its_four_stage_badges(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """The Policies tab lists support_en with one badge per stage, in run order (pre,
    validator, provider, post), each named and coloured by its extension's health: no recent
    calls at first, healthy once a run through the API has called them; the run shows in the
    row's recent outcomes."""
    live, tokens = server
    page = await policies_view(browser, live.url, tokens["viewer"])
    row = policy_row(page, "support_en")
    await expect(row).to_be_visible(timeout=WAIT_MS)
    badges = row.locator(".pipeline .badge.stage")
    await expect(badges).to_have_count(4)
    for index, (stage, ext_id) in enumerate(STAGES):
        badge = badges.nth(index)
        assert stage == await badge.get_attribute("data-stage")
        assert ext_id == await badge.get_attribute("data-id")
        await expect(badge).to_contain_text(ext_id)
        await expect(badge).to_have_attribute("data-health", "unknown")
    await expect(row.locator(".usable")).to_contain_text("usable")
    await expect(row.locator(".runs")).to_contain_text("no runs yet")

    async with httpx.AsyncClient() as client:
        ran = await client.post(
            f"{live.url}/admin/policies/support_en/run",
            headers={"Authorization": f"Bearer {tokens['operator']}"},
            json={"message": {"payload": "Hello   World"}, "context": {"trace_id": "t-1"}},
        )
    assert 200 == ran.status_code, ran.text
    for index in range(4):
        await expect(badges.nth(index)).to_have_attribute("data-health", "healthy", timeout=WAIT_MS)
        assert "badge stage healthy" == await badges.nth(index).get_attribute("class")
    await expect(row.locator(".runs")).to_contain_text("1 ok", timeout=WAIT_MS)


async def test_a_disabled_extension_marks_the_policy_unusable_with_the_reason(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Disabling mask_pii (through the API) turns the policy's marker to "unusable" with the
    reason, and mask_pii's badge to disabled, without a reload."""
    live, tokens = server
    page = await policies_view(browser, live.url, tokens["viewer"])
    row = policy_row(page, "support_en")
    await expect(row.locator(".usable")).to_contain_text("✓ usable", timeout=WAIT_MS)
    async with httpx.AsyncClient() as client:
        answer = await client.post(
            f"{live.url}/admin/extensions/mask_pii/disable",
            headers={"Authorization": f"Bearer {tokens['operator']}"},
        )
    assert 200 == answer.status_code
    await expect(row.locator(".badge.unusable")).to_contain_text("unusable", timeout=WAIT_MS)
    await expect(row.locator(".reasons")).to_contain_text(
        "post[0].id: extension 'mask_pii' is disabled"
    )
    mask = row.locator('.badge.stage[data-id="mask_pii"]')
    await expect(mask).to_have_attribute("data-health", "disabled")


async def test_the_dry_run_form_shows_the_planned_steps(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Selecting support_en and submitting the dry-run form with a context lists the four
    steps it would run, in order; the steps follow `when` (a policy whose pre wants the web
    channel plans it skipped for telegram); a context that is no JSON says so."""
    live, tokens = server
    async with httpx.AsyncClient() as client:
        made = await client.post(
            f"{live.url}/admin/policies",
            headers={"Authorization": f"Bearer {tokens['admin']}"},
            json={
                "policy_id": "web_only",
                "pre": [{"id": "normalize_text", "when": {"channel": ["web"]}}],
                "validators": [{"id": "pii_guard"}],
            },
        )
    assert 201 == made.status_code, made.text
    page = await policies_view(browser, live.url, tokens["viewer"])
    await policy_row(page, "support_en").click()
    await expect(page.locator("#dry-title")).to_contain_text("support_en")
    await page.fill("#dry-context", '{"channel": "web", "tenant_id": "acme"}')
    await page.click("#dry-run")
    steps = page.locator("#dry-steps li")
    await expect(steps).to_have_count(4, timeout=WAIT_MS)
    for index, (stage, ext_id) in enumerate(STAGES):
        step = steps.nth(index)
        assert (stage, ext_id, "would_run") == (
            await step.get_attribute("data-stage"),
            await step.get_attribute("data-id"),
            await step.get_attribute("data-status"),
        )
        await expect(step).to_contain_text(ext_id)
    await expect(page.locator("#policy-json")).to_contain_text('"policy_id": "support_en"')

    await expect(policy_row(page, "web_only")).to_be_visible(timeout=WAIT_MS)
    await policy_row(page, "web_only").click()
    await page.fill("#dry-context", '{"channel": "telegram"}')
    await page.click("#dry-run")
    await expect(steps).to_have_count(2, timeout=WAIT_MS)
    assert "skipped" == await steps.nth(0).get_attribute("data-status")
    await expect(steps.nth(0)).to_contain_text("when did not match")
    assert "would_run" == await steps.nth(1).get_attribute("data-status")

    await page.fill("#dry-context", "{not json")
    await page.click("#dry-run")
    await expect(page.locator("#dry-error")).to_contain_text("not valid JSON")
    await expect(steps).to_have_count(0)


async def test_the_policies_view_runs_within_its_content_security_policy(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    """Opened straight at #policies, the view renders and dry-runs with no CSP violation
    reported by the browser."""
    live, tokens = server
    page = await (await browser.new_context()).new_page()
    violations: list[str] = []
    page.on(
        "console",
        lambda m: violations.append(m.text) if "Content Security Policy" in m.text else None,
    )
    await page.goto(live.url + "/")
    await page.fill("#token", tokens["viewer"])
    await page.click("button[type=submit]")
    await page.goto(live.url + "/#policies")
    await expect(page.locator("#view-policies")).to_be_visible(timeout=WAIT_MS)
    await expect(page.locator("#view-extensions")).to_be_hidden()
    await policy_row(page, "support_en").click()
    await page.click("#dry-run")
    await expect(page.locator("#dry-steps li")).to_have_count(4, timeout=WAIT_MS)
    assert [] == violations
