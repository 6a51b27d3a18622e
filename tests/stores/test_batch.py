"""The Redis store's batches: calls that wait while others are out run as ONE batch.lua call.

Every sub-call must do exactly what the same call alone does, run in the same order: the main
test runs one mixed sequence both ways, on a real redis-server, and compares every reply and
every key. The rest pin what a batch must keep: the expiry of new window hashes, errors that stay
with their call, NOSCRIPT, a lost connection, the audit, and what a batch costs in commands.
"""

from __future__ import annotations

import asyncio
import random
import struct

import pytest
import redis as redis_sync
from redis.exceptions import ResponseError

from proxy.errors import StoreUnavailable
from proxy.ledger import Amounts, Reservation, Scope
from proxy.stores import Counter, Status, open_store
from proxy.stores.base import Note
from proxy.stores.wire import totals

from ..ledgers import INFO, SCOPES, Clock, ledger_for, tomorrow_at
from .batches import (BAD, DUE, EXPIRE, FILLER_DEADLINE, GONE_AT, LIMITED, NOW_MS, _fillers, batch_order, dump,
                      in_one_batch, mixed, one_by_one, outcome, setup)

async def test_a_batch_does_exactly_what_the_same_calls_do_one_by_one(redis_server, redis_url):
    client = redis_sync.Redis.from_url(redis_url)
    store = open_store(redis_url)
    await setup(store)
    alone = await one_by_one(store, mixed(store), batch_order(mixed))
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
    assert st[6:8] == [Status.REFUSED, Status.FORCED]          # the batch's settles ran before r1
    assert batched[8:13] == [True, True, True, True, False]
    assert (st[14], st[15]) == (Status.ADMITTED, Status.REFUSED)
    assert batched[17].seen == ((0, (0, 0, 0, 0)),)           # not old-lost's 3: the hash was gone
    assert b"{bp}:w:old" not in state_batched
    assert (st[19], batched[20]) == (Status.ADMITTED, True)              # u1's undo ran after it


async def test_a_batch_runs_its_settles_before_its_reserves_but_never_a_settle_before_its_own_reserve(redis_url):
    # The calls of a batch all waited at once, so any order is one they could have run in: the
    # settles go first (batch.lua adds them up per plan), except the settle of an id reserved in
    # the same batch (the ledger's undo of a reserve whose caller went away).
    store = open_store(redis_url)
    cs = [Counter("{bp}:w:order", "org:a", 100, -1, EXPIRE)]
    assert (await store.reserve("a", cs, 100, 0, NOW_MS, False)).status is Status.ADMITTED
    out = await in_one_batch(store, [lambda: store.reserve("b", cs, 50, 0, NOW_MS, False),   # queued first
                                     lambda: store.commit("a", cs, 40, 0),                   # frees 60
                                     lambda: store.reserve("c", cs, 10, 0, NOW_MS, False),
                                     lambda: store.release("c", cs)])
    assert [getattr(o, "status", o) for o in out] == [Status.ADMITTED, True, Status.ADMITTED, True]
    assert out[0].seen[0].totals[:2] == (40, 0)               # b saw a's commit
    assert await store.snapshot(cs) == [(40, 50, 0, 0)]        # b open; c reserved and released
    await store.close()


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


async def test_calls_of_one_plan_send_its_window_keys_and_counters_once_a_batch(redis_url):
    # batch.lua reads a plan (window keys, counters, limits) once for every call of it in the
    # batch: the calls after the first send only their own keys and arguments.
    store = open_store(redis_url)
    sent = []
    round_trip = store._calls._round_trip

    async def spy(commands):
        sent.extend(commands)
        return await round_trip(commands)
    store._calls._round_trip = spy
    other = [Counter("{bp}:w:day", "org:b", -1, -1, EXPIRE)]
    out = await in_one_batch(store, [lambda: store.reserve("k1", LIMITED, 1, 1, NOW_MS, False),
                                     lambda: store.reserve("k2", LIMITED, 1, 1, NOW_MS, False),
                                     lambda: store.reserve("k3", other, 1, 1, NOW_MS, False),
                                     lambda: store.commit("k1", LIMITED, 1, 1),
                                     lambda: store.commit("k2", LIMITED, 1, 1)])
    assert [getattr(o, "status", o) for o in out] == [Status.ADMITTED] * 3 + [True] * 2
    _, _, numkeys, *rest = sent[-1]
    assert rest[:numkeys] == ["{bp}:r:k1", "{bp}:leases", "{bp}:w:day", "{bp}:w:month",
                              "{bp}:r:k2", "{bp}:leases",
                              "{bp}:r:k3", "{bp}:leases", "{bp}:w:day",
                              "{bp}:r:k1", "{bp}:leases", "{bp}:log", "{bp}:w:day", "{bp}:w:month",
                              "{bp}:r:k2", "{bp}:leases", "{bp}:log"]
    args = rest[numkeys:]
    wire = store._wired(LIMITED)
    assert args.count(wire.record) == 2                  # once for the reserves, once for the commits
    assert args[args.index("k2") - 4:args.index("k2")] == ["r", 2, 7, -1]     # names call 1's plan
    await store.close()


