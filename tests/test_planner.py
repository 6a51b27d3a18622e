from __future__ import annotations

import json

from proxy.auth import Caller
from proxy.body import parse as parse_call
from proxy.config import Model
from proxy.ledger import Amounts, Balance, Scope
from proxy.planner import BalanceCache, Candidate, default_completion, needs_balances, order, plan, scopes_for
from proxy.policy import parse as parse_policy

ORG = Scope("org", "acme")
BIG = Scope("model", "big")
SMALL = Scope("model", "small")


def cand(name: str, usd: int) -> Candidate:
    return Candidate(name, Amounts(10, usd), (ORG, Scope("model", name)))


def org_usd(limit: int, used: int, reserved: int = 0) -> Balance:
    return Balance(ORG, "day", "usd", limit, used, reserved, limit - used - reserved, 0.0)


def test_first_candidate_that_keeps_the_threshold_wins():
    big, small = cand("big", 300), cand("small", 30)
    assert [c.model for c in order([big, small], [org_usd(1000, 0)], 0.2)] == ["big", "small"]
    # big would leave 1000-600-300 = 100 (10 %) < 20 %: small first, big is not a fallback after it
    assert [c.model for c in order([big, small], [org_usd(1000, 600)], 0.2)] == ["small"]


def test_when_none_keeps_the_threshold_the_cheapest_that_fits_and_only_it():
    # Money is running out: the last of a budget must not go to the expensive model.
    big, small = cand("big", 300), cand("small", 30)
    assert [c.model for c in order([big, small], [org_usd(1000, 690)], 0.9)] == ["small"]
    assert [c.model for c in order([small, big], [org_usd(1000, 690)], 0.9)] == ["small"]


def test_nothing_fits():
    assert order([cand("big", 300), cand("small", 30)], [org_usd(1000, 980)], 0.2) == []


def test_a_model_scope_limit_only_affects_that_model():
    big, small = cand("big", 300), cand("small", 30)
    tight = Balance(BIG, "minute", "tokens", 15, 10, 0, 5, 0.0)
    assert [c.model for c in order([big, small], [tight], 0.2)] == ["small"]


def test_balance_cache_expires_and_needs_every_scope():
    cache = BalanceCache()
    b = org_usd(1000, 10)
    cache.put([ORG, BIG], [b], now=100.0)
    assert cache.get([ORG, BIG], 100.5) == [b]
    assert cache.get([ORG, BIG, SMALL], 100.5) is None           # SMALL never seen
    assert cache.get([ORG], 101.5) is None                       # stale after a second


# --- plan: the whole decision, from a parsed call to ordered candidates ------------------------

GPT4O = Model("gpt-4o", "openai", "gpt-4o", 2.5, 10.0, ("gpt-4o-mini",))
MINI = Model("gpt-4o-mini", "openai", "gpt-4o-mini", 0.15, 0.6, ())
WHO = Caller("acme", "bob", "app")
NOW = 1_800_000_000.0
POLICY = parse_policy({"version": 1, "router": {"downgrade_below": 0.2},
                       "reservation": {"default_max_tokens": 1000}}, "p")


def chat(**over):
    return parse_call(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                  **over}).encode(), "chat")


def test_plan_reserves_the_prompt_and_the_asked_completion_times_n():
    [c] = plan(chat(max_tokens=50, n=2), WHO, [GPT4O], 10, POLICY, [], NOW).candidates
    assert c.amounts == Amounts(110, GPT4O.cost(10, 100)) and c.cap is None
    assert c.scopes == scopes_for(WHO, GPT4O) == (Scope("global", "*"), Scope("org", "acme"),
                                                   Scope("user", "bob"), Scope("provider", "openai"),
                                                   Scope("model", "gpt-4o"))


def test_where_nothing_limits_a_call_its_completion_is_not_capped():
    [c] = plan(chat(), WHO, [GPT4O], 10, POLICY, [], NOW).candidates
    assert c.cap is None and c.amounts.tokens == 10 + 1000


