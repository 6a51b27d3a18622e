"""The Redis Cluster store's batches: the Redis store's coalescer, grouped by org.

A batch script call may only touch keys of one slot, and each org's keys share its hash tag, so
calls that wait go out as one batch.lua call per org (on the node owning its slot). The checks of
test_batch.py, on a real local 3-master cluster: a batch does exactly what its calls do one by
one; calls of different orgs (on different nodes) never share a batch; each node keeps the
single store's in-flight rule for its own calls; a concurrent burst over several orgs forms
batches and leaves the counters and the settlement log agreeing.
"""

from __future__ import annotations

import asyncio

from proxy.keys import in_tenant
from proxy.ledger import Amounts, Reservation
from proxy.stores import Counter, Status, open_store
from proxy.stores.base import Note
from proxy.stores.redis import SCRIPTS

from ..ledgers import INFO, Clock, ledger_for, tomorrow_at
from .batches import EXPIRE, LIMITED, NOW_MS, batch_order, mixed, one_by_one, outcome
from .clusters import ORGS, dump, home, in_one_batch, on_other_nodes, plan, scopes

async def setup(store):
    """test_batch.setup, its string key in org a's slot."""
    for rid, t, d, dl in (("open-a", 30, 100, NOW_MS), ("open-b", 20, 100, NOW_MS), ("due", 10, 50, NOW_MS - 5_000),
                          ("swept", 5, 10, NOW_MS - 5_000)):
        assert (await store.reserve(rid, LIMITED, t, d, dl, False)).status is Status.ADMITTED
    assert await store.expire("swept", LIMITED, True, NOW_MS)
    await store._r.set(in_tenant("{bp}:w:bad", "bp", "a"), "not a hash")


def cluster_mixed(store):
    """test_batch.mixed without its forced reserve: on the cluster a refused forced reserve is two
    calls (refused, then forced: ClusterStore.reserve), whose second joins a later batch, so it
    sees the calls queued after it, as any concurrent call may."""
    calls = mixed(store)
    calls[7] = lambda: store.reserve("r5", LIMITED, 50, 10, NOW_MS, False)          # refused
    return calls


async def test_a_cluster_batch_does_exactly_what_the_same_calls_do_one_by_one(cluster_url, redis_cluster):
    store = open_store(cluster_url)
    await setup(store)
    alone = await one_by_one(store, cluster_mixed(store), batch_order(cluster_mixed))
    state_alone = dump(redis_cluster)
    await store.close()

    redis_cluster.flush()
    store = open_store(cluster_url)
    await setup(store)
    batched = await in_one_batch(store, cluster_mixed(store))      # org a's calls, and user:v's (no org)
    state_batched = dump(redis_cluster)
    await store.close()

    assert [outcome(x) for x in batched] == [outcome(x) for x in alone]
    assert state_batched == state_alone
    st = [getattr(x, "status", x) for x in batched]
    assert st[:4] == [Status.ADMITTED, Status.ADMITTED, Status.REFUSED, Status.DUPLICATE]
    assert st[6:8] == [Status.REFUSED, Status.REFUSED]           # org a's settles ran before r1
    assert batched[8:13] == [True, True, True, True, False]
    assert (st[14], st[15]) == (Status.ADMITTED, Status.REFUSED)


async def test_calls_of_orgs_on_different_nodes_batch_per_org_never_crossslot(cluster_url, redis_cluster):
    first, second = on_other_nodes(redis_cluster, ORGS)
    store = open_store(cluster_url)
    plans = {org: [Counter("{bp}:w:day", f"org:{org}", 100, -1, EXPIRE), Counter("{bp}:w:day", f"user:{org}/u", -1, -1, EXPIRE)]
             for org in (first, second)}
    calls = [lambda i=i, org=org: store.reserve(f"{org}-{i}", plans[org], 30, 1, NOW_MS, False)
             for i in range(4) for org in (first, second)]
    sent = []
    routes = store._calls._routes

    def spy(commands):                                  # every round trip's commands, a flush's at once
        sent.append([c[2] for c in commands])           # EVALSHA sha numkeys …
        return routes(commands)
    store._calls._routes = spy
    out = await in_one_batch(store, calls, tenants=("", first, second))
    # Interleaved in the queue, out as one batch call per org: 3 of 30 fit each org's 100.
    assert [o.status for o in out] == [Status.ADMITTED] * 6 + [Status.REFUSED] * 2
    # Each node's filler alone (3 keys), then one flush per org's node (its lane): a batch call
    # of 4 reserves of one plan each (the first with its 3 keys, the others only their own 2:
    # the plan's window key is sent once).
    assert sent[:3] == [[3]] * 3 and sorted(sent[3:]) == [[3 + 3 * 2]] * 2
    assert await store.snapshot(plans[first][:1]) == await store.snapshot(plans[second][:1]) == [(0, 90, 0, 3)]
    await store.close()


