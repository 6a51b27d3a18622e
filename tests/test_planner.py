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


def test_when_none_keeps_the_threshold_the_first_that_fits():
    big, small = cand("big", 300), cand("small", 30)
    assert [c.model for c in order([big, small], [org_usd(1000, 690)], 0.9)] == ["big", "small"]


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
POLICY = parse_policy({"version": 1, "router": {"downgrade_below": 0.2},
                       "reservation": {"default_max_tokens": 1000}}, "p")


def chat(**over):
    return parse_call(json.dumps({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}],
                                  **over}).encode(), "chat")


def test_plan_reserves_the_prompt_and_the_asked_completion_times_n():
    [c] = plan(chat(max_tokens=50, n=2), WHO, [GPT4O], 10, POLICY, [])
    assert c.amounts == Amounts(110, GPT4O.cost(10, 100)) and c.default_cap is None
    assert c.scopes == scopes_for(WHO, GPT4O) == (Scope("global", "*"), Scope("org", "acme"),
                                                   Scope("user", "bob"), Scope("provider", "openai"),
                                                   Scope("model", "gpt-4o"))


def test_a_defaulted_completion_is_capped_by_the_tightest_scope():
    org = Balance(Scope("org", "acme"), "day", "tokens", 500, 100, 50, 350, 0.0)
    assert default_completion(GPT4O, scopes_for(WHO, GPT4O), [org], 10, 1000, 1) == 340
    assert default_completion(GPT4O, scopes_for(WHO, GPT4O), [org], 10, 1000, 2) == 170
    [c] = plan(chat(), WHO, [GPT4O], 10, POLICY, [org])
    assert c.default_cap == 340 and c.amounts.tokens == 350


def test_plan_downgrades_when_the_preferred_model_would_cross_the_threshold():
    org = Balance(Scope("org", "acme"), "day", "usd", 12_000, 0, 0, 12_000, 0.0)
    names = [c.model for c in plan(chat(max_tokens=1000), WHO, [GPT4O, MINI], 10, POLICY, [org])]
    assert names == ["gpt-4o-mini"]
    roomy = org._replace(limit=1_000_000, remaining=1_000_000)
    assert [c.model for c in plan(chat(max_tokens=1000), WHO, [GPT4O, MINI], 10, POLICY, [roomy])] == \
        ["gpt-4o", "gpt-4o-mini"]


def test_balances_are_needed_only_to_choose_or_to_cap():
    assert not needs_balances(chat(max_tokens=5), [GPT4O])
    assert needs_balances(chat(), [GPT4O])
    assert needs_balances(chat(max_tokens=5), [GPT4O, MINI])