def test_a_defaulted_completion_is_capped_by_the_tightest_scope_and_the_cap_is_kept():
    org = Balance(Scope("org", "acme"), "day", "tokens", 500, 100, 50, 350, 0.0)
    assert default_completion(GPT4O, scopes_for(WHO, GPT4O), [org], 10, 1000, 1) == (340, org)
    assert default_completion(GPT4O, scopes_for(WHO, GPT4O), [org], 10, 1000, 2) == (170, org)
    [c] = plan(chat(), WHO, [GPT4O], 10, POLICY, [org], NOW).candidates
    assert c.cap == 340 and c.amounts.tokens == 350


def test_a_dollar_limit_caps_the_completion_at_what_its_output_price_leaves():
    usd = Balance(Scope("user", "bob"), "day", "usd", 1_000, 0, 0, 1_000, 0.0)     # $0.001
    [c] = plan(chat(), WHO, [GPT4O], 10, POLICY, [usd], NOW).candidates
    assert c.cap == (1_000 - GPT4O.cost(10, 0)) // 10 and c.amounts.usd <= 1_000


def test_less_than_the_minimum_completion_left_is_a_refusal_naming_the_scope():
    org = Balance(Scope("org", "acme"), "day", "tokens", 500, 480, 0, 20, NOW + 3600)
    p = plan(chat(), WHO, [GPT4O, MINI], 10, POLICY, [org], NOW)
    assert p.candidates == [] and p.short is not None
    assert (p.short.scope, p.short.window, p.short.unit, p.short.limit) == (Scope("org", "acme"), "day", "tokens", 500)
    assert p.short.requested == 10 + POLICY.min_completion_tokens and p.short.reset_in == 3600
    shadow = parse_policy({"version": 1, "shadow": True}, "p")          # refuses nothing: reserves the minimum
    [c, _] = plan(chat(), WHO, [GPT4O, MINI], 10, shadow, [org], NOW).candidates
    assert c.cap == shadow.min_completion_tokens


def test_plan_downgrades_when_the_preferred_model_would_cross_the_threshold():
    org = Balance(Scope("org", "acme"), "day", "usd", 12_000, 0, 0, 12_000, 0.0)
    names = [c.model for c in plan(chat(max_tokens=1000), WHO, [GPT4O, MINI], 10, POLICY, [org], NOW).candidates]
    assert names == ["gpt-4o-mini"]
    roomy = org._replace(limit=1_000_000, remaining=1_000_000)
    assert [c.model for c in plan(chat(max_tokens=1000), WHO, [GPT4O, MINI], 10, POLICY, [roomy], NOW).candidates] \
        == ["gpt-4o", "gpt-4o-mini"]


def test_when_the_snapshot_says_nothing_fits_the_store_is_still_asked_cheapest_first():
    org = Balance(Scope("org", "acme"), "day", "usd", 1_000, 999, 0, 1, 0.0)
    names = [c.model for c in plan(chat(max_tokens=1000), WHO, [GPT4O, MINI], 10, POLICY, [org], NOW).candidates]
    assert names == ["gpt-4o-mini", "gpt-4o"]


def test_balances_are_needed_only_to_choose_or_to_cap():
    assert not needs_balances(chat(max_tokens=5), [GPT4O])
    assert needs_balances(chat(), [GPT4O])
    assert needs_balances(chat(max_tokens=5), [GPT4O, MINI])


def test_balance_cache_answers_with_the_latest_put_of_each_scope():
    cache = BalanceCache()
    old, new = org_usd(1000, 10), org_usd(1000, 20)
    big = Balance(BIG, "day", "tokens", 100, 1, 0, 99, 0.0)
    cache.put((ORG, BIG), [old, big], now=100.0)
    cache.put([ORG, SMALL], [new], now=100.1)          # ORG seen again, through another set of scopes
    cache.put((ORG, BIG), [old, big], now=100.05)      # an older reading put last wins, as it was put last
    assert cache.get([ORG, BIG], 100.5) == [old, big]
    cache.put([ORG, SMALL], [new], now=100.2)
    assert cache.get([ORG], 100.5) == [new] and cache.get([SMALL], 100.5) == []
    assert cache.get([ORG], 101.1) == [new] and cache.get([BIG], 101.1) is None
    cache.put([ORG], [old], now=100.3, policy=object())  # a new policy voids what was put before it
    assert cache.get([SMALL], 100.5, cache._policy) is None
