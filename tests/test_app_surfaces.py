"""The Responses and Messages surfaces end to end: the official `openai` and `anthropic` SDKs
against the proxy in front of the fake upstream, on both stores. After every test nothing is
reserved (the start_proxy fixture checks), and the committed tokens and micro-dollars are those
of the upstream's usage, priced here by hand from the list prices (not through proxy.pricing).
"""

from __future__ import annotations

import json
import math
from fractions import Fraction as F

import aiohttp
import anthropic
import httpx2
import openai
import pytest

from aiohttp.test_utils import TestServer

from proxy import config as config_mod
from proxy.ledger import Scope

from . import fake_upstream as fake
from .harness import CLIENT_KEY, MSGS, config_data, post

USER = [{"role": "user", "content": "Say hello."}]


async def committed(h, scope: Scope = Scope("global", "*")) -> tuple[int, int, int, int]:
    """(tokens used, tokens reserved, micro-USD used, micro-USD reserved) on the day counters."""
    await h.settled()
    b = await h.balances(scope)
    return b[("day", "tokens")].used, b[("day", "tokens")].reserved, b[("day", "usd")].used, b[("day", "usd")].reserved


def gpt41_usd(u: dict) -> int:
    """gpt-4.1 in the harness: input $2, cache reads $0.50, 30-minute writes $2.50, 12-hour writes
    $3, output $8 per million tokens. input_tokens INCLUDES the reads and writes."""
    d = u["input_tokens_details"]
    w = d["cache_write_tokens_details"]
    plain = u["input_tokens"] - d["cached_tokens"] - d["cache_write_tokens"]
    return math.ceil(plain * F(2) + d["cached_tokens"] * F("0.5") + w["ttl_30m_tokens"] * F("2.5")
                     + w["ttl_12h_tokens"] * F(3) + u["output_tokens"] * F(8))


def sonnet_usd(u: dict) -> int:
    """claude-sonnet-4-6: input $3, reads $0.30, 5-minute writes $3.75, 1-hour writes $6, output
    $15. input_tokens EXCLUDES the cache fields."""
    c = u["cache_creation"]
    return math.ceil(u["input_tokens"] * F(3) + u["cache_read_input_tokens"] * F("0.3")
                     + c["ephemeral_5m_input_tokens"] * F("3.75") + c["ephemeral_1h_input_tokens"] * F(6)
                     + u["output_tokens"] * F(15))


def anthropic_tokens(u: dict) -> int:
    return u["input_tokens"] + u["cache_read_input_tokens"] + u["cache_creation_input_tokens"] + u["output_tokens"]


# --- OpenAI Responses ------------------------------------------------------------------------


async def test_responses_create_commits_the_usage_priced_row_by_row(store_url, start_proxy):
    h = await start_proxy(store_url)
    resp = await h.client().responses.create(model="gpt-4.1", input="Say hello.", instructions="Be terse.",
                                             max_output_tokens=100)
    assert resp.output_text == "".join(fake.WORDS)
    u = h.fake.reported[-1]
    assert resp.usage.input_tokens_details.cached_tokens == u["input_tokens_details"]["cached_tokens"] > 0
    assert resp.usage.input_tokens == u["input_tokens"] and resp.usage.output_tokens == u["output_tokens"]
    assert await committed(h) == (u["total_tokens"], 0, gpt41_usd(u), 0)
    assert h.fake.seen[-1].body["model"] == "gpt-4.1-2025-04-14"


async def test_responses_stream_passes_events_through_and_commits_the_final_usage(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100_000}}}})
    stream = await h.client().responses.create(model="gpt-4.1", input=[
        {"role": "user", "content": [{"type": "input_text", "text": "Say hello."}]}], stream=True)
    kinds, text, final = [], "", None
    async for event in stream:
        kinds.append(event.type)
        if event.type == "response.output_text.delta":
            text += event.delta
        if event.type == "response.completed":
            final = event.response
    assert kinds[0] == "response.created" and kinds[-1] == "response.completed"
    assert text == "".join(fake.WORDS) and final.usage.output_tokens_details.reasoning_tokens == 2
    # No max_output_tokens from the client, and a limit applies: the reserved cap went upstream.
    assert h.fake.seen[-1].body["max_output_tokens"] == 1024
    u = h.fake.reported[-1]
    assert await committed(h) == (u["total_tokens"], 0, gpt41_usd(u), 0)


