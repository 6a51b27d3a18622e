"""Review finding: the settlement log recorded every commit as "ok" and no latency, so a finance
team could not tell a cut stream or a client that left from a whole answer (issue 6, section 3)."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from . import harness

MSGS = [{"role": "user", "content": "Say hello."}]


async def _log(h) -> list:
    await h.settled()
    return await h.gateway.ledger.settlements(limit=10)


async def test_outcomes_and_latency_are_logged(store_url, start_proxy):
    h = await start_proxy(store_url)
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=8)
    (ok,) = await _log(h)
    assert ok.outcome == "ok" and isinstance(ok.latency_ms, int) and ok.latency_ms >= 0

    h.fake.chunk_delay = 0.05                  # a client that walks away mid-stream
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{h.url}/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True},
                         headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"})
        await r.content.readuntil(b"\n\n")
        await r.content.readuntil(b"\n\n")
        r.close()
    for _ in range(100):
        if h.fake.cut_streams:
            break
        await asyncio.sleep(0.02)
    gone = (await _log(h))[0]
    assert gone.outcome == "client_gone" and gone.usd_micro > 0

    h.fake.chunk_delay, h.fake.fail_with = 0.0, 500  # the upstream refuses: released, as an upstream error
    with pytest.raises(openai.InternalServerError):
        await h.client(max_retries=0).chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=8)
    failed = (await _log(h))[0]
    assert (failed.outcome, failed.usd_micro) == ("upstream_error", 0)