async def test_a_call_whose_plan_cannot_be_read_fails_with_the_calls_naming_it_and_no_other(redis_url):
    store = open_store(redis_url)
    bad = ("0 1 f", str(EXPIRE), "not a number")        # the plan's field count is not a number
    store._calls.MAX_IN_FLIGHT = 1

    def bad_reserve(rid):
        keys = [f"{{bp}}:r:{rid}", "{bp}:leases", "{bp}:w:day"]
        return store._calls.call(store._reserve, keys, [rid, 1, 1, NOW_MS, NOW_MS + 1, "0", ""], bad)
    filler = store.reserve("filler-bad", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0, FILLER_DEADLINE, False)
    out = await asyncio.gather(filler, bad_reserve("b1"), bad_reserve("b2"),
                               store.reserve("good", LIMITED, 1, 1, NOW_MS, False), return_exceptions=True)
    assert store._calls.batched == 3
    assert all(isinstance(o, ResponseError) for o in out[1:3])
    assert "bad arguments" in str(out[2])
    assert out[3].status is Status.ADMITTED
    assert await store._r.exists("{bp}:r:b1", "{bp}:r:b2") == 0
    await store.close()


async def test_calls_go_at_once_while_few_are_out_and_under_load_wait_until_fewer_than_two_are(redis_url):
    # The coalescer (docs/store.md "Batches"): a call goes at once while fewer than
    # MAX_IN_FLIGHT (4) round trips are out, unless calls wait or a batch is out; then it waits
    # too, and the queue goes out as one batch when fewer than FLUSH_BELOW (2) are out.
    store = open_store(redis_url)
    calls = store._calls
    assert (calls.MAX_IN_FLIGHT, calls.FLUSH_BELOW) == (4, 2)
    round_trip, gates, sent = calls._round_trip, [], []

    async def gated(commands):
        sent.append(len(commands[0]) and commands[0][1])         # the script's sha
        gate = asyncio.Event()
        gates.append(gate)
        await gate.wait()
        return await round_trip(commands)
    calls._round_trip = gated
    limit = [Counter("{bp}:w:day", "org:q", -1, -1, EXPIRE)]

    def reserve(i):
        return asyncio.ensure_future(store.reserve(f"q{i}", limit, 1, 1, NOW_MS, False))

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)
    first = [reserve(i) for i in range(4)]           # 4 at once
    await settle()
    assert len(gates) == 4 and calls.batched == 0
    waiting = [reserve(4), reserve(5)]               # 4 out: these wait
    await settle()
    assert len(gates) == 4
    gates[0].set()
    await first[0]
    await settle()
    waiting.append(reserve(6))                       # 3 out, but a queue: waits behind it
    await settle()
    assert len(gates) == 4
    gates[1].set()
    await first[1]
    await settle()
    assert len(gates) == 4                           # 2 out: the queue still waits
    gates[2].set()
    await first[2]
    await settle()
    assert len(gates) == 5 and calls.batched == 3    # 1 out: the queue goes as one batch
    assert sent[4] == calls._batch.sha
    waiting.append(reserve(7))                       # 2 out, no queue, but a batch: waits
    await settle()
    assert len(gates) == 5
    gates[3].set()
    gates[4].set()
    await asyncio.gather(*first, *waiting[:3])
    await settle()
    assert len(gates) == 6 and sent[5] == store._reserve.sha     # the batch came back: the queue (of one) went
    gates[5].set()
    out = await asyncio.gather(*first, *waiting)
    assert [o.status for o in out] == [Status.ADMITTED] * 8
    late = reserve(8)                                # nothing out, no queue: at once, alone
    await settle()
    gates[-1].set()
    assert (await late).status is Status.ADMITTED and sent[-1] == store._reserve.sha
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