async def test_responses_stream_helper_gets_its_final_response(store_url, start_proxy):
    h = await start_proxy(store_url)
    async with h.client().responses.stream(model="gpt-4.1", input="Say hello.", max_output_tokens=16) as stream:
        deltas = [e.delta async for e in stream if e.type == "response.output_text.delta"]
        final = await stream.get_final_response()
    assert final.status == "completed" and final.output_text == "".join(deltas) == "".join(fake.WORDS)
    u = h.fake.reported[-1]
    assert await committed(h) == (u["total_tokens"], 0, gpt41_usd(u), 0)


async def test_a_response_cut_at_its_cap_is_incomplete_and_charged_its_usage(store_url, start_proxy):
    h = await start_proxy(store_url)
    h.fake.words = [f" w{i}" for i in range(40)]
    resp = await h.client().responses.create(model="gpt-4.1", input="Say hello.", max_output_tokens=16)
    # 16 output tokens: 2 of reasoning and 14 words, then the upstream stopped at the cap
    assert resp.status == "incomplete" and resp.output_text == "".join(h.fake.words[:14])
    u = h.fake.reported[-1]
    assert u["output_tokens"] == 16 and await committed(h) == (u["total_tokens"], 0, gpt41_usd(u), 0)


async def test_retrieve_input_items_and_delete_pass_through_uncharged(store_url, start_proxy):
    h = await start_proxy(store_url)
    client = h.client()
    resp = await client.responses.create(model="gpt-4.1", input="Say hello.")
    before = await committed(h)
    got = await client.responses.retrieve(resp.id)
    assert (got.id, got.output_text) == (resp.id, "".join(fake.WORDS))
    items = await client.responses.input_items.list(resp.id)
    assert [i.content[0].text for i in items.data] == ["Say hello."]
    deleted = await client.responses.delete(resp.id)
    assert deleted is None or getattr(deleted, "deleted", True)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(resp.id)
    with pytest.raises(openai.AuthenticationError):
        await h.client("not-a-proxy-key").responses.retrieve(resp.id)
    assert await committed(h) == before
    assert all(s.headers["Authorization"] == f"Bearer {fake.UPSTREAM_KEY}" for s in h.fake.seen)
    async with aiohttp.ClientSession() as s:            # an id may not walk to another upstream path
        async with s.get(f"{h.url}/responses/..%2Fchat%2Fcompletions",
                         headers={"Authorization": f"Bearer {CLIENT_KEY}"}) as r:
            assert r.status == 404 and (await r.json())["error"]["code"] == "not_found"


async def test_a_stored_response_is_found_at_whichever_openai_provider_has_it(start_proxy):
    h = await start_proxy("memory://")
    resp = await h.client().responses.create(model="gpt-4.1", input="Say hello.")
    other = fake.FakeOpenAI()                       # a provider listed first that never saw it
    server = TestServer(other.app())
    await server.start_server()
    try:
        data = config_data(str(h.upstream.make_url("/v1")), "memory://")
        data["providers"] = {"first": {"base_url": str(server.make_url("/v1")), "api_key_env": "K"},
                             **data["providers"]}
        h.gateway.reconfigure(config_mod.parse(data, "c.yaml", env={"K": fake.UPSTREAM_KEY,
                                                                    "BP_TEST_UPSTREAM_KEY": fake.UPSTREAM_KEY}))
        got = await h.client().responses.retrieve(resp.id)
        assert got.id == resp.id
        path = f"/v1/responses/{resp.id}"
        assert [x.path for x in other.seen] == [path]           # asked first: it answered 404
        assert h.fake.seen[-1].path == path                     # then the provider that has it
        with pytest.raises(openai.NotFoundError):               # nowhere: the last provider's 404
            await h.client().responses.retrieve("resp_nowhere")
    finally:
        await server.close()