async def test_each_node_keeps_the_in_flight_rule_for_its_own_calls(cluster_url, redis_cluster):
    # Each node is a lane (cluster_client.Direct.lane_of) with the single store's rule
    # (test_batch.test_calls_go_at_once_while_few_are_out_and_under_load_wait_until_fewer_than_two_are):
    # with MAX_IN_FLIGHT calls out on one node its next calls wait, and go as ONE batch once
    # fewer than FLUSH_BELOW are out there; a call for another node goes at once meanwhile.
    first, second = on_other_nodes(redis_cluster, ORGS)
    store = open_store(cluster_url)
    for org in ("", first, second):
        await store._register(org)
    for name in ("reserve", "batch"):                    # no NOSCRIPT round trip in the gated ones
        await store._r.script_load(SCRIPTS[name])
    calls = store._calls
    assert (calls.MAX_IN_FLIGHT, calls.FLUSH_BELOW) == (4, 2)
    part, gates = calls._part, {}

    async def gated(node, commands, asking=False):       # every exchange held until its gate opens
        gate = asyncio.Event()
        gates.setdefault(node.port, []).append(gate)
        await gate.wait()
        return await part(node, commands, asking)
    calls._part = gated

    def reserve(i: int, org: str):
        return asyncio.ensure_future(store.reserve(f"{org}-{i}", plan(org), 1, 1, NOW_MS, False))

    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)
    a, b = home(store, first), home(store, second)
    out = [reserve(i, first) for i in range(4)]          # 4 out on the first org's node
    await settle()
    out += [reserve(i, first) for i in (4, 5)]           # that node: these wait
    out.append(reserve(0, second))                       # the other node: at once
    await settle()
    assert len(gates[a]) == 4 and len(gates[b]) == 1 and calls.batched == 0
    for k in range(3):                                   # 3, 2, then 1 out there: the queue goes
        gates[a][k].set()
        await out[k]
        await settle()
        assert len(gates[a]) == (5 if k == 2 else 4)
    assert calls.batched == 2                            # the two waiting calls, one batch.lua call
    for gate in (*gates[a], *gates[b]):
        gate.set()
    assert [(await o).status for o in out] == [Status.ADMITTED] * 7
    await store.close()


async def test_a_cluster_batch_survives_script_flush(cluster_url, redis_cluster):
    store = open_store(cluster_url)
    await in_one_batch(store, [lambda: store.reserve("warm", LIMITED, 1, 1, NOW_MS, False)] * 2)
    for port in redis_cluster.ports:
        redis_cluster.command(port, "SCRIPT", "FLUSH")
    out = await in_one_batch(store, [lambda i=i: store.reserve(f"s{i}", LIMITED, 10, 1, NOW_MS, False) for i in range(3)])
    assert [o.status for o in out] == [Status.ADMITTED] * 3
    assert await store.snapshot(LIMITED[:1]) == [(0, 31, 0, 4)]
    await store.close()


async def test_counters_and_log_agree_after_a_concurrent_burst_over_several_orgs(cluster_url):
    store = open_store(cluster_url)
    ledger = ledger_for(store, Clock(tomorrow_at(12)),
                        defaults={"org": {"day": {"tokens": 20_000}}, "global": {"day": {"tokens": 10 ** 6}},
                                  "user": {"minute": {"usd": 10 ** 7}}})
    orgs = ORGS[:4]

    async def request(i: int):
        org = orgs[i % len(orgs)]
        res = await ledger.reserve(f"q{i}", Amounts(100 + i, 1000 + i), scopes(org), INFO._replace(org=org))
        if not isinstance(res, Reservation):
            return
        if i % 9 == 0:
            await ledger.release(res, "upstream_error")
        else:
            await ledger.commit(res, Amounts(60 + i, 700 + i))

    await asyncio.gather(*(request(i) for i in range(400)))
    assert store._calls.batched > 100, "the burst did not form batches"
    for window in ("minute", "day"):
        drift = await ledger.audit(window)
        assert drift and all(d.tokens == 0 and d.usd == 0 for d in drift), drift
    day = {(d.scope_type, d.scope_id): d for d in await ledger.audit("day")}
    for org in orgs:
        assert day["org", org].counter.tokens_reserved == 0 and 0 < day["org", org].counter.tokens_used <= 20_000
    await store.close()


async def test_a_counter_named_twice_batches_on_the_cluster_and_is_charged_once_per_naming(cluster_url):
    store = open_store(cluster_url)
    twice = [*LIMITED, LIMITED[0]]
    await in_one_batch(store, [lambda i=i: store.reserve(f"t{i}", LIMITED, 1, 1, NOW_MS, False) for i in range(2)])
    base = (await store.snapshot(LIMITED[:1]))[0]
    out = await in_one_batch(store, [*(lambda i=i: store.reserve(f"w{i}", twice, 10, 5, NOW_MS, False) for i in range(3)),
                                     lambda: store.commit("t0", twice, 7, 3, Note("ok"))])
    assert [o.status for o in out[:3]] == [Status.ADMITTED] * 3 and out[3] is True
    # Each reserve reserved 10 twice; the commit took t0's 1 back once per naming (not below 0)
    # and charged 7 twice: what the single calls do (test_batch.py).
    after = (await store.snapshot(LIMITED[:1]))[0]
    assert after.tokens_reserved == base.tokens_reserved + 3 * 2 * 10 - 2 * 1
    assert after.tokens_used == base.tokens_used + 2 * 7
    await store.close()
