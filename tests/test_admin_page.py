"""The admin page in a real browser: Debian's Chromium driven by playwright (never a downloaded
browser). Asserts what a person checks: logging in through the form, bar widths that match the
numbers, red for a refused or exhausted scope, amber near the limit, and filtering."""

from __future__ import annotations

import hashlib
import os
import shutil

import openai
import pytest

from .harness import CLIENT_KEY

ADMIN = "bp-admin-key-for-the-browser"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MSGS = [{"role": "user", "content": "Say hello."}]
RED, AMBER, GREEN = "rgb(207, 34, 46)", "rgb(212, 167, 44)", "rgb(45, 164, 78)"

POLICY = {"defaults": {"org": {"day": {"tokens": 1_000, "usd": 5}}, "user": {"day": {"tokens": 10_000}}},
          "overrides": {"org": {"globex": {"day": {"tokens": 40}}},              # two requests: ~85 %
                        "user": {"acme/capped": {"day": {"tokens": 5}}, # refused at once, nothing used
                                 "acme/full": {"day": {"tokens": 30}}}}}          # one fits, the next is refused

ROWS_JS = """() => [...document.querySelectorAll('tr.budget')].map(tr => {
  const bar = tr.querySelector('.bar').getBoundingClientRect().width;
  const used = tr.querySelector('.used'), res = tr.querySelector('.reserved');
  return {type: tr.dataset.scopeType, id: tr.dataset.scopeId, unit: tr.dataset.unit, state: tr.className,
          used: +tr.dataset.used, reserved: +tr.dataset.reserved, limit: +tr.dataset.limit,
          barW: bar, usedW: used.getBoundingClientRect().width, resW: res.getBoundingClientRect().width,
          colour: getComputedStyle(used).backgroundColor,
          label: tr.querySelector('.state').textContent,
          labelColour: getComputedStyle(tr.querySelector('.state')).color};
})"""


def chromium_or_fail() -> str:
    if os.path.exists(CHROMIUM):
        return CHROMIUM
    if os.environ.get("CI") == "true":
        pytest.fail("chromium is not installed: .ci/run installs Debian's chromium package")
    pytest.skip("chromium is not installed (apt-get install chromium); CI installs it")


async def spend(client, n: int, user: str | None = None) -> None:
    for _ in range(n):
        try:
            await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, max_tokens=8,
                                                 **({"user": user} if user else {}))
        except openai.RateLimitError:
            pass


async def test_the_page_in_chromium(start_proxy, tmp_path):
    executable = chromium_or_fail()
    from playwright.async_api import async_playwright

    h = await start_proxy("memory://", POLICY,
                          config={"admin_keys": {"ops": {"sha256": hashlib.sha256(ADMIN.encode()).hexdigest()}}})
    acme, globex = h.client(CLIENT_KEY), h.client("bp-test-other-key")
    await spend(acme, 3)
    await spend(globex, 2)
    await spend(acme, 1, user="capped")
    await spend(acme, 2, user="full")
    await h.settled()

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable,
                                           args=["--no-sandbox"] if os.geteuid() == 0 else [])
        try:
            page = await browser.new_page(viewport={"width": 1280, "height": 900})
            resp = await page.goto(str(h.proxy.make_url("/admin/")))
            assert resp.status == 401
            await page.fill("#key", ADMIN)
            await page.click("button[type=submit]")
            await page.wait_for_selector("table.budgets")
            assert await page.evaluate("document.cookie") == ""            # HttpOnly: no script sees it

            rows = await page.evaluate(ROWS_JS)
            by_id = {(r["type"], r["id"], r["unit"]): r for r in rows}
            for r in rows:                                 # the bars' widths are the numbers
                assert abs(r["usedW"] / r["barW"] - min(1.0, r["used"] / r["limit"])) < 0.01, r
                assert abs(r["resW"] / r["barW"] - min(1.0, r["reserved"] / r["limit"])) < 0.01, r
            capped, full = by_id[("user", "acme/capped", "tokens")], by_id[("user", "acme/full", "tokens")]
            assert capped["used"] == 0 and "over" in capped["state"] and capped["label"] == "exhausted"
            assert capped["labelColour"] == RED
            assert "over" in full["state"] and full["colour"] == RED and full["used"] > 0
            near = by_id[("org", "globex", "tokens")]
            assert 0.8 <= near["used"] / near["limit"] < 1 and "warn" in near["state"] and near["colour"] == AMBER
            calm = by_id[("org", "acme", "tokens")]
            assert "ok" in calm["state"] and calm["colour"] == GREEN
            # Refused first, then by closeness to the limit.
            states = [r["state"].split()[-1] for r in rows]
            assert states == sorted(states, key=["over", "warn", "ok"].index)
            shares = [(r["used"] + r["reserved"]) / r["limit"] for r in rows if "over" not in r["state"]]
            assert shares == sorted(shares, reverse=True)
            assert "acme/capped" in await page.inner_text("table.refusals")
            await page.screenshot(path=str(tmp_path / "admin.png"), full_page=True)
            if os.environ.get("BP_DOCS_SCREENSHOT"):
                shutil.copy(tmp_path / "admin.png", os.path.join(ROOT, "docs", "admin.png"))

            await page.select_option("#type", "user")
            await page.click("form.filters button")
            await page.wait_for_url("**/admin/?type=user*")
            users = await page.evaluate(ROWS_JS)
            assert users and {r["type"] for r in users} == {"user"}
            assert await page.eval_on_selector("#type", "e => e.value") == "user"   # the filter is kept

            # A client names its end user: markup in it is shown as text, never run.
            evil = '<img src=x onerror="document.title=\'pwned\'">'
            await spend(acme, 1, user=evil)
            await h.settled()
            await page.reload()
            await page.wait_for_selector("table.budgets")
            assert await page.title() != "pwned" and await page.locator("img").count() == 0
            assert f"acme/{evil}" in await page.inner_text("table.budgets")
        finally:
            await browser.close()
    assert (tmp_path / "admin.png").stat().st_size > 10_000
