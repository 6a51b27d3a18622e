"""The Redis store's own round trip (`_Coalescer._round_trip`): several script calls written at
once on one pooled connection, every reply read back in order. A reply must always reach the
call it answers: after an error reply, and after callers that went away mid-call."""

from __future__ import annotations

import asyncio
import random

from proxy.errors import StoreUnavailable
from proxy.stores import Counter, Status, open_store

from .batches import EXPIRE, FILLER_DEADLINE, LIMITED, NOW_MS

BAD = [Counter("{bp}:w:bad-rt", "org:a", 100, -1, EXPIRE)]                           # a string key


async def test_an_error_reply_in_a_round_trip_stays_with_its_call(redis_url):
    store = open_store(redis_url)
    await store._r.set("{bp}:w:bad-rt", "not a hash")
    store._calls.MAX_IN_FLIGHT, store._calls.MAX_BATCH = 1, 1     # each queued call: its own EVALSHA
    filler = asyncio.ensure_future(store.reserve("rt-filler", LIMITED, 1, 1, FILLER_DEADLINE, False))
    await asyncio.sleep(0)
    out = await asyncio.gather(store.reserve("rt-a", LIMITED, 10, 1, NOW_MS, False),
                               store.reserve("rt-b", BAD, 10, 1, NOW_MS, False),
                               store.reserve("rt-c", LIMITED, 20, 1, NOW_MS, False),
                               return_exceptions=True)
    await filler
    assert out[0].status is Status.ADMITTED and out[2].status is Status.ADMITTED
    assert isinstance(out[1], StoreUnavailable) and "WRONGTYPE" in str(out[1].__cause__)
    assert out[2].seen[0].totals.tokens_reserved == 1 + 10          # the filler and a, before c
    await store.close()


async def test_callers_that_go_away_mid_call_leave_every_connection_in_step(redis_url):
    store = open_store(redis_url)
    rng = random.Random(7)
    storm = [Counter("{bp}:w:storm", "s", -1, -1, EXPIRE)]
    for _ in range(5):
        calls = [asyncio.ensure_future(store.reserve(f"storm-{rng.random()}", storm, 1, 1, NOW_MS, False))
                 for _ in range(40)]
        for _ in range(rng.randrange(1, 6)):
            await asyncio.sleep(0)
        for c in calls:
            if rng.random() < 0.5:
                c.cancel()
        await asyncio.gather(*calls, return_exceptions=True)
    # Each check reads its own counter, set beforehand to i: a reply that went to the wrong call
    # (a connection left with an unread reply) would show another's figure.
    own = [[Counter(f"{{bp}}:w:own{i}", "o", 10**6, -1, EXPIRE)] for i in range(40)]
    for i, counters in enumerate(own):
        assert (await store.reserve(f"set-{i}", counters, i, 0, NOW_MS, False)).status is Status.ADMITTED
    out = await asyncio.gather(*(store.reserve(f"check-{i}", c, 1, 0, NOW_MS, False) for i, c in enumerate(own)))
    assert [o.seen[0].totals.tokens_reserved for o in out] == list(range(40))
    await store.close()
