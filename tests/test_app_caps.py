"""A limit is a hard cap (issue 6.1): a call that sets no completion limit is sent upstream with the
completion it reserved, so the answer cannot outgrow the budget; near the wall it is refused, and
the only overrun left is a prompt the proxy under-estimated (bounded, logged)."""

from __future__ import annotations

import asyncio
import logging

import openai
import pytest

from proxy.ledger import Scope

from .harness import MSGS, post

LONG = ["w"] * 511            # the upstream would answer 511 tokens if nothing stopped it
CHAT = {"model": "gpt-4o", "messages": MSGS}


def exact_prompts(h, extra: int = 0):
    """The fake reports the prompt the proxy estimated (plus `extra`): any overrun is the output's."""
    h.fake.prompt_counter = lambda body: h.tokens.chat_prompt(body, "gpt-4o") + extra
    h.fake.words = list(LONG)


async def day(h, scope: Scope, unit: str = "tokens"):
    await h.settled()
    return (await h.balances(scope))[("day", unit)]


async def test_a_call_without_max_tokens_cannot_overrun_a_user_limit(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}}})
    exact_prompts(h)
    r = await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    prompt = h.tokens.chat_prompt(CHAT, "gpt-4o")
    assert h.fake.seen[0].body["max_completion_tokens"] == 100 - prompt
    assert r.choices[0].finish_reason == "length"                 # an ordinary cut, as OpenAI gives
    b = await day(h, Scope("user", "app"))
    assert (b.used, b.reserved) == (100, 0)                       # 5.1x the limit before the fix


async def test_a_stream_without_max_tokens_cannot_overrun_either(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}}})
    exact_prompts(h)
    stream = await h.client().chat.completions.create(model="gpt-4o", messages=MSGS, stream=True)
    chunks = [c async for c in stream]
    assert chunks[-1].choices[0].finish_reason == "length"
    assert (await day(h, Scope("user", "app"))).used == 100


async def test_forty_racers_without_max_tokens_stay_inside_the_limit(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"org": {"day": {"tokens": 2000}}}})
    exact_prompts(h)
    results = await asyncio.gather(*(post(h, "/chat/completions", CHAT) for _ in range(40)))
    assert {status for status, _, _ in results} <= {200, 429}
    assert sum(status == 200 for status, _, _ in results) >= 2
    b = await day(h, Scope("org", "acme"))
    assert b.reserved == 0 and b.used <= 2000                      # 2,044 before the fix


async def test_fewer_than_the_minimum_completion_tokens_left_is_a_429_before_the_upstream(
        store_url, start_proxy, tokens):
    limit = tokens.chat_prompt(CHAT, "gpt-4o") + 15                  # the prompt fits, an answer does not
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": limit}}},
                                      "reservation": {"min_completion_tokens": 16}})
    exact_prompts(h)
    with pytest.raises(openai.RateLimitError) as exc:
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    scope = exc.value.body["scope"]
    assert (scope["type"], scope["id"], scope["window"], scope["unit"]) == ("user", "app", "day", "tokens")
    assert exc.value.response.headers["x-should-retry"] == "false"
    assert h.fake.seen == []


async def test_near_exhaustion_the_last_of_a_budget_goes_to_the_cheapest_model(store_url, start_proxy):
    # $0.005 left for org acme: gpt-4o with 100 tokens (~$0.001) fits but would leave < 20 %.
    h = await start_proxy(store_url, {"defaults": {"org": {"day": {"usd": 0.005}}},
                                      "router": {"downgrade_below": 0.9}})
    raw = await h.client().chat.completions.with_raw_response.create(model="smart", messages=MSGS, max_tokens=100)
    assert raw.headers["x-budget-model"] == "gpt-4o-mini"


async def test_the_only_overrun_is_the_prompt_underestimate_and_it_is_logged(store_url, start_proxy, caplog):
    # The upstream bills 60 more prompt tokens than the proxy could estimate (an image, say):
    # the counter may pass the limit by that much and no more.
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}}})
    exact_prompts(h, extra=60)
    with caplog.at_level(logging.WARNING):
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
        b = await day(h, Scope("user", "app"))
    assert 100 < b.used <= 100 + 60
    assert any("more than the" in r.getMessage() for r in caplog.records)


async def test_the_cap_can_be_turned_off_and_the_overrun_is_then_logged(store_url, start_proxy, caplog):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}},
                                      "reservation": {"send_cap_upstream": False}})
    exact_prompts(h)
    with caplog.at_level(logging.WARNING):
        await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
        b = await day(h, Scope("user", "app"))
    assert "max_completion_tokens" not in h.fake.seen[0].body
    assert b.used > 100 and any("more than the" in r.getMessage() for r in caplog.records)


async def test_a_completions_call_gets_its_cap_as_max_tokens(store_url, start_proxy):
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}}})
    h.fake.words = list(LONG)
    await h.client().completions.create(model="gpt-3.5-turbo-instruct", prompt="Say hi")
    sent = h.fake.seen[0].body
    assert 0 < sent["max_tokens"] < 100 and "max_completion_tokens" not in sent


async def test_a_provider_that_reads_only_max_tokens_gets_the_cap_there(store_url, start_proxy):
    # Ollama's and older vLLM's OpenAI APIs read max_tokens only: the cap must land where they look.
    h = await start_proxy(store_url, {"defaults": {"user": {"day": {"tokens": 100}}}},
                          provider_options={"chat_max_tokens_field": "max_tokens"})
    exact_prompts(h)
    await h.client().chat.completions.create(model="gpt-4o", messages=MSGS)
    sent = h.fake.seen[0].body
    assert "max_completion_tokens" not in sent and sent["max_tokens"] == 100 - h.tokens.chat_prompt(CHAT, "gpt-4o")
    assert (await day(h, Scope("user", "app"))).used == 100
