"""The Redis store's batches: calls that wait while others are out run as ONE batch.lua call.

Every sub-call must do exactly what the same call alone does, run in the same order: the main
test runs one mixed sequence both ways, on a real redis-server, and compares every reply and
every key. The rest pin what a batch must keep: the expiry of new window hashes, errors that stay
with their call, NOSCRIPT, a lost connection, the audit, and what a batch costs in commands.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest
import redis as redis_sync

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts, Reservation, Scope
from proxy.stores import Counter, Status, open_store
from proxy.stores.base import Note

from ..ledgers import INFO, SCOPES, Clock, ledger_for, tomorrow_at

NOW_MS = int(time.time() * 1000) + 86_400_000          # keys must not expire during the test
EXPIRE = NOW_MS + 3_600_000
DUE = NOW_MS - 5_000                                   # a lease deadline that has passed at NOW_MS
LIMITED = [Counter("{bp}:w:day", "org:a", 100, -1, EXPIRE), Counter("{bp}:w:day", "user:u", -1, 1000, EXPIRE),
           Counter("{bp}:w:month", "org:a", 150, -1, EXPIRE + 1)]
OTHER = [Counter("{bp}:w:day", "user:v", 40, -1, EXPIRE)]
GONE_AT = int(time.time() * 1000) - 60_000            # an expiry already past: PEXPIREAT deletes
PAST = [Counter("{bp}:w:old", "org:a", -1, -1, GONE_AT)]
OLD_RESERVE = [Counter("{bp}:w:old", "org:a", 1000, -1, GONE_AT)]
BAD = [Counter("{bp}:w:bad", "org:a", 100, -1, EXPIRE)]                               # a string key
_fillers = itertools.count()
FILLER_DEADLINE = NOW_MS + 12_345


async def in_one_batch(store, calls):
    """Run the coroutine functions `calls` as one batch: a first, unrelated call takes the only
    in-flight slot, so the others queue (in order) and go out together when it answers. Each
    result is the call's return value or the exception it raised."""
    store._calls.MAX_IN_FLIGHT = 1
    before = store._calls.batched
    filler = store.reserve(f"filler{next(_fillers)}", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0,
                           FILLER_DEADLINE, False)
    out = await asyncio.gather(filler, *(c() for c in calls), return_exceptions=True)
    assert store._calls.batched - before == len(calls), "the calls did not run as one batch"
    return out[1:]


async def one_by_one(store, calls):
    out = []
    for c in calls:
        try:
            out.append(await c())
        except Exception as exc:                # noqa: BLE001 - compared with the batch's
            out.append(exc)
    return out


async def setup(store):
    """State the mixed sequence starts from: open reservations, one due for expiry, one the
    sweeper already charged (a late commit corrects it), a window key of the wrong type."""
    assert (await store.reserve("open-a", LIMITED, 30, 100, NOW_MS, False)).status is Status.ADMITTED
    assert (await store.reserve("open-b", LIMITED, 20, 100, NOW_MS, False)).status is Status.ADMITTED
    assert (await store.reserve("due", LIMITED, 10, 50, DUE, False)).status is Status.ADMITTED
    assert (await store.reserve("swept", LIMITED, 5, 10, DUE, False)).status is Status.ADMITTED
    assert await store.expire("swept", LIMITED, True, NOW_MS)
    await store._r.set("{bp}:w:bad", "not a hash")


def mixed(store):
    """Reserves and settles of every kind, in an order where later calls depend on earlier ones."""
    s = store
    return [
        lambda: s.reserve("r1", LIMITED, 20, 100, NOW_MS, False),            # admitted
        lambda: s.reserve("r2", LIMITED, 15, 100, NOW_MS, False),            # takes the last of org:a's day
        lambda: s.reserve("r3", LIMITED, 1, 1, NOW_MS, False),               # refused: nothing left
        lambda: s.reserve("r1", LIMITED, 20, 100, NOW_MS, False),            # duplicate id, same batch
        lambda: s.reserve("bad", [*BAD, *LIMITED], 1, 1, NOW_MS, False),     # raises: wrong type
        lambda: s.commit("open-a", LIMITED, 25, 90, Note("ok", "1 2 3 4", "12")),   # frees 5 tokens
        lambda: s.reserve("r4", LIMITED, 5, 10, NOW_MS, False),              # fits again
        lambda: s.reserve("r5", LIMITED, 50, 10, NOW_MS, True),              # over, forced
        lambda: s.release("open-b", LIMITED, Note("upstream_error")),
        lambda: s.commit("never-seen", LIMITED, 7, 70),                      # lost record: charged
        lambda: s.expire("due", LIMITED, True, NOW_MS),                        # the sweeper
        lambda: s.commit("swept", LIMITED, 8, 12),                           # late: corrected
        lambda: s.commit("open-a", LIMITED, 25, 90),                         # already settled
        lambda: s.commit("bad-settle", BAD, 1, 1),                           # raises after its SET
        lambda: s.reserve("v1", OTHER, 40, 0, NOW_MS, False),                # a new field, same hash
        lambda: s.reserve("v2", OTHER, 1, 0, NOW_MS, False),                 # refused by v1
        lambda: s.commit("old-lost", PAST, 3, 3),                            # writes, PEXPIREAT past: gone
        lambda: s.reserve("old", OLD_RESERVE, 1, 1, NOW_MS, False),          # sees the hash gone
        lambda: s.commit("old-lost-2", PAST, 4, 4),                          # and again
    ]


