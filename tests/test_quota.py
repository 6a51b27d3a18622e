"""The x-budget-* headers of an admitted request (proxy/quota.py)."""

from __future__ import annotations

from proxy.ledger import Balance, Scope
from proxy.quota import budget_headers

G, O, U = Scope("global", "*"), Scope("org", "acme"), Scope("user", "acme/bob smith")


def _b(scope: Scope, window: str, unit: str, limit: int, remaining: int) -> Balance:
    return Balance(scope, window, unit, limit, limit - remaining, 0, remaining, 0.0)


def test_least_remaining_per_unit_and_tightest_share_come_from_different_scopes():
    out = budget_headers("m", "m", (
        _b(U, "minute", "tokens", 1000, 900),     # most tokens left, but 90 %
        _b(O, "day", "tokens", 10_000, 800),      # fewer tokens left (8 %): the tightest share
        _b(U, "day", "usd", 2_000_000, 1_500_000),
        _b(O, "month", "usd", 100_000_000, 20_000_000)))
    assert out == {"x-budget-model": "m", "x-budget-remaining-tokens": "800",
                   "x-budget-remaining-usd": "1.500000", "x-budget-scope": "org:acme day tokens"}


def test_shared_scopes_are_never_shown():
    out = budget_headers("m", "m", (_b(G, "day", "usd", 10, 0), _b(U, "day", "usd", 10_000_000, 9_000_000)))
    assert out == {"x-budget-model": "m", "x-budget-remaining-usd": "9.000000",
                   "x-budget-scope": "user:acme/bob%20smith day usd"}
    assert budget_headers("m", "m", (_b(G, "day", "usd", 10, 0),)) == {"x-budget-model": "m"}


def test_first_of_equal_shares_is_named_and_a_zero_limit_counts_as_spent():
    even = (_b(O, "day", "tokens", 100, 50), _b(U, "day", "tokens", 200, 100))
    assert budget_headers("m", "m", even)["x-budget-scope"] == "org:acme day tokens"
    zero = (_b(O, "day", "tokens", 100, 1), _b(U, "hour", "usd", 0, 0))
    assert budget_headers("m", "m", zero)["x-budget-scope"] == "user:acme/bob%20smith hour usd"


def test_downgrade_and_no_balances():
    assert budget_headers("mini", "big", ()) == {"x-budget-model": "mini", "x-budget-downgraded-from": "big"}


def test_remaining_dollars_are_exact_at_any_size():
    # 123,456,789,012.345678 USD in micro-dollars: past 2**53, where a float's %.6f drifts.
    out = budget_headers("m", "m", (_b(O, "month", "usd", 10**18, 123_456_789_012_345_678),))
    assert out["x-budget-remaining-usd"] == "123456789012.345678"
