"""End to end: the official openai SDK -> the proxy -> a fake OpenAI upstream.

After every test the books must balance: nothing left reserved, and the tokens committed equal
what the upstream reported (tests that cut a stream check their estimate instead).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import math

import aiohttp
import openai
import pytest


from . import harness
from .fake_upstream import WORDS
from .harness import MSGS, reported_tokens


@pytest.fixture
async def proxy(store_url, start_proxy):
    """A proxy with generous budgets; the books are checked after the test."""
    h = await start_proxy(store_url, {"defaults": {"org": {"day": {"usd": 100}}}})
    h.check_books = True
    yield h
    if h.check_books:
        used, reserved = await h.books()
        assert reserved == 0
        assert used == reported_tokens(h)


async def test_plain_chat_is_proxied_and_charged_what_upstream_reported(proxy):
    client = proxy.client()
    raw = await client.chat.completions.with_raw_response.create(model="gpt-4o", messages=MSGS)
    got = raw.parse()
    direct = await proxy.direct().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert got.choices[0].message.content == direct.choices[0].message.content == "".join(WORDS)
    assert raw.headers["x-budget-model"] == "gpt-4o"
    assert "x-budget-downgraded-from" not in raw.headers
    assert float(raw.headers["x-budget-remaining-usd"]) < 100
    seen = proxy.fake.seen[0]
    assert seen.headers["Authorization"] == "Bearer sk-upstream-test"      # never the client's key
    assert harness.CLIENT_KEY not in json.dumps(seen.headers)


async def test_an_upstream_cookie_never_rides_on_another_request(proxy):
    # One upstream session serves every tenant: a cookie set on one answer is not sent back. The
    # upstream is named by host name (aiohttp's jar ignores cookies of bare IP addresses).
    gateway = proxy.gateway
    openai_ = gateway.config.providers["openai"]
    local = openai_.base_url.replace("127.0.0.1", "localhost")
    gateway.reconfigure(dataclasses.replace(gateway.config, providers={
        **gateway.config.providers, "openai": dataclasses.replace(openai_, base_url=local)}))
    proxy.fake.cookie = "__cf_bm=tenant-a-edge-session"
    client = proxy.client()
    for _ in range(2):
        await client.chat.completions.create(model="gpt-4o", messages=MSGS)
    assert len(proxy.fake.seen) == 2
    assert [s.headers.get("Cookie") for s in proxy.fake.seen] == [None, None]


async def stream_chunks(client, **kw):
    stream = await client.chat.completions.create(model="gpt-4o", messages=MSGS, stream=True, **kw)
    return [c.model_dump() async for c in stream]


def without_volatile(chunks):
    return [{k: v for k, v in c.items() if k not in ("model",)} for c in chunks]


async def test_stream_without_include_usage_looks_exactly_like_a_direct_call(proxy):
    via = await stream_chunks(proxy.client())
    direct = await stream_chunks(proxy.direct())
    assert via == direct                         # no usage chunk, no "usage": null leaking
    assert all(c["usage"] is None for c in via)
    assert proxy.fake.seen[0].body["stream_options"] == {"include_usage": True}   # we asked for it
    assert "stream_options" not in proxy.fake.seen[1].body


async def test_stream_bytes_are_identical_to_a_direct_call(proxy):
    body = {"model": "gpt-4o", "messages": MSGS, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"}) as r:
            via = await r.read()
            assert r.headers["Content-Type"].startswith("text/event-stream")
            assert r.headers["x-budget-model"] == "gpt-4o"
        async with s.post(str(proxy.upstream.make_url("/v1/chat/completions")), json=body,
                          headers={"Authorization": "Bearer sk-upstream-test", "x-test-direct": "1"}) as r:
            direct = await r.read()
    assert via == direct


async def test_stream_with_include_usage_passes_the_usage_chunk(proxy):
    via = await stream_chunks(proxy.client(), stream_options={"include_usage": True})
    assert via[-1]["choices"] == [] and via[-1]["usage"]["completion_tokens"] == len(WORDS)
    direct = await stream_chunks(proxy.direct(), stream_options={"include_usage": True})
    assert via == direct


async def test_completions_and_embeddings_and_models(proxy):
    client = proxy.client()
    c = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi", max_tokens=20)
    assert c.choices[0].text == "".join(WORDS)
    stream = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt=["a", "b"], stream=True)
    assert "".join([x.choices[0].text async for x in stream if x.choices]) == "".join(WORDS)
    e = await client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
    assert len(e.data) == 2
    ids = [m.id async for m in client.models.list()]
    assert ids[:1] == ["smart"] and {"gpt-4o", "gpt-4o-mini", "text-embedding-3-small"} <= set(ids)


async def test_upstream_model_name_is_rewritten(proxy):
    raw = await proxy.client().chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=MSGS)
    assert raw.headers["x-budget-model"] == "gpt-4o-mini"
    assert proxy.fake.seen[0].body["model"] == "gpt-4o-mini-2024-07-18"


async def test_unknown_model_is_404_model_not_found(proxy):
    with pytest.raises(openai.NotFoundError) as exc:
        await proxy.client().chat.completions.create(model="gpt-99", messages=MSGS)
    assert exc.value.body["code"] == "model_not_found" and exc.value.body["param"] == "model"
    assert proxy.fake.seen == []


async def test_upstream_error_is_passed_through_and_reservation_released(proxy):
    proxy.fake.fail_with = 500
    with pytest.raises(openai.InternalServerError) as exc:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert exc.value.status_code == 500
    assert exc.value.body == {"message": "The server had an error.", "type": "server_error",
                              "param": None, "code": None}
    used, reserved = await proxy.books()
    assert (used, reserved) == (0, 0)


async def test_client_disconnect_mid_stream_cancels_upstream_and_charges_partial_output(proxy):
    proxy.check_books = False
    proxy.fake.chunk_delay = 0.05
    body = {"model": "gpt-4o", "messages": MSGS, "stream": True}
    async with aiohttp.ClientSession() as s:
        r = await s.post(f"{proxy.url}/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"})
        first = await r.content.readuntil(b"\n\n")
        second = await r.content.readuntil(b"\n\n")
        assert b"assistant" in first and b"Hello" in second
        r.close()                                           # the client walks away
    for _ in range(100):
        if proxy.fake.cut_streams:
            break
        await asyncio.sleep(0.02)
    assert proxy.fake.cut_streams == 1 and proxy.fake.finished_streams == 0
    used, reserved = await proxy.books()
    assert reserved == 0
    prompt = proxy.gateway.tokens.chat_prompt({"model": "gpt-4o", "messages": MSGS}, "gpt-4o")
    assert prompt < used < prompt + len(WORDS) + 2           # prompt plus the output streamed so far


async def test_upstream_rejecting_the_proxy_key_is_a_502_that_leaks_nothing(store_url, start_proxy):
    h = await start_proxy(store_url, {}, env={"BP_TEST_UPSTREAM_KEY": "sk-wrongkey-987"})
    with pytest.raises(openai.APIStatusError) as exc:
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert exc.value.status_code == 502
    assert exc.value.body["code"] == "upstream_auth_failed"
    assert "sk-wro" not in exc.value.response.text and "987" not in exc.value.response.text
    assert (await h.books()) == (0, 0)


async def test_a_stream_longer_than_its_lease_extends_it(store_url, monkeypatch, caplog, start_proxy):
    # Lease 1 s, a stream of ~2 s, a sweeper every 0.1 s: without extension the sweeper would
    # settle the lease at its reserved amount mid-stream (and the late commit correct it).
    from proxy import app as app_mod
    monkeypatch.setattr(app_mod, "SWEEP_SECONDS", 0.1)
    h = await start_proxy(store_url, {"reservation": {"lease_seconds": 1}})
    h.fake.chunk_delay = 0.25
    chunks = await stream_chunks(h.client())
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"]) \
        == "".join(WORDS)
    used, reserved = await h.books()
    assert (used, reserved) == (reported_tokens(h), 0)
    assert not [r for r in caplog.records if "expired" in r.getMessage()]     # never swept


async def test_unreachable_upstream_is_a_502_and_releases_the_reservation(proxy):
    await proxy.upstream.close()
    with pytest.raises(openai.APIStatusError) as exc:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert exc.value.status_code == 502 and exc.value.body["code"] == "upstream_unavailable"
    assert (await proxy.books()) == (0, 0)


async def test_upstream_dying_mid_stream_is_visible_to_the_client_and_charged_partially(proxy):
    proxy.check_books = False
    proxy.fake.cut_after = 3                                   # role chunk + 2 words, then gone
    body = {"model": "gpt-4o", "messages": MSGS, "stream": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(f"{proxy.url}/chat/completions", json=body,
                          headers={"Authorization": f"Bearer {harness.CLIENT_KEY}"}) as r:
            with pytest.raises(aiohttp.ClientPayloadError):
                await r.read()
    used, reserved = await proxy.books()
    prompt = proxy.gateway.tokens.chat_prompt({"model": "gpt-4o", "messages": MSGS}, "gpt-4o")
    streamed = WORDS[0] + WORDS[1]                              # two content chunks got through
    assert reserved == 0 and used == prompt + max(2, math.ceil(len(streamed) / 4))


async def test_a_bug_after_reserving_is_an_openai_shaped_500_and_settles(proxy, monkeypatch):
    from proxy import gateway
    monkeypatch.setattr(gateway, "passed_headers", lambda up: 1 / 0)
    proxy.check_books = False
    with pytest.raises(openai.InternalServerError) as exc:
        await proxy.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    assert exc.value.body["code"] == "internal_error"
    used, reserved = await proxy.books()
    assert reserved == 0 and used > 0                           # it reached the upstream: prompt charged


async def test_commit_retries_through_a_redis_restart(redis_server, redis_url, start_proxy):
    h = await start_proxy(redis_url, {"defaults": {"org": {"day": {"usd": 10}}}})
    try:
        h.fake.chunk_delay = 0.05
        stream = await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, stream=True)
        first = await stream.__anext__()
        redis_server.stop()                                    # the commit at the end will fail...
        rest = [c async for c in stream]
        assert first and rest
        await asyncio.sleep(0.3)
        redis_server.start()                                   # ...and succeed on a retry
        used, reserved = await h.books()
        assert (used, reserved) == (reported_tokens(h), 0)
    finally:
        if redis_server.proc is None:
            redis_server.start()


async def test_a_started_proxy_collects_young_objects_rarely(proxy):
    # A request's few hundred objects die by reference count: at CPython's 700 the collector ran
    # every request or two, walking the open requests' objects each time.
    import gc
    from proxy import app as app_mod
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    try:
        assert app_mod._freeze_gc in proxy.proxy.app.on_startup      # what the started proxy ran
        await app_mod._freeze_gc(proxy.proxy.app)
        assert gc.get_threshold() == (app_mod.GC_YOUNG, *before[1:]) and app_mod.GC_YOUNG >= 10_000
    finally:
        gc.set_threshold(*before)


async def test_a_request_never_looks_up_the_running_loop(proxy, monkeypatch):
    # On CPython 3.11 asyncio.get_running_loop() is a getpid() system call (~180 ns, against
    # ~50 ns for a cached loop; proxy/tasks.py _OnLoop): the proxy's objects look their loop up
    # once, not per request. Counted here: the proxy's own calls, once warm.
    import os
    import sys
    proxy_dir = os.path.dirname(os.path.abspath(harness.build_app.__code__.co_filename))
    client = proxy.client()
    for stream in (False, True):          # warm: connections pooled, loops cached
        await _chat(client, stream)
    real, calls = asyncio.get_running_loop, []

    def counted():
        caller = sys._getframe(1).f_code.co_filename
        if os.path.abspath(caller).startswith(proxy_dir + os.sep):
            calls.append(caller)
        return real()

    monkeypatch.setattr(asyncio, "get_running_loop", counted)
    for i in range(10):
        await _chat(client, stream=bool(i % 2))
    await asyncio.sleep(0.05)            # settlements done
    monkeypatch.undo()
    assert calls == []


async def _chat(client, stream: bool) -> None:
    if stream:
        async for _ in await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS, stream=True):
            pass
    else:
        await client.chat.completions.create(model="gpt-4o-mini", messages=MSGS)