@pytest.mark.parametrize("field, value", [("background", True), ("previous_response_id", "resp_abc")])
async def test_responses_the_proxy_cannot_budget_are_refused_before_anything_is_reserved(
        store_url, start_proxy, field, value):
    h = await start_proxy(store_url)
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client().responses.create(model="gpt-4.1", input="hi", **{field: value})
    assert exc.value.body["param"] == field and exc.value.body["code"] == "unsupported_parameter"
    assert h.fake.seen == [] and await committed(h) == (0, 0, 0, 0)


async def test_responses_budget_refusal_is_openais_429(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"usd": 0.0001}}}})
    with pytest.raises(openai.RateLimitError) as exc:
        await h.client(max_retries=2).responses.create(model="gpt-4.1", input="hi", max_output_tokens=500)
    assert exc.value.body["code"] == "BUDGET_EXCEEDED" and exc.value.body["scope"]["unit"] == "usd"
    assert h.gateway.stats["requests"] == 1 and h.fake.seen == []


async def test_a_cut_responses_stream_is_charged_its_prompt_and_the_output_seen(store_url, tokens, start_proxy):
    h = await start_proxy(store_url)
    h.fake.cut_after = 7                   # created, in_progress, item, part, then 3 of 6 text deltas
    with pytest.raises(openai.APIError):
        stream = await h.client().responses.create(model="gpt-4.1", input="Say hello.", stream=True,
                                                   max_output_tokens=50)
        async for _ in stream:
            pass
    prompt = tokens.responses_input({"input": "Say hello."}, "gpt-4.1-2025-04-14")
    output = max(3, math.ceil(len("".join(fake.WORDS[:3])) / 4))
    assert await committed(h) == (prompt + output, 0, math.ceil(prompt * F(2) + output * F(8)), 0)


# --- Anthropic Messages ----------------------------------------------------------------------


async def test_messages_create_commits_every_cache_field_once(store_url, start_proxy):
    h = await start_proxy(store_url)
    msg = await h.anthropic().messages.create(model="claude-sonnet-4-6", max_tokens=100, messages=USER,
                                              system="Be terse.")
    assert msg.content[0].text == "".join(fake.WORDS)
    u = h.fake.reported_messages[-1]
    assert msg.usage.cache_read_input_tokens == u["cache_read_input_tokens"] > 0
    assert msg.usage.cache_creation.ephemeral_1h_input_tokens == u["cache_creation"]["ephemeral_1h_input_tokens"] > 0
    assert await committed(h) == (anthropic_tokens(u), 0, sonnet_usd(u), 0)
    seen = h.fake.seen[-1]
    assert seen.path == "/v1/messages" and seen.body["model"] == "claude-sonnet-4-6-20260217"
    assert seen.headers["x-api-key"] == fake.UPSTREAM_KEY and seen.headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in seen.headers


async def test_messages_stream_helper_commits_the_last_message_delta(store_url, start_proxy):
    h = await start_proxy(store_url)
    client = h.anthropic(default_headers={"anthropic-beta": "extended-cache-ttl-2025-04-11"})
    async with client.messages.stream(model="claude-sonnet-4-6", max_tokens=100, messages=USER) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
    assert text == "".join(fake.WORDS)
    u = h.fake.reported_messages[-1]
    assert final.usage.output_tokens == u["output_tokens"]          # the SDK, too, takes the last delta
    assert await committed(h) == (anthropic_tokens(u), 0, sonnet_usd(u), 0)
    assert h.fake.seen[-1].headers["anthropic-beta"] == "extended-cache-ttl-2025-04-11"


