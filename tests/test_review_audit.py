"""Review finding (money/audit): the settlement log is capped (stores/base.py LOG_LENGTH,
100,000 entries, not configurable), and `audit` recomputes a window from whatever the log still
holds. Once the cap trims entries of the window being audited (a day of more than 100,000
requests; a month of more than ~3,300 a day), audit reports drift on every scope that spent,
and exits 1: a correct ledger flagged as wrong, and no way to tell it from a real drift. It
says the log no longer reaches back to the window's start instead (the CLI exits 2, not 1)."""

from __future__ import annotations

import time

import pytest

from proxy.errors import AuditIncomplete
from proxy.ledger import Amounts
from proxy.stores import open_store

from .ledgers import SCOPES, ledger_for


async def test_audit_refuses_a_window_whose_log_was_trimmed_rather_than_report_drift(store_url):
    # The real clock: log times are the store's (Redis: the server's), windows the ledger's.
    store = open_store(store_url, log_length=5)
    try:
        ledger = ledger_for(store, time.time)
        for i in range(300):          # Redis trims a stream by whole nodes (MAXLEN ~): write past one
            res = await ledger.reserve(f"r{i}", Amounts(10, 100), SCOPES)
            assert await ledger.commit(res, Amounts(10, 100))
        with pytest.raises(AuditIncomplete, match="no longer reaches back"):
            await ledger.audit("day")
        assert 0 < await store.log_trimmed_to() <= time.time() * 1000
    finally:
        await store.close()


async def test_an_untrimmed_log_audits_clean(store_url):
    store = open_store(store_url, log_length=1000)
    try:
        ledger = ledger_for(store, time.time)
        for i in range(20):
            res = await ledger.reserve(f"r{i}", Amounts(10, 100), SCOPES)
            assert await ledger.commit(res, Amounts(10, 100))
        assert await store.log_trimmed_to() == 0
        assert not any(d.tokens or d.usd for d in await ledger.audit("day"))
    finally:
        await store.close()
