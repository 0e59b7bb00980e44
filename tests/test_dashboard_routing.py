"""The dashboard's "Versions and split" box in a real headless Chromium, against a live server
with a real invoker and the sample extensions: an extension's versions in the order calls try
them with what each takes (rules, percent split, the fallback row), this server's calls and
circuit per version, and its instances with an unhealthy one marked as skipped."""

from __future__ import annotations

from typing import Any

import httpx
from api_helpers import LiveServer
from playwright.async_api import Browser, expect
from test_dashboard import WAIT_MS, browser, pick, server, signed_in

from extreg.local.samples import SAMPLES_BY_ID

__all__ = ["browser", "server"]  # the fixtures, shared with test_dashboard

ANSWERS = SAMPLES_BY_ID["normalize_text"].subject  # a subject that answers


async def test_versions_split_calls_and_instances_are_shown(
    server: tuple[LiveServer, dict[str, str]], browser: Browser
) -> None:
    live, tokens = server
    record: dict[str, Any] = {
        "id": "canaried",
        "type": "pre",
        "subject": ANSWERS,
        "version": "v1",
        "timeout_ms": 1000,
        "versions": [
            {
                "version": "v2",
                "subject": ANSWERS,
                "timeout_ms": 1000,
                "routing_rules": {"tenant_id": ["beta"], "percent": 100},
            }
        ],
        "instances": [
            {"instance_id": "a", "subject": ANSWERS, "health_status": "unhealthy"},
            {"instance_id": "b", "subject": ANSWERS},
        ],
    }
    admin = {"Authorization": f"Bearer {tokens['admin']}"}
    operator = {"Authorization": f"Bearer {tokens['operator']}"}
    async with httpx.AsyncClient(base_url=live.url, timeout=30) as client:
        created = await client.post("/admin/extensions", json=record, headers=admin)
        assert 201 == created.status_code, created.text
        for _ in range(2):
            called = await client.post(
                "/admin/extensions/canaried/invoke",
                json={"payload": {"payload": "hi"}, "tenant_id": "beta"},
                headers=operator,
            )
            assert 200 == called.status_code, called.text
        plan = (await client.get("/admin/extensions/canaried/versions", headers=admin)).json()
    assert ["v2", "v1"] == [v["version"] for v in plan["versions"]]
    page = await signed_in(browser, live.url, tokens["viewer"])
    await pick(page, "canaried")
    box = page.locator("#routing-box")
    await expect(box).to_be_visible(timeout=WAIT_MS)
    canary = page.locator('#version-rows tr[data-version="v2"] td')
    await expect(canary.nth(1)).to_have_text(
        '{"tenant_id":["beta"]}, 100% by tenant_id, else trace_id'
    )
    await expect(canary.nth(3)).to_have_text("2", timeout=WAIT_MS)  # this server's calls
    await expect(canary.nth(4)).to_have_text("0")
    await expect(canary.nth(5)).to_contain_text("closed")
    await expect(page.locator('#version-rows tr[data-version="v1"] td').nth(1)).to_have_text(
        "the rest (fallback)"
    )
    await expect(page.locator('#instance-rows tr[data-instance="a"] td').nth(3)).to_have_text(
        "unhealthy: skipped"
    )
    await expect(page.locator('#instance-rows tr[data-instance="b"] td').nth(3)).to_have_text(
        "unknown"
    )
    await pick(page, "normalize_text")  # no versions, no instances: no box
    await expect(box).to_be_hidden()
