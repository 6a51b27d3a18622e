"""Review finding (robustness): the admin page and usage API built and rendered every scope of
the window on the event loop. With an end-user per scope (allow_end_user), 20,000 users took
about a second of CPU per page load, and the page refreshes every 15 s: every proxied request
stalled with it. The work now runs in a thread."""

from __future__ import annotations

import threading

import aiohttp

from proxy import dashboard, ledger, usage

from .harness import ADMIN, ADMIN_KEYS


async def test_usage_rows_document_and_page_are_built_off_the_event_loop(start_proxy, monkeypatch):
    h = await start_proxy("memory://", {"defaults": {"user": {"day": {"tokens": 100000}}}}, config=ADMIN_KEYS)
    await h.client().chat.completions.create(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                             max_tokens=4, user="zoe")
    await h.settled()
    loop_thread = threading.current_thread()
    where: dict[str, threading.Thread] = {}

    def spy(name, fn):
        def wrapped(*a, **kw):
            where[name] = threading.current_thread()
            return fn(*a, **kw)
        return wrapped

    monkeypatch.setattr(ledger, "_usage_rows", spy("rows", ledger._usage_rows))
    monkeypatch.setattr(usage, "document", spy("document", usage.document))
    monkeypatch.setattr(dashboard, "page", spy("page", dashboard.page))
    admin = {"Authorization": f"Bearer {ADMIN}"}
    async with aiohttp.ClientSession() as s:
        for path in ("/admin/", "/admin/v1/usage"):
            async with s.get(h.proxy.make_url(path), headers=admin) as r:
                assert r.status == 200 and "acme/zoe" in await r.text()
    assert set(where) == {"rows", "document", "page"}
    assert all(t is not loop_thread for t in where.values()), where
