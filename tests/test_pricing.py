from __future__ import annotations

import pytest

from proxy import pricing
from proxy.pricing import Usage

# Claude Sonnet 4.5 list prices, USD per million tokens: input 3, 5-minute writes 3.75,
# 1-hour writes 6, cache reads 0.30, output 15.
SONNET = pricing.rates("anthropic", 3.0, 15.0, 0.30, 3.75, 6.0)
# gpt-4.1: input 2, cached 0.50, output 8; cache writes not priced by the config.
GPT41 = pricing.rates("openai", 2.0, 8.0, 0.50)

ANTHROPIC_EVERY_FIELD = {
    "input_tokens": 1237, "cache_read_input_tokens": 5003, "cache_creation_input_tokens": 3001,
    "cache_creation": {"ephemeral_5m_input_tokens": 2000, "ephemeral_1h_input_tokens": 1001},
    "output_tokens": 701, "output_tokens_details": {"thinking_tokens": 200},
    "service_tier": "standard",
}


def test_anthropic_usage_with_every_field_is_priced_exactly():
    u = pricing.from_anthropic(ANTHROPIC_EVERY_FIELD)
    assert u == Usage(input=1237, cached_input=5003, cache_write=2000, cache_write_1h=1001,
                      output=701, reasoning=200)
    # 1237*3 + 5003*0.30 + 2000*3.75 + 1001*6 + 701*15 = 3711 + 1500.9 + 7500 + 6006 + 10515
    # = 29232.9 micro-dollars, rounded up once.
    assert pricing.cost(u, SONNET) == 29233
    # The ledger's figures: input is everything sent (never 0), the writes counted once.
    assert (u.prompt_tokens, u.cached_tokens, u.completion_tokens, u.reasoning) == (9241, 5003, 701, 200)
    assert u.total_tokens == 9942


def test_anthropic_cache_writes_are_not_counted_twice():
    """The total and its 5m/1h split describe the same tokens: 3001 writes, not 6002."""
    u = pricing.from_anthropic(ANTHROPIC_EVERY_FIELD)
    assert u.cache_write + u.cache_write_1h == 3001
    only_total = {k: v for k, v in ANTHROPIC_EVERY_FIELD.items() if k != "cache_creation"}
    u = pricing.from_anthropic(only_total)
    assert (u.cache_write, u.cache_write_1h) == (3001, 0)          # unsplit writes: 5-minute
    # 3711 + 1500.9 + 3001*3.75 (11253.75) + 10515 = 26980.65, rounded up once
    assert pricing.cost(u, SONNET) == 26981


def test_anthropic_defaults_are_the_list_multipliers():
    r = pricing.rates("anthropic", 3.0, 15.0)
    assert r == SONNET
    haiku = pricing.rates("anthropic", 1.0, 5.0)
    assert haiku == pricing.Rates(1_000_000, 100_000, 1_250_000, 2_000_000, 5_000_000)


def test_anthropic_missing_fields_count_zero():
    assert pricing.from_anthropic({"input_tokens": 10, "output_tokens": 3}) == Usage(10, 0, 0, 0, 3, 0)
    assert pricing.from_anthropic({"output_tokens": 3}) == Usage(output=3)      # a message_delta alone
    u = pricing.from_anthropic({"input_tokens": 10, "cache_read_input_tokens": None,
                                "cache_creation": None, "output_tokens": "7"})
    assert u == Usage(input=10)
    assert pricing.from_anthropic({"foo": 1}) is None and pricing.from_anthropic(None) is None


def test_openai_chat_usage_prices_cached_tokens_and_records_reasoning():
    usage = {"prompt_tokens": 2006, "completion_tokens": 300, "total_tokens": 2306,
             "prompt_tokens_details": {"cached_tokens": 1024, "audio_tokens": 0},
             "completion_tokens_details": {"reasoning_tokens": 128, "audio_tokens": 0}}
    u = pricing.from_openai(usage)
    assert u == Usage(input=982, cached_input=1024, output=300, reasoning=128)
    # 982*2 + 1024*0.5 + 300*8 = 1964 + 512 + 2400
    assert pricing.cost(u, GPT41) == 4876
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (2006, 300, 2306)


def test_openai_cached_price_defaults_to_the_input_price():
    """A model without `cached_input_per_million` is charged cached tokens as input (errs high)."""
    plain = pricing.rates("openai", 2.0, 8.0)
    u = pricing.from_openai({"prompt_tokens": 2006, "completion_tokens": 300,
                             "prompt_tokens_details": {"cached_tokens": 1024}})
    assert pricing.cost(u, plain) == 2006 * 2 + 300 * 8


