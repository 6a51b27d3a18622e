"""The store interface itself, on every store: what the ledger relies on beyond the ledger tests."""

from __future__ import annotations

import inspect
import time

import pytest

from proxy.stores import Counter, Status, open_store

NOW_MS = int(time.time() * 1000) + 86_400_000          # keys must not expire during the test


def counters(*limits: tuple[int, int]) -> list[Counter]:
    return [Counter("{bp}:w:test", f"test:{i}", tl, dl, NOW_MS + 3_600_000) for i, (tl, dl) in enumerate(limits)]


async def test_admitted_reserve_reports_what_it_read_on_limited_counters(store):
    cs = counters((100, -1), (-1, -1), (-1, 500))
    assert (await store.reserve("a", cs, 10, 50, NOW_MS, False)).status is Status.ADMITTED
    out = await store.reserve("b", cs, 20, 60, NOW_MS, False)
    assert out.status is Status.ADMITTED
    # unlimited counter 1 not read; each limited one in the unit it limits (the other may read 0)
    assert [(s.index, s.totals[:2]) for s in out.seen[:1]] == [(0, (0, 10))]
    assert [(s.index, s.totals[2:]) for s in out.seen[1:]] == [(2, (0, 50))]


async def test_a_counter_limited_in_both_units_reports_both(store):
    cs = counters((100, 500), (-1, 400))
    assert (await store.reserve("a", cs, 10, 50, NOW_MS, False)).status is Status.ADMITTED
    out = await store.reserve("b", cs, 20, 60, NOW_MS, False)
    assert out.status is Status.ADMITTED
    assert out.seen[0] == (0, (0, 10, 0, 50))
    assert (out.seen[1].index, out.seen[1].totals[2:]) == (1, (0, 50))


async def test_duplicate_id_writes_nothing(store):
    cs = counters((100, -1))
    await store.reserve("a", cs, 10, 0, NOW_MS, False)
    assert (await store.reserve("a", cs, 10, 0, NOW_MS, False)).status is Status.DUPLICATE
    assert await store.snapshot(cs[:1]) == [(0, 10, 0, 0)]


async def test_a_retried_reserve_is_a_duplicate_even_when_its_own_amount_fills_the_counter(store):
    # redis-py retries a call whose reply was lost: the counters now hold this id's reservation.
    cs = counters((10, -1))
    assert (await store.reserve("a", cs, 10, 0, NOW_MS, False)).status is Status.ADMITTED
    assert (await store.reserve("a", cs, 10, 0, NOW_MS, False)).status is Status.DUPLICATE
    assert await store.snapshot(cs) == [(0, 10, 0, 0)]


async def test_refusal_names_the_first_counter_over_and_its_values(store):
    cs = counters((100, -1), (5, -1), (1, -1))
    out = await store.reserve("a", cs, 10, 0, NOW_MS, False)
    assert (out.status, out.over.index, out.over.totals) == (Status.REFUSED, 1, (0, 0, 0, 0))
    assert await store.snapshot(cs) == [(0, 0, 0, 0)] * 3


async def test_a_forced_reserve_writes_and_reports_the_counter_over_and_what_it_read(store):
    # Shadow mode forces: written anyway, the first counter over named with its values, and the
    # limited counters' balances as read before it, as an admitted reserve reports them.
    cs = counters((100, -1), (15, -1), (-1, 500))
    assert (await store.reserve("a", cs, 10, 50, NOW_MS, False)).status is Status.ADMITTED
    out = await store.reserve("b", cs, 10, 60, NOW_MS, True)
    assert (out.status, out.over.index, out.over.totals[:2]) == (Status.FORCED, 1, (0, 10))
    assert [(s.index, s.totals[:2]) for s in out.seen[:2]] == [(0, (0, 10)), (1, (0, 10))]
    assert [(s.index, s.totals[2:]) for s in out.seen[2:]] == [(2, (0, 50))]
    assert await store.snapshot(cs) == [(0, 20, 0, 110)] * 3