async def test_a_counter_named_twice_in_one_call_counts_as_the_single_call_counts_it(redis_server, redis_url):
    # A counter named twice (the same window and scope) is charged once per naming, in a batch as
    # in the single call, as the memory store charges it (tests/stores/test_memory.py): both
    # forms change the one value in place, so such calls batch like any other.
    client = redis_sync.Redis.from_url(redis_url)
    twice = [*LIMITED, LIMITED[0]]
    rids = [f"t{i}" for i in range(4)]

    async def run(s, together: bool):
        for phase in (lambda r: s.reserve(r, twice, 10, 5, NOW_MS, False), lambda r: s.commit(r, twice, 7, 3)):
            if together:        # queued behind a filler: one batch
                s._calls.MAX_IN_FLIGHT = 1
                filler = s.reserve(f"filler{next(_fillers)}", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)],
                                   0, 0, FILLER_DEADLINE, False)
                before = s._calls.batched
                out = await asyncio.gather(filler, *(phase(r) for r in rids))
                assert [getattr(o, "status", o) for o in out[1:]] in ([Status.ADMITTED] * 4, [True] * 4)
                assert s._calls.batched - before == len(rids)
            else:
                for r in rids:
                    await phase(r)

    store = open_store(redis_url)
    await run(store, False)
    state_alone = dump(client)
    await store.close()
    redis_server.command("FLUSHALL")
    store = open_store(redis_url)
    await run(store, True)
    client.delete("{bp}:w:filler", *client.keys("{bp}:r:filler*"))
    client.zremrangebyscore("{bp}:leases", FILLER_DEADLINE, FILLER_DEADLINE)
    state_together = dump(client)
    await store.close()
    assert state_together == state_alone
    assert totals(client.hget("{bp}:w:day", "org:a")) == (4 * 2 * 7, 0, 4 * 2 * 3, 0)   # twice a call


def random_plans(rng: random.Random) -> list[tuple[Counter, ...]]:
    """Counters over three window hashes (one whose expiry is already past), limited or not,
    some spent from an allowance ("~" field, limit < -1), no counter named twice in a plan."""
    expiries = {"{bp}:w:a": EXPIRE, "{bp}:w:b": EXPIRE + 5, "{bp}:w:c": GONE_AT}
    plans = []
    for _ in range(5):
        plans.append(tuple(Counter(w, s, rng.choice([-1, -1, 50, 100, 200, -52]), rng.choice([-1, 80, 300]), at)
                           for w, at in rng.sample(sorted(expiries.items()), rng.randint(1, 3))
                           for s in rng.sample(["org:x", "user:y", "user:z", "key:k"], rng.randint(1, 3))))
    return plans


def random_calls(store, rng: random.Random, plans, n: int) -> list:
    """n reserves (due or not, some forced), commits, releases and expiries (charging or not)
    on a few ids, so that calls meet their own id's earlier calls in every state."""
    calls = []
    for _ in range(n):
        k, rid, plan = rng.random(), f"z{rng.randint(0, 7)}", rng.choice(plans)
        t, d = rng.randint(0, 40), rng.randint(0, 60)
        if k < 0.45:
            deadline, force = rng.choice([NOW_MS, DUE]), rng.random() < 0.2
            calls.append(lambda rid=rid, p=plan, t=t, d=d, dl=deadline, f=force: store.reserve(rid, p, t, d, dl, f, "i"))
        elif k < 0.7:
            calls.append(lambda rid=rid, p=plan, t=t, d=d: store.commit(rid, p, t, d, Note("ok")))
        elif k < 0.85:
            calls.append(lambda rid=rid, p=plan: store.release(rid, p))
        else:
            calls.append(lambda rid=rid, p=plan, c=rng.random() < 0.5: store.expire(rid, p, c, NOW_MS))
    return calls


def spoil(client, rng: random.Random) -> None:
    """Sometimes: a window hash, a record or the log of the wrong type; an allowance field."""
    if rng.random() < 0.3:
        client.delete("{bp}:w:b")
        client.set("{bp}:w:b", "not a hash")
    if rng.random() < 0.3:
        client.delete("{bp}:r:z3")
        client.hset("{bp}:r:z3", "not", "a string")
    if rng.random() < 0.2:
        client.delete("{bp}:log")
        client.set("{bp}:log", "not a stream")
    if rng.random() < 0.6:          # in w:c, the first write's past expiry deletes it (batch: DEL)
        client.hset(rng.choice(["{bp}:w:a", "{bp}:w:c"]), "~org:x", struct.pack("<dddd", 120, 10, 500, 0))


@pytest.mark.parametrize("seed", range(24))
async def test_random_sequences_do_in_batches_what_they_do_one_by_one(redis_server, redis_url, seed):
    # The mixed sequence above, drawn at random: every reply and every key compared, with the
    # queue cut into batches of 2 to 7 calls (shared arguments, runs of one, several per flush),
    # each batch running its settles first (ids reserved earlier in the batch excepted).
    plans = random_plans(random.Random(seed))
    await same_in_batches(redis_server, redis_url, plans, seed, 10, 30, 2 + seed % 6)


