"""Review finding (money/audit): the settlement log is capped (stores/base.py LOG_LENGTH,
100,000 entries, not configurable), and `audit` recomputes a window from whatever the log still
holds. Once the cap trims entries of the window being audited (a day of more than 100,000
requests; a month of more than ~3,300 a day), audit reports drift on every scope that spent,
and exits 1: a correct ledger flagged as wrong, and no way to tell it from a real drift. It
should say the log no longer reaches back to the window's start instead."""

from __future__ import annotations

import pytest

from proxy.ledger import Amounts
from proxy.stores.memory import MemoryStore

from .test_ledger import SCOPES, ledger_for


@pytest.mark.xfail(strict=True, reason="unfixed: audit does not notice a trimmed settlement log")
async def test_audit_refuses_a_window_whose_log_was_trimmed_rather_than_report_drift():
    ledger = ledger_for(MemoryStore(log_length=5))
    for i in range(10):
        res = await ledger.reserve(f"r{i}", Amounts(10, 100), SCOPES)
        assert await ledger.commit(res, Amounts(10, 100))
    with pytest.raises(ValueError, match="trimmed|reach"):
        drifts = await ledger.audit("day")
        assert not any(d.tokens or d.usd for d in drifts)     # a correct ledger is not reported as drifting