async def test_the_log_keeps_the_request_info_exactly_through_commit_expiry_and_correction(store):
    # The info travels in the record (Redis: reserve.lua's record, read back by settle.lua), so
    # every settlement's entry holds it byte for byte, whitespace and escapes included.
    info = '["acme","al ice",null,"chat","m\\n","m","openai",0,"x\\"y"]  '
    cs = counters((100, -1))
    await store.reserve("c", cs, 5, 0, NOW_MS, False, info)
    assert await store.commit("c", cs, 4, 0)
    await store.reserve("x", cs, 5, 0, NOW_MS - 10, False, info)
    assert await store.expire("x", cs, True, NOW_MS)
    assert await store.commit("x", cs, 3, 0)                         # late: corrects the charge
    entries = await store.settlements(None, None, 10)
    assert [(e.id, e.outcome, e.info) for e in entries] == [
        ("x", "corrected", info), ("x", "expired", info), ("c", "ok", info)]


async def test_commit_of_a_lost_record_still_records_the_usage(store):
    # After a store restart the record is gone but the request really ran.
    cs = counters((100, -1))
    assert await store.commit("never-seen", cs, 7, 70)
    assert await store.snapshot(cs[:1]) == [(7, 0, 70, 0)]
    assert not await store.commit("never-seen", cs, 7, 70)           # and only once


async def test_expired_lists_only_open_leases_past_their_deadline(store):
    cs = counters((100, -1))
    await store.reserve("due", cs, 1, 0, NOW_MS - 10, False)
    await store.reserve("later", cs, 1, 0, NOW_MS + 10_000, False)
    await store.reserve("settled", cs, 1, 0, NOW_MS - 10, False)
    await store.release("settled", cs)
    due = await store.expired(NOW_MS, 100)
    assert [(e.id, [c[:2] for c in e.counters]) for e in due] == [("due", [cs[0][:2]])]
    assert not await store.expire("due", cs, True, NOW_MS - 20)      # not yet due at that instant
    assert await store.expire("due", cs, True, NOW_MS)               # charged what it reserved
    assert await store.snapshot(cs[:1]) == [(1, 1, 0, 0)]       # "later" still holds 1


async def test_release_after_expiry_refunds_the_sweepers_charge_once(store):
    cs = counters((100, -1))
    await store.reserve("slow", cs, 10, 5, NOW_MS - 10, False)
    assert await store.expire("slow", cs, True, NOW_MS)
    assert await store.snapshot(cs[:1]) == [(10, 0, 5, 0)]
    assert await store.release("slow", cs)                          # the live request gave up
    assert not await store.release("slow", cs)
    assert await store.snapshot(cs[:1]) == [(0, 0, 0, 0)]


async def test_every_redis_operation_fails_as_store_unavailable():
    # Nothing listens on this port: each public method must raise the one store error.
    from proxy.errors import StoreUnavailable
    from tests.redis_server import free_port
    store = open_store(f"redis://127.0.0.1:{free_port()}/0")
    cs = counters((1, -1))
    calls = {"reserve": lambda: store.reserve("a", cs, 1, 1, NOW_MS, False),
             "commit": lambda: store.commit("a", cs, 1, 1), "release": lambda: store.release("a", cs),
             "expire": lambda: store.expire("a", cs, True, NOW_MS), "extend": lambda: store.extend("a", NOW_MS),
             "expired": lambda: store.expired(NOW_MS, 10), "snapshot": lambda: store.snapshot(cs[:1]),
             "windows": lambda: store.windows(["{bp}:w:test"]), "settlements": lambda: store.settlements(None, None, 10),
             "claim": lambda: store.claim("x", NOW_MS), "log_trimmed_to": lambda: store.log_trimmed_to()}
    from proxy.stores.redis import RedisStore
    public = {n for n, f in vars(RedisStore).items() if not n.startswith("_") and inspect.iscoroutinefunction(f)}
    assert public - {"close"} == set(calls)
    for name, call in calls.items():
        with pytest.raises(StoreUnavailable, match=f"redis {name} failed"):
            await call()
    await store.close()