async def same_in_batches(redis_server, redis_url, plans, seed: int, first: int, n: int, size: int,
                          spoiled=lambda client: None) -> None:
    """`first` random calls one by one, spoil (then `spoiled`), then n more: once one by one in
    the order batches of `size` run them (their settles first), once queued as batches of
    `size`; every reply and every key compared."""
    client = redis_sync.Redis.from_url(redis_url)

    async def run(batched: bool):
        store = open_store(redis_url)
        await one_by_one(store, random_calls(store, random.Random(seed + 1000), plans, first))
        spoil(client, random.Random(seed + 2000))
        spoiled(client)
        calls = random_calls(store, random.Random(seed), plans, n)
        if not batched:
            out = await one_by_one(store, calls, batch_order(lambda s: random_calls(s, random.Random(seed), plans, n),
                                                             size))
        else:
            store._calls.MAX_BATCH, store._calls.MAX_IN_FLIGHT = size, 1
            filler = store.reserve(f"filler{next(_fillers)}", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0,
                                   FILLER_DEADLINE, False)
            out = (await asyncio.gather(filler, *(c() for c in calls), return_exceptions=True))[1:]
            assert store._calls.batched > 0
            client.delete("{bp}:w:filler", *client.keys("{bp}:r:filler*"))
            client.zremrangebyscore("{bp}:leases", FILLER_DEADLINE, FILLER_DEADLINE)
        await store.close()
        return [outcome(x) for x in out], dump(client)

    alone = await run(False)
    redis_server.command("FLUSHALL")
    assert await run(True) == alone


def shared_plans(rng: random.Random) -> list[tuple[Counter, ...]]:
    """Harder plans than random_plans: up to six, over four window hashes (one already past
    its expiry), sharing fields, some counters named twice, allowances in either unit or both,
    limits of 0."""
    expiries = {"{bp}:w:a": EXPIRE, "{bp}:w:b": EXPIRE + 5, "{bp}:w:c": GONE_AT, "{bp}:w:d": EXPIRE + 9}
    plans = []
    for _ in range(rng.randint(2, 6)):
        counters = []
        for w, at in rng.sample(sorted(expiries.items()), rng.randint(1, 3)):
            scopes = rng.sample(["org:x", "user:y", "user:z", "key:k"], rng.randint(1, 3))
            if rng.random() < 0.3:
                scopes.append(rng.choice(scopes))                      # named twice
            counters += (Counter(w, s, rng.choice([-1, -1, 0, 50, 100, 200, -52]), rng.choice([-1, 80, 300, -302]), at)
                         for s in scopes)
        plans.append(tuple(counters))
    return plans


@pytest.mark.parametrize("seed", range(16))
async def test_random_shared_plans_do_in_batches_of_any_size_what_they_do_one_by_one(redis_server, redis_url, seed):
    # As above, with shared_plans, batches of 2 to 40 calls (a batch holds several calls of one
    # id, and settles of many plans added up at once) and a window hash without its marker.
    rng = random.Random(seed)
    plans, size, n = shared_plans(rng), rng.randint(2, 40), rng.randint(10, 60)
    unmarked = random.Random(seed + 3000).random() < 0.3

    def spoiled(client):
        if unmarked:
            client.hdel("{bp}:w:d", "_")
    await same_in_batches(redis_server, redis_url, plans, seed, 15, n, size, spoiled)


async def test_a_reserve_whose_caller_went_away_while_it_waited_is_undone(redis_url):
    # The queued call still runs (its batch went or will go out): the ledger's undo, queued behind
    # it, releases it; nothing stays reserved or leased, and the log says so.
    store = open_store(redis_url)
    ledger = ledger_for(store, Clock(tomorrow_at(12)), defaults={"org": {"day": {"tokens": 1000}}})
    store._calls.MAX_IN_FLIGHT = 1
    filler = asyncio.ensure_future(store.reserve("filler-gone", [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)], 0, 0,
                                                 FILLER_DEADLINE, False))
    gone = asyncio.ensure_future(ledger.reserve("gone", Amounts(300, 10), SCOPES, INFO))
    await asyncio.sleep(0)
    assert len(store._calls._queue) == 1                    # waiting behind the filler
    gone.cancel()
    await asyncio.gather(filler, gone, return_exceptions=True)
    while len(ledger.tasks) or len(store._tasks):
        await asyncio.sleep(0.01)
    assert [c.tokens_reserved for c in await store.snapshot(ledger.counters(SCOPES))] == [0] * len(ledger.counters(SCOPES))
    assert await store._r.zscore("{bp}:leases", "gone") is None
    assert [(e.id, e.outcome, e.tokens) for e in await store.settlements(None, None, 10)] == [("gone", "released", 0)]
    assert isinstance(await ledger.reserve("after", Amounts(1000, 10), SCOPES, INFO), Reservation)
    await store.close()