async def test_a_cut_messages_stream_is_charged_the_exact_input_of_message_start(store_url, start_proxy):
    h = await start_proxy(store_url)
    h.fake.cut_after = 6                   # message_start, block start, ping, 3 text deltas
    with pytest.raises((anthropic.APIError, httpx2.RemoteProtocolError)):     # the SDK sees the cut
        async with h.anthropic().messages.stream(model="claude-sonnet-4-6", max_tokens=100,
                                                 messages=USER) as stream:
            async for _ in stream.text_stream:
                pass
    u = h.fake.reported_messages[-1]
    output = max(1, 3, math.ceil(len("".join(fake.WORDS[:3])) / 4))
    cut = {**u, "output_tokens": output}
    assert await committed(h) == (anthropic_tokens(cut), 0, sonnet_usd(cut), 0)


async def test_count_tokens_passes_through_uncharged(store_url, start_proxy):
    h = await start_proxy(store_url)
    got = await h.anthropic().messages.count_tokens(model="claude-sonnet-4-6", messages=USER)
    assert got.input_tokens == h.fake.prompt_tokens({"messages": USER})
    assert h.fake.seen[-1].body["model"] == "claude-sonnet-4-6-20260217"
    assert await committed(h) == (0, 0, 0, 0)


async def test_messages_budget_refusal_is_anthropics_rate_limit_error_not_retried(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"usd": 0.001}}}})
    with pytest.raises(anthropic.RateLimitError) as exc:
        await h.anthropic(max_retries=2).messages.create(model="claude-haiku-4-5", max_tokens=4000, messages=USER)
    err = exc.value.body
    assert err["type"] == "error" and err["error"]["type"] == "rate_limit_error"
    assert err["error"]["code"] == "BUDGET_EXCEEDED" and err["error"]["scope"]["window"] == "day"
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert h.gateway.stats["requests"] == 1 and h.fake.seen == []


async def test_messages_errors_use_anthropics_shape_and_accept_either_key_header(store_url, start_proxy):
    h = await start_proxy(store_url)
    with pytest.raises(anthropic.AuthenticationError) as exc:
        await h.anthropic("not-a-proxy-key").messages.create(model="claude-haiku-4-5", max_tokens=10,
                                                             messages=USER)
    assert exc.value.body["error"]["type"] == "authentication_error"
    status, _, body = await post(h, "/messages", {"model": "claude-haiku-4-5", "messages": USER})
    assert status == 400 and json.loads(body) == {"type": "error", "error": {
        "type": "invalid_request_error", "message": "max_tokens: Field required",
        "code": "missing_required_parameter", "param": "max_tokens"}}
    status, _, body = await post(h, "/messages", {"model": "claude-haiku-4-5", "max_tokens": 10,
                                                  "messages": USER})          # Authorization: Bearer
    assert status == 200 and json.loads(body)["type"] == "message"


async def test_a_model_is_only_served_on_its_providers_api(store_url, start_proxy):
    h = await start_proxy(store_url)
    with pytest.raises(anthropic.BadRequestError) as exc:
        await h.anthropic().messages.create(model="gpt-4o", max_tokens=10, messages=USER)
    assert "`gpt-4o` is served by an openai provider and cannot be used on /v1/messages" in \
        exc.value.body["error"]["message"]
    with pytest.raises(openai.BadRequestError) as exc:
        await h.client().responses.create(model="claude-haiku-4-5", input="hi")
    assert exc.value.body["param"] == "model" and exc.value.body["code"] == "model_not_supported_on_endpoint"
    with pytest.raises(openai.BadRequestError):
        await h.client().chat.completions.create(model="claude-sonnet-4-6", messages=MSGS)
    assert h.fake.seen == [] and await committed(h) == (0, 0, 0, 0)


# --- chat, priced through the same table -----------------------------------------------------


async def test_chat_cached_prompt_tokens_are_charged_at_the_cached_price(store_url, start_proxy):
    h = await start_proxy(store_url)
    h.fake.cached_prompt = 8
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, max_tokens=50)
    u = h.fake.reported[-1]
    cached = u["prompt_tokens_details"]["cached_tokens"]
    usd = math.ceil((u["prompt_tokens"] - cached) * F("2.5") + cached * F("1.25") + u["completion_tokens"] * F(10))
    assert cached == 8 and await committed(h) == (u["total_tokens"], 0, usd, 0)
