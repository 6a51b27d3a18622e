"""The store interface itself, on every store: what the ledger relies on beyond the ledger tests."""

from __future__ import annotations

import time

from proxy.stores import Counter, Status

NOW_MS = int(time.time() * 1000) + 86_400_000          # keys must not expire during the test


def counters(*limits: tuple[int, int]) -> list[Counter]:
    return [Counter(f"{{bp}}:c:test:{i}", tl, dl, NOW_MS + 3_600_000) for i, (tl, dl) in enumerate(limits)]


async def test_admitted_reserve_reports_what_it_read_on_limited_counters(store):
    cs = counters((100, -1), (-1, -1), (-1, 500))
    assert (await store.reserve("a", cs, 10, 50, NOW_MS, False)).status is Status.ADMITTED
    out = await store.reserve("b", cs, 20, 60, NOW_MS, False)
    assert out.status is Status.ADMITTED
    assert out.seen == ((0, 0, 10, 0, 50), (2, 0, 10, 0, 50))       # unlimited counter 1 not read


async def test_duplicate_id_writes_nothing(store):
    cs = counters((100, -1))
    await store.reserve("a", cs, 10, 0, NOW_MS, False)
    assert (await store.reserve("a", cs, 10, 0, NOW_MS, False)).status is Status.DUPLICATE
    assert await store.snapshot([cs[0].key]) == [(0, 10, 0, 0)]


async def test_refusal_names_the_first_counter_over_and_its_values(store):
    cs = counters((100, -1), (5, -1), (1, -1))
    out = await store.reserve("a", cs, 10, 0, NOW_MS, False)
    assert (out.status, out.index, out.used_tokens, out.reserved_tokens) == (Status.REFUSED, 1, 0, 0)
    assert await store.snapshot([c.key for c in cs]) == [(0, 0, 0, 0)] * 3


async def test_settle_of_a_lost_record_still_records_the_usage(store):
    # After a store restart the record is gone but the request really ran.
    cs = counters((100, -1))
    assert await store.settle("never-seen", cs, 7, 70)
    assert await store.snapshot([cs[0].key]) == [(7, 0, 70, 0)]
    assert not await store.settle("never-seen", cs, 7, 70)           # and only once


async def test_expired_lists_only_open_leases_past_their_deadline(store):
    cs = counters((100, -1))
    await store.reserve("due", cs, 1, 0, NOW_MS - 10, False)
    await store.reserve("later", cs, 1, 0, NOW_MS + 10_000, False)
    await store.reserve("settled", cs, 1, 0, NOW_MS - 10, False)
    await store.settle("settled", cs, 0, 0)
    due = await store.expired(NOW_MS, 100)
    assert [(rid, [c.key for c in found]) for rid, found in due] == [("due", [cs[0].key])]
    assert not await store.settle("due", cs, -1, -1, NOW_MS - 20)    # not yet due at that instant
    assert await store.settle("due", cs, -1, -1, NOW_MS)             # charged what it reserved
    assert await store.snapshot([cs[0].key]) == [(1, 1, 0, 0)]       # "later" still holds 1