def dump(client) -> dict:
    """Every key: its value (stream entries without their ids) and its expiry (absolute for
    PEXPIREAT/PXAT keys, only whether one is set for a relative PX)."""
    out = {}
    for key in sorted(client.keys("*")):
        kind = client.type(key)
        if kind == b"hash":
            value = client.hgetall(key)
        elif kind == b"string":
            value = client.get(key)
        elif kind == b"zset":
            value = client.zrange(key, 0, -1, withscores=True)
        elif kind == b"stream":
            value = [fields for _, fields in client.xrange(key)]
        else:
            value = kind
        at = client.pexpiretime(key)
        relative = key.startswith(b"{bp}:r:") and value == b"c"       # SET ... PX: when it ran
        out[key] = (value, at > 0 if relative else at)
    return out


def outcome(x):
    return type(x).__name__ if isinstance(x, BaseException) else x


async def test_a_batch_does_exactly_what_the_same_calls_do_one_by_one(redis_server, redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    await setup(store)
    alone = await one_by_one(store, mixed(store))
    state_alone = dump(client)
    await store.close()

    redis_server.command("FLUSHALL")
    store = open_store(redis_url)
    await setup(store)
    batched = await in_one_batch(store, mixed(store))
    client.delete("{bp}:w:filler", *client.keys("{bp}:r:filler*"))
    client.zremrangebyscore("{bp}:leases", FILLER_DEADLINE, FILLER_DEADLINE)
    state_batched = dump(client)
    await store.close()

    assert [outcome(x) for x in batched] == [outcome(x) for x in alone]
    assert state_batched == state_alone
    # What the sequence is there to exercise, checked on the batch's replies:
    st = [getattr(x, "status", x) for x in batched]
    assert st[:4] == [Status.ADMITTED, Status.ADMITTED, Status.REFUSED, Status.DUPLICATE]
    assert batched[2].over.index == 0 and sum(batched[2].over.totals[:2]) == 100     # r2 took the last
    assert isinstance(batched[4], StoreUnavailable) and isinstance(batched[13], StoreUnavailable)
    assert st[6:8] == [Status.ADMITTED, Status.FORCED]
    assert batched[8:13] == [True, True, True, True, False]
    assert (st[14], st[15]) == (Status.ADMITTED, Status.REFUSED)
    assert batched[17].seen == ((0, (0, 0, 0, 0)),)           # not old-lost's 3: the hash was gone
    assert b"{bp}:w:old" not in state_batched


async def test_new_window_hashes_written_in_a_batch_get_their_expiry(redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    new = [Counter("{bp}:w:new1", "org:a", 100, -1, EXPIRE), Counter("{bp}:w:new2", "org:a", -1, -1, EXPIRE + 7)]
    out = await in_one_batch(store, [lambda i=i: store.reserve(f"n{i}", new, 1, 1, NOW_MS, False) for i in range(5)])
    assert [o.status for o in out] == [Status.ADMITTED] * 5
    assert client.pexpiretime("{bp}:w:new1") == EXPIRE and client.pexpiretime("{bp}:w:new2") == EXPIRE + 7
    assert await store.snapshot(new) == [(0, 5, 0, 5)] * 2
    await store.close()


async def test_an_error_in_one_call_stays_with_its_caller(redis_url):
    store = open_store(redis_url)
    await store._r.set("{bp}:w:bad", "not a hash")
    out = await in_one_batch(store, [
        lambda: store.reserve("a", LIMITED, 10, 1, NOW_MS, False),
        lambda: store.reserve("b", [*LIMITED, *BAD], 10, 1, NOW_MS, False),
        lambda: store.reserve("c", LIMITED, 10, 1, NOW_MS, False),
        lambda: store.commit("a", LIMITED, 4, 1)])
    assert out[0].status is Status.ADMITTED and out[2].status is Status.ADMITTED and out[3] is True
    assert isinstance(out[1], StoreUnavailable) and "WRONGTYPE" in str(out[1].__cause__)
    # b wrote nothing (it failed on its reads); a and c did, and a's commit moved its amounts.
    assert await store.snapshot(LIMITED[:1]) == [(4, 10, 1, 1)]
    assert not await store._r.exists("{bp}:r:b")
    assert [e.id for e in await store.settlements(None, None, 10)] == ["a"]
    await store.close()


async def test_a_batch_survives_script_flush(redis_server, redis_url):
    store = open_store(redis_url)
    await in_one_batch(store, [lambda: store.reserve("warm", LIMITED, 1, 1, NOW_MS, False)] * 2)
    redis_server.command("SCRIPT", "FLUSH")
    out = await in_one_batch(store, [lambda i=i: store.reserve(f"s{i}", LIMITED, 10, 1, NOW_MS, False)
                                     for i in range(3)])
    assert [o.status for o in out] == [Status.ADMITTED] * 3
    assert await store.snapshot(LIMITED[:1]) == [(0, 31, 0, 4)]    # warm once (its repeat: a duplicate), 3 x 10
    await store.close()


async def test_a_lost_connection_fails_every_call_of_the_batch(redis_server, redis_url):
    store = open_store(redis_url)
    await store.reserve("warm", LIMITED, 1, 1, NOW_MS, False)
    redis_server.stop()
    try:
        store._calls.MAX_IN_FLIGHT = 1
        out = await asyncio.gather(*(store.reserve(f"x{i}", LIMITED, 1, 1, NOW_MS, False) for i in range(5)),
                                   return_exceptions=True)
        assert all(isinstance(o, StoreUnavailable) for o in out), out
    finally:
        redis_server.start()
    assert (await store.reserve("after", LIMITED, 1, 1, NOW_MS, False)).status is Status.ADMITTED
    await store.close()


async def test_counters_and_log_agree_after_a_concurrent_batched_workload(redis_server, redis_url):
    store = open_store(redis_url)
    clock = Clock(tomorrow_at(12))
    ledger = ledger_for(store, clock, defaults={"org": {"day": {"tokens": 30_000}}, "user": {"minute": {"usd": 10 ** 7}}})
    calls_before = store._calls.batched

    async def request(i: int):
        scopes = (*SCOPES[:2], Scope("user", f"u{i % 7}"), *SCOPES[3:])
        res = await ledger.reserve(f"q{i}", Amounts(100 + i, 1000 + i), scopes, INFO)
        if not isinstance(res, Reservation):
            return
        if i % 9 == 0:
            await ledger.release(res, "upstream_error")
        else:
            await ledger.commit(res, Amounts(60 + i, 700 + i))

    await asyncio.gather(*(request(i) for i in range(300)))
    assert store._calls.batched - calls_before > 100, "the workload did not form batches"
    for window in ("minute", "day"):
        drift = await ledger.audit(window)
        assert drift and all(d.tokens == 0 and d.usd == 0 for d in drift), drift
    day = {(d.scope_type, d.scope_id): d for d in await ledger.audit("day")}
    org = day["org", "acme"].counter
    assert org.tokens_reserved == 0 and 0 < org.tokens_used <= 30_000
    await store.close()


def _commands(server) -> dict[str, int]:
    out = {}
    for line in server.command("INFO", "commandstats").decode().split("\r\n"):
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            out[name[8:]] = int(rest.split("calls=")[1].split(",")[0])
    return out


@pytest.mark.parametrize("n", [2, 10])
async def test_a_batch_reads_and_writes_each_window_hash_once(redis_server, redis_url, n):
    # docs/store.md "Per-request cost": a batch of n reserves is 1 EVALSHA, per window hash one
    # HMGET and one HSET, per call its record's SET, one ZADD for the lease index.
    store = open_store(redis_url)
    await in_one_batch(store, [lambda: store.reserve("warm", LIMITED, 1, 1, NOW_MS, False)] * 2)
    before = _commands(redis_server)
    await in_one_batch(store, [lambda i=i: store.reserve(f"c{i}", LIMITED, 1, 1, NOW_MS, False) for i in range(n)])
    after = _commands(redis_server)
    spent = {k: v - before.get(k, 0) for k, v in after.items() if v != before.get(k, 0) and k != "info"}
    # The filler is one single reserve.lua call on its own (unlimited) hash: EVALSHA, HMGET, SET, HSET, ZADD.
    assert spent == {"evalsha": 1 + 1, "hmget": 2 + 1, "hset": 2 + 1, "set": n + 1, "zadd": 1 + 1}
    await store.close()


async def test_a_long_queue_goes_as_several_batches_in_order(redis_url):
    store = open_store(redis_url)
    store._calls.MAX_BATCH = 3
    store._calls.MAX_IN_FLIGHT = 1
    limit = [Counter("{bp}:w:day", "org:z", 60, -1, EXPIRE)]
    filler = store.reserve("filler-long", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0, FILLER_DEADLINE, False)
    out = await asyncio.gather(filler, *(store.reserve(f"l{i}", limit, 10, 0, NOW_MS, False) for i in range(7)))
    # Two batches of 3, then the last call alone (its own script), in queue order: six fit exactly.
    assert [o.status for o in out[1:]] == [Status.ADMITTED] * 6 + [Status.REFUSED]
    assert store._calls.batched == 6
    await store.close()
