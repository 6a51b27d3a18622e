"""/healthz is liveness; /readyz is 200 only when the store answers and a policy is loaded."""

from __future__ import annotations

import aiohttp

from . import harness


async def test_ready_when_the_store_answers(store_url, tokens):
    h = await harness.start(store_url, {}, tokens)
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy.make_url("/readyz")) as r:
                assert r.status == 200
                assert (await r.json())["status"] == "ready"
            async with s.get(h.proxy.make_url("/healthz")) as r:
                assert r.status == 200
    finally:
        await harness.stop(h)


async def test_not_ready_with_the_reason_while_redis_is_down_and_ready_again_after(redis_server, redis_url, tokens):
    h = await harness.start(redis_url, {}, tokens)
    try:
        async with aiohttp.ClientSession() as s:
            redis_server.stop()
            async with s.get(h.proxy.make_url("/readyz")) as r:
                assert r.status == 503
                body = await r.json()
                assert body["status"] == "not ready" and "budget store" in body["reason"]
            async with s.get(h.proxy.make_url("/healthz")) as r:
                assert r.status == 200                       # alive: only not ready
            redis_server.start()
            async with s.get(h.proxy.make_url("/readyz")) as r:
                assert r.status == 200
    finally:
        if redis_server.proc is None:
            redis_server.start()
        await harness.stop(h)


async def test_not_ready_without_a_policy(tokens):
    h = await harness.start("memory://", {}, tokens)
    try:
        h.gateway.ledger.policy = None
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy.make_url("/readyz")) as r:
                assert r.status == 503
                assert (await r.json())["reason"] == "no budget policy is loaded"
    finally:
        await harness.stop(h, check_reserved=False)


async def test_ready_without_a_store_when_enforcement_is_disabled(tokens):
    h = await harness.start("redis://127.0.0.1:1/0", {}, tokens, enforcement="disabled")
    try:
        async with aiohttp.ClientSession() as s:
            async with s.get(h.proxy.make_url("/readyz")) as r:
                assert r.status == 200 and (await r.json())["store"] == "disabled"
    finally:
        await harness.stop(h)
