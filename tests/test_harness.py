"""The e2e harness's end-of-test check must see budget left reserved (else it proves nothing)."""

from __future__ import annotations

from proxy.ledger import Amounts, Scope

from . import harness


async def test_reserved_anywhere_reports_an_open_reservation_and_its_scopes(store_url, tokens):
    h = await harness.start(store_url, {"defaults": {"user": {"minute": {"tokens": 1000}}}}, tokens)
    try:
        ledger = h.gateway.ledger
        res = await ledger.reserve("left-open", Amounts(10, 20), (Scope("global", "*"), Scope("user", "bob")))
        held = await h.reserved_anywhere()
        assert "reservation left-open" in held
        assert {line.split(" reserved")[0] for line in held[1:]} == {
            "minute user:bob", "day global:*", "day user:bob", "month global:*", "month user:bob"}
        await ledger.release(res)
        assert await h.reserved_anywhere() == []
    finally:
        await harness.stop(h)
