"""Several OS processes, each with its own connection pool, race for one Redis budget."""

from __future__ import annotations

import asyncio
import multiprocessing

import pytest

from proxy.ledger import Amounts, Ledger, Reservation
from proxy.stores import open_store

from .ledgers import SCOPES, Clock, make_policy, tomorrow_at

LIMIT, AMOUNT, PROCESSES, TASKS = 500, 3, 4, 150


async def _race(url: str, worker: int, now: float) -> int:
    store = open_store(url)
    ledger = Ledger(store, make_policy(defaults={"global": {"hour": {"tokens": LIMIT}}}), clock=Clock(now))
    results = await asyncio.gather(*(ledger.reserve(f"p{worker}-{i}", Amounts(AMOUNT, 1), SCOPES)
                                     for i in range(TASKS)))
    await store.close()
    return sum(isinstance(r, Reservation) for r in results)


def _worker(url: str, worker: int, now: float, start, out) -> None:
    start.wait()
    out.put(asyncio.run(_race(url, worker, now)))


@pytest.fixture(params=["redis", "cluster"])
def shared_url(request):
    return request.getfixturevalue(f"{request.param}_url")


async def test_processes_sharing_redis_admit_exactly_what_fits(shared_url):
    redis_url = shared_url
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    now = tomorrow_at(12)
    procs = [ctx.Process(target=_worker, args=(redis_url, w, now, start, out)) for w in range(PROCESSES)]
    for p in procs:
        p.start()
    await asyncio.sleep(1.0)          # let every process import and connect before the gun
    start.set()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(timeout=30)
    assert PROCESSES * TASKS * AMOUNT > LIMIT            # the race is real: demand exceeds supply
    assert admitted == LIMIT // AMOUNT
    store = open_store(redis_url)
    ledger = Ledger(store, make_policy(defaults={"global": {"hour": {"tokens": LIMIT}}}), clock=Clock(now))
    g = next(b for b in await ledger.snapshot(SCOPES)
             if b.scope.type == "global" and b.window == "hour" and b.unit == "tokens")
    assert g.reserved == AMOUNT * (LIMIT // AMOUNT)
    await store.close()
