"""Every settlement of a real request lands in the settlement log with who, what, how it ended
and how long the upstream took (issue 6 part 3), on both stores."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest

from . import harness
from .harness import MSGS


async def last(h):
    await h.settled()
    return (await h.gateway.ledger.settlements(limit=1))[0]


async def test_an_answered_call_is_logged_with_its_request_usage_and_latency(store_url, start_proxy):
    h = await start_proxy(store_url, {})
    h.fake.chunk_delay = 0.01
    stream = await h.client().chat.completions.create(model="smart", messages=MSGS, user="bob", stream=True)
    [c async for c in stream]
    r = await last(h)
    reported = h.fake.reported[-1]
    assert (r.org, r.user, r.end_user, r.endpoint, r.model_requested, r.model, r.provider, r.stream) == \
        ("acme", "acme/bob", "bob", "chat", "smart", "gpt-4o", "openai", True)
    assert (r.prompt_tokens, r.completion_tokens, r.outcome) == \
        (reported["prompt_tokens"], reported["completion_tokens"], "ok")
    assert r.usd_micro == h.gateway.config.models["gpt-4o"].cost(reported["prompt_tokens"],
                                                                 reported["completion_tokens"])
    assert r.latency_ms is not None and r.latency_ms >= 10 * len(h.fake.words) // 2


async def test_an_upstream_error_is_logged_as_released_by_the_upstream(store_url, start_proxy):
    h = await start_proxy(store_url, {})
    h.fake.fail_with = 500
    with pytest.raises(openai.InternalServerError):
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    r = await last(h)
    assert (r.outcome, r.usd_micro, r.model) == ("upstream_error", 0, "gpt-4o")


async def test_a_cut_stream_and_a_client_that_left_are_told_apart(store_url, start_proxy):
    h = await start_proxy(store_url, {})
    h.fake.cut_after = 3
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.url}/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True},
                          headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"}) as resp:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()
    r = await last(h)
    assert r.outcome == "cut" and r.usd_micro > 0

    h.fake.cut_after, h.fake.chunk_delay = None, 0.2
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{h.url}/chat/completions", json={"model": "gpt-4o", "messages": MSGS, "stream": True},
                          headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"}) as resp:
            await resp.content.readline()
    for _ in range(100):                            # the proxy notices the client left
        await asyncio.sleep(0.05)
        await h.settled()
        if (await h.gateway.ledger.settlements(limit=1))[0].outcome != "cut":
            break
    r = await last(h)
    assert r.outcome == "client_gone" and r.usd_micro > 0
