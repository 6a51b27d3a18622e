"""Callers cancelled at random points (queued in the coalescer, in flight, between reserve and
settle) on every store: nothing stays reserved once the ledger's undos ran and the abandoned
leases expired, and the settlement log accounts for every counter (audit drift 0)."""

from __future__ import annotations

import asyncio
import random

import pytest

from proxy.ledger import Amounts, Reservation, TokenCounts
from proxy.stores import open_store
from proxy.tasks import Tasks

from ..ledgers import INFO, SCOPES, Clock, ledger_for, tomorrow_at


@pytest.mark.parametrize("seed", range(6))
async def test_callers_cancelled_at_random_points_leave_exact_counters_and_log(store_url, seed):
    rng = random.Random(seed)
    tasks = Tasks()
    store = open_store(store_url, tasks=tasks)
    ledger = ledger_for(store, Clock(tomorrow_at(12)), defaults={"org": {"day": {"tokens": 5000}}})
    ledger.tasks = tasks
    answered: set[str] = set()          # admitted, and the caller knew it, but not settled (yet)

    async def one(i: int) -> None:
        for _ in range(rng.randint(0, 3)):
            await asyncio.sleep(0)
        res = await ledger.reserve(f"s{seed}-{i}", Amounts(rng.randint(1, 200), 1), SCOPES, INFO)
        if isinstance(res, Reservation):
            answered.add(res.id)
            for _ in range(rng.randint(0, 3)):
                await asyncio.sleep(0)
            if rng.random() < 0.3:
                await ledger.release(res, "released")
            else:
                await ledger.commit(res, Amounts(rng.randint(0, 200), 1), TokenCounts(1, 0, 1, 0))
            answered.discard(res.id)

    jobs = [asyncio.ensure_future(one(i)) for i in range(300)]
    for _ in range(40):
        await asyncio.sleep(0)
        for j in rng.sample(jobs, 3):
            j.cancel()
    out = await asyncio.gather(*jobs, return_exceptions=True)
    assert not [o for o in out if o is not None and not isinstance(o, asyncio.CancelledError)]
    for _ in range(500):
        if not len(tasks) and not len(ledger.tasks):
            break
        await asyncio.sleep(0.01)
    counters = ledger.counters(SCOPES)
    # Only a caller cancelled after its reserve answered (before its settle went) leaves a lease;
    # one cancelled while its reserve waited or was out is undone by the ledger. Expire the rest
    # as the sweeper would.
    left = await store.expired(2 ** 62, 10_000)
    assert {rid for rid, _ in left} <= answered
    for rid, cs in left:
        await store.expire(rid, cs, False, 2 ** 62)
    snap = await store.snapshot(counters)
    assert [c.tokens_reserved for c in snap] == [0] * len(counters)
    assert [d for d in await ledger.audit() if d.tokens or d.usd] == []
    await store.close()
