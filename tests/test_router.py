from __future__ import annotations

from proxy.ledger import Amounts, Balance, Scope
from proxy.router import BalanceCache, Candidate, order

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