def test_openai_usage_missing_and_odd_fields():
    assert pricing.from_openai({"prompt_tokens": 5, "total_tokens": 5}) == Usage(input=5)   # embeddings
    assert pricing.from_openai({"prompt_tokens": 5, "completion_tokens": None,
                                "prompt_tokens_details": None, "completion_tokens_details": None}) == Usage(5)
    # cached above the prompt (a broken upstream) is clamped: never a negative row
    assert pricing.from_openai({"prompt_tokens": 5, "completion_tokens": 2,
                                "prompt_tokens_details": {"cached_tokens": 9},
                                "completion_tokens_details": {"reasoning_tokens": 4}}) \
        == Usage(input=0, cached_input=5, output=2, reasoning=2)
    assert pricing.from_openai({"input_tokens": 5}) is None and pricing.from_openai([]) is None
    assert pricing.from_openai({"prompt_tokens": True}) is None


RESPONSES_EVERY_FIELD = {
    "input_tokens": 5000, "output_tokens": 900, "total_tokens": 5900,
    "input_tokens_details": {"cached_tokens": 2048, "cache_write_tokens": 1500,
                             "cache_write_tokens_details": {"ttl_30m_tokens": 1000, "ttl_12h_tokens": 500}},
    "output_tokens_details": {"reasoning_tokens": 640},
}


def test_responses_usage_with_every_field_is_priced_exactly():
    u = pricing.from_responses(RESPONSES_EVERY_FIELD)
    assert u == Usage(input=1452, cached_input=2048, cache_write=1000, cache_write_1h=500,
                      output=900, reasoning=640)
    assert (u.prompt_tokens, u.cached_tokens, u.total_tokens) == (5000, 2048, 5900)
    # Writes unpriced by the config: at the input price. 1452*2 + 2048*0.5 + 1500*2 + 900*8
    assert pricing.cost(u, GPT41) == 2904 + 1024 + 3000 + 7200
    priced = pricing.rates("openai", 2.0, 8.0, 0.50, 2.5, 3.0)
    # ... and at cache_write_per_million / cache_write_1h_per_million where set.
    assert pricing.cost(u, priced) == 2904 + 1024 + 2500 + 1500 + 7200
    short_only = pricing.rates("openai", 2.0, 8.0, 0.50, 2.5)
    assert pricing.cost(u, short_only) == 2904 + 1024 + 3750 + 7200   # long writes as short


def test_responses_usage_missing_fields():
    assert pricing.from_responses({"input_tokens": 7, "output_tokens": 1}) == Usage(input=7, output=1)
    u = pricing.from_responses({"input_tokens": 7, "output_tokens": 1,
                                "input_tokens_details": {"cached_tokens": 3, "cache_write_tokens": 2}})
    assert u == Usage(input=2, cached_input=3, cache_write=2, output=1)
    assert pricing.from_responses({"prompt_tokens": 7}) is None


def test_cost_rounds_up_once_and_has_no_float_drift():
    r = pricing.rates("openai", 2.5, 10.0, 1.25)
    assert pricing.cost(Usage(input=1000), r) == 2500                  # not 2501
    assert pricing.cost(Usage(input=1), r) == 3
    nano = pricing.rates("openai", 0.10, 0.40, 0.025)
    # 3 cached tokens at 0.025 = 0.075 micro-dollars, plus 3 inputs at 0.1 = 0.3: one ceil of 0.375
    assert pricing.cost(Usage(input=3, cached_input=3), nano) == 1
    # 100 tokens at $0.07/M is 7 micro-dollars; in floats 100 * 0.07 == 7.000000000000001 (ceil 8)
    assert pricing.cost(Usage(input=100), pricing.rates("openai", 0.07, 0)) == 7
    assert pricing.cost(Usage(input=1000, output=1000), pricing.rates("openai", 0.29, 0.29)) == 580
    assert pricing.cost(Usage(), r) == 0


@pytest.mark.parametrize("usage", [Usage(1, 2, 3, 4, 5, 5), Usage(0, 0, 0, 0, 0, 0)])
def test_prompt_tokens_is_every_input_row(usage):
    assert usage.prompt_tokens == sum(usage[:4]) and usage.total_tokens == sum(usage[:5])


def test_estimate_is_all_uncached():
    assert pricing.estimate(10, 4) == Usage(input=10, output=4)


@pytest.mark.parametrize("prices", [(2.5, 10.0), (0.07, 0.0), (0.29, 0.29), (0.15, 0.6), (15.0, 75.0), (0, 0)])
def test_estimate_cost_is_the_cost_of_the_estimate(prices):
    r = pricing.rates("openai", *prices)
    for prompt, completion in [(0, 0), (1, 0), (0, 1), (3, 7), (100, 16), (1000, 1000), (123_457, 4_096),
                               (2 ** 50, 2 ** 40)]:
        assert pricing.estimate_cost(prompt, completion, r) == pricing.cost(pricing.estimate(prompt, completion), r)
