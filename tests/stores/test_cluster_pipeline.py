"""The cluster store's round trips, pipelined per node (cluster_client.Direct), on real local
3-master clusters: a flush over many orgs is one write per node and does what its calls do one
by one; a call whose slot moved is redirected while the others stay pipelined, and MOVED replies
patch the slot map without closing connections in use; a reply lost after the write fails its
calls and is not sent again; a node killed mid-flush fails its own calls with StoreUnavailable
and not the other nodes'; a tiny connection budget still carries a burst.
"""

from __future__ import annotations

import asyncio
import signal
import time

from redis.asyncio.connection import Connection

from proxy.errors import StoreUnavailable
from proxy.stores import Status, open_store
from proxy.stores.base import Note
from proxy.stores.redis import SCRIPTS

from .batches import NOW_MS, one_by_one, outcome
from .clusters import FILLER, ORGS, dump, home, move_slot, one_lane, open_for, plan, queued

SCRIPT = b"$7\r\nEVALSHA\r\n"        # how each packed script call starts on the wire


SETTLED = ORGS[:4] + ORGS[8:]


def many_orgs(store):
    """Orgs 0-3: a commit and two reserves (one batch call each); 4-7: one reserve; 8-11: one
    commit (each a single script call)."""
    calls = []
    for org in ORGS[:4]:
        calls += [lambda org=org: store.commit(f"pre-{org}", plan(org), 20, 2, Note("ok")),
                  lambda org=org: store.reserve(f"new-{org}", plan(org), 30, 3, NOW_MS, False),
                  lambda org=org: store.reserve(f"big-{org}", plan(org), 90, 3, NOW_MS, False)]   # refused
    calls += [lambda org=org: store.reserve(f"new-{org}", plan(org), 30, 3, NOW_MS, False) for org in ORGS[4:8]]
    calls += [lambda org=org: store.commit(f"pre-{org}", plan(org), 20, 2, Note("ok")) for org in ORGS[8:]]
    return calls


async def test_a_flush_over_many_orgs_is_one_write_per_node_and_does_what_its_calls_do_one_by_one(
        cluster_url, redis_cluster, writes):
    store = open_store(cluster_url)
    await open_for(store, SETTLED)
    alone = await one_by_one(store, many_orgs(store))
    state_alone = dump(redis_cluster)
    await store.close()

    redis_cluster.flush()
    store = open_store(cluster_url)
    await open_for(store, SETTLED)
    homes = {org: home(store, org) for org in ORGS}
    writes.clear()
    flushed = await queued(store, many_orgs(store), tenants=())
    state = dump(redis_cluster)
    await store.close()

    assert [outcome(x) for x in flushed] == [outcome(x) for x in alone]
    assert state == state_alone
    assert [getattr(x, "status", x) for x in flushed[:3]] == [True, Status.ADMITTED, Status.REFUSED]
    # Each node's filler call alone, then ONE write per node carrying one script call per org it
    # holds (a batch for orgs 0-3, a single call for the others); one write per call before.
    assert len(set(homes.values())) == 3, "the orgs do not span the three nodes"
    calls = [(port, n) for port, data in writes if (n := data.count(SCRIPT))]
    assert [n for _, n in calls[:3]] == [1, 1, 1]
    assert sorted(calls[3:]) == sorted((port, sum(h == port for h in homes.values())) for port in set(homes.values()))


async def test_a_call_whose_slot_moved_is_redirected_and_the_others_stay_pipelined(own_cluster, writes):
    store = open_store(own_cluster.url)
    await open_for(store, ORGS)                     # the slot map learned, each org's keys written
    moved = ORGS[0]
    slot, src = store._r.keyslot(f"{{bp:{moved}}}"), home(store, moved)
    dst = next(p for p in own_cluster.ports if p != src)
    move_slot(own_cluster, slot, src, dst)
    assert home(store, moved) == src                # the client's map is stale
    homes_before = {org: home(store, org) for org in ORGS}

    writes.clear()
    out = await queued(store, [lambda org=org: store.reserve(f"after-{org}", plan(org), 30, 3, NOW_MS, False)
                               for org in ORGS], tenants=())
    assert [o.status for o in out] == [Status.ADMITTED] * len(ORGS)
    assert home(store, moved) == dst                # learned from the MOVED
    assert await store.snapshot(plan(moved)[:1]) == [(0, 70, 0, 7)]        # pre 40 + after 30, once
    tag = f"{{bp:{moved}}}".encode()
    sent = [(port, n) for port, data in writes[1:] if tag in data and (n := data.count(SCRIPT))]
    # In src's pipelined write with src's other orgs (answered MOVED), then through the client's
    # own path: its stale map sends it to src again alone, the MOVED there sends it to dst.
    assert sent == [(src, sum(homes == src for homes in homes_before.values())), (src, 1), (dst, 1)]
    assert own_cluster.command(src, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
    await store.close()


async def test_moved_slots_patch_the_map_without_closing_the_connections_in_use(own_cluster, monkeypatch):
    store = open_store(own_cluster.url)
    await open_for(store, ORGS)
    homes = {org: home(store, org) for org in ORGS}
    dst = own_cluster.ports[0]
    moved = [org for org in ORGS if homes[org] != dst]              # two nodes' orgs: 5 or more
    for org in moved:
        move_slot(own_cluster, store._r.keyslot(f"{{bp:{org}}}"), homes[org], dst)
    closed = []

    async def aclose():
        closed.append(True)
    monkeypatch.setattr(store._r, "aclose", aclose)
    for rounds in range(2):                         # every call of a moved org's slot answers MOVED once
        out = await queued(store, [lambda org=org: store.reserve(f"after-{rounds}-{org}", plan(org), 1, 1, NOW_MS, False)
                                   for org in ORGS], tenants=())
        assert [o.status for o in out] == [Status.ADMITTED] * len(ORGS)
    assert len(moved) >= 5 and all(home(store, org) == dst for org in moved)
    # The client re-learns the whole map (closing every node's connections, an exchange's on
    # other nodes included) only when a node fails, not every few MOVED.
    assert closed == []
    monkeypatch.undo()
    await store.close()


def only_the_victim_s_calls_failed(out: list, homes: dict, victim) -> None:
    """The calls of orgs homed on `victim` failed with StoreUnavailable; every other org's stood."""
    for org, res in zip(ORGS, out):
        if homes[org] == victim:
            assert isinstance(res, StoreUnavailable), (org, res)
        else:
            assert res.status is Status.ADMITTED, (org, res)


async def test_a_node_killed_mid_flush_fails_its_calls_and_not_the_other_nodes(own_cluster, monkeypatch):
    store = open_store(own_cluster.url)
    one_lane(store)                                 # one flush over every node (a stale map can make one)
    await open_for(store, ORGS)                     # connections pooled on every node
    homes = {org: home(store, org) for org in ORGS}
    victim = homes[ORGS[0]]
    proc = own_cluster.procs[own_cluster.ports.index(victim)]
    send = Connection.send_packed_command
    killed = []

    async def kill_after_write(self, command, check_health=True):
        data = b"".join(command) if isinstance(command, list) else command
        if self.port != victim or killed or b"after-" not in data:
            return await send(self, command, check_health)
        proc.send_signal(signal.SIGSTOP)            # it reads nothing more ...
        await send(self, command, check_health)     # ... of the calls written now ...
        proc.kill()                                 # ... and never answers them
        proc.wait()
        killed.append(True)
    monkeypatch.setattr(Connection, "send_packed_command", kill_after_write)

    for round_ in range(2):                         # mid-flush; then already dead (nothing can be sent)
        out = await queued(store, [lambda org=org: store.reserve(f"after-{round_}-{org}", plan(org), 10, 1, NOW_MS, False)
                                   for org in ORGS], tenants=())
        assert killed
        only_the_victim_s_calls_failed(out, homes, victim)
    await store.close()


async def test_a_reply_lost_after_the_write_fails_its_calls_and_is_not_sent_again(cluster_url, redis_cluster, monkeypatch):
    store = open_store(cluster_url)
    await open_for(store, ())
    homes = {org: home(store, org) for org in ORGS}
    victim = homes[ORGS[0]]
    proc = redis_cluster.procs[redis_cluster.ports.index(victim)]
    send = Connection.send_packed_command
    carried: list[int] = []                         # ports of the writes carrying org0's call

    async def drop_after_write(self, command, check_health=True):
        data = b"".join(command) if isinstance(command, list) else command
        if b"{bp:org0}:r:after" not in data:
            return await send(self, command, check_health)
        carried.append(self.port)
        if len(carried) > 1:
            return await send(self, command, check_health)
        proc.send_signal(signal.SIGSTOP)            # the node answers nothing yet ...
        try:
            await send(self, command, check_health)
            self._writer.transport.abort()          # ... and its replies to this write are never read
        finally:
            proc.send_signal(signal.SIGCONT)
    monkeypatch.setattr(Connection, "send_packed_command", drop_after_write)

    out = await queued(store, [lambda org=org: store.reserve(f"after-{org}", plan(org), 30, 3, NOW_MS, False)
                               for org in ORGS], tenants=())
    # Every call of that write lost its reply: each fails (its caller undoes it by id), none is
    # sent again (a resend would answer DUPLICATE for a reserve that ran); other nodes' stand.
    assert carried == [victim]
    only_the_victim_s_calls_failed(out, homes, victim)
    await store.close()


async def test_a_burst_over_many_orgs_waits_for_a_tiny_connection_budget(cluster_url):
    store = open_store(cluster_url, max_connections=1)
    out = await asyncio.gather(*(store.reserve(f"b{i}", plan(ORGS[i % len(ORGS)]), 1, 1, NOW_MS, False)
                                 for i in range(300)))
    assert [o.status for o in out] == [Status.ADMITTED] * 300
    assert await store.snapshot(plan(ORGS[0])[:1]) == [(0, 25, 0, 25)]
    await store.close()


async def test_a_frozen_node_does_not_hold_the_calls_of_orgs_on_other_nodes(own_cluster):
    # A primary that stops answering without closing its connections (a partition, a paused VM,
    # before the cluster fails it over): its calls wait for the socket timeout (5 s); an org on
    # another node must not wait for them. Each node is a lane of its own (Direct.lane_of), with
    # the single store's "one batch out under load" rule: the frozen node's lane has every
    # in-flight slot out and calls waiting, and an org on a healthy node still goes at once.
    # With one lane for the whole cluster (as before session 16) `later` waited behind them.
    store = open_store(own_cluster.url)
    await open_for(store, ())
    await store._r.script_load(SCRIPTS["reserve"])          # SCRIPT LOAD would wait on every primary
    homes = {org: home(store, org) for org in ORGS}
    victim = homes[ORGS[0]]
    healthy = next(org for org in ORGS if homes[org] != victim)
    proc = own_cluster.procs[own_cluster.ports.index(victim)]
    timeout = store._r.get_node("127.0.0.1", victim).connection_kwargs["socket_timeout"]

    def reserve(rid: str, org: str):
        return asyncio.ensure_future(store.reserve(rid, plan(org), 1, 1, NOW_MS, False))
    proc.send_signal(signal.SIGSTOP)
    try:
        stuck = [reserve(f"stuck{i}", ORGS[0]) for i in range(store._calls.MAX_IN_FLIGHT + 2)]
        await asyncio.sleep(0.2)
        assert len(store._calls._queue) == 2                 # its lane: every slot out, two waiting
        started = time.monotonic()
        later = await asyncio.wait_for(reserve("later", healthy), timeout / 2)
        waited = time.monotonic() - started
        assert later.status is Status.ADMITTED and not any(t.done() for t in stuck)
    finally:
        proc.send_signal(signal.SIGCONT)
    out = await asyncio.gather(*stuck, return_exceptions=True)
    await store.close()
    assert waited < timeout / 2
    # Once the node wakes its calls are answered (or, past the timeout, fail): none is lost.
    assert all(isinstance(o, StoreUnavailable) or o.status is Status.ADMITTED for o in out)


async def test_a_healthy_node_s_caller_is_answered_before_a_frozen_node_s_call_in_the_same_flush(own_cluster):
    # One flush carries a call for an org on a frozen primary and one for an org on a healthy
    # node: each node's callers are answered when that node's replies are read, so the healthy
    # org's caller does not wait for the frozen node's exchange (its socket timeout, 5 s).
    store = open_store(own_cluster.url)
    one_lane(store)                                 # one flush over two nodes (a stale map can make one)
    await open_for(store, ())
    await store._r.script_load(SCRIPTS["reserve"])          # a single call's script, on every node
    homes = {org: home(store, org) for org in ORGS}
    victim = next(port for port in own_cluster.ports if port != home(store, ""))   # not the filler's node
    frozen_org = next(org for org in ORGS if homes[org] == victim)
    healthy_org = next(org for org in ORGS if homes[org] != victim)
    proc = own_cluster.procs[own_cluster.ports.index(victim)]

    def reserve(rid: str, counters):
        return asyncio.ensure_future(store.reserve(rid, counters, 1, 1, NOW_MS, False))
    store._calls.MAX_IN_FLIGHT = 1
    proc.send_signal(signal.SIGSTOP)
    try:
        filler = reserve("filler", FILLER)                  # takes the one slot; the others queue
        frozen, healthy = reserve("frozen", plan(frozen_org)), reserve("healthy", plan(healthy_org))
        await filler
        assert store._calls._batches == 1 and not store._calls._queue      # both in the flush out
        started = time.monotonic()
        done, _ = await asyncio.wait({frozen, healthy}, return_when=asyncio.FIRST_COMPLETED)
        waited = time.monotonic() - started
        assert done == {healthy}
        assert healthy.result().status is Status.ADMITTED
        assert waited < store._r.get_node("127.0.0.1", victim).connection_kwargs["socket_timeout"] / 2
    finally:
        proc.send_signal(signal.SIGCONT)
    # The frozen node's call was only late: answered once the node wakes, counted once.
    assert (await frozen).status is Status.ADMITTED
    assert await store.snapshot(plan(frozen_org)[:1]) == [(0, 1, 0, 1)]
    await store.close()


async def test_a_script_reload_does_not_wait_for_a_frozen_primary(own_cluster):
    # After a failover to a fresh replica (or SCRIPT FLUSH) a node answers NOSCRIPT: the script
    # is loaded on that node only and the call runs again. redis-py's script object loads it on
    # every primary, so with another primary frozen every reload waited for its timeout.
    store = open_store(own_cluster.url)
    one_lane(store)                                 # one flush over two nodes (a stale map can make one)
    await open_for(store, ())
    homes = {org: home(store, org) for org in ORGS}
    victim = next(port for port in own_cluster.ports if port != home(store, ""))   # not the filler's node
    healthy = [port for port in own_cluster.ports if port != victim]
    orgs = [next(org for org in ORGS if homes[org] == port) for port in healthy]
    proc = own_cluster.procs[own_cluster.ports.index(victim)]
    for port in healthy:
        assert own_cluster.command(port, "SCRIPT", "FLUSH") == "OK"
    timeout = store._r.get_node("127.0.0.1", victim).connection_kwargs["socket_timeout"]
    proc.send_signal(signal.SIGSTOP)
    try:
        # The filler alone (a single call), then one flush: a batch for the first org, a single
        # call for the other; each answered NOSCRIPT by its node.
        out = await asyncio.wait_for(queued(store, [
            lambda: store.reserve("a1", plan(orgs[0]), 1, 1, NOW_MS, False),
            lambda: store.reserve("a2", plan(orgs[0]), 1, 1, NOW_MS, False),
            lambda: store.reserve("b1", plan(orgs[1]), 1, 1, NOW_MS, False)], tenants=()), timeout / 2)
    finally:
        proc.send_signal(signal.SIGCONT)
    assert [o.status for o in out] == [Status.ADMITTED] * 3
    assert [await store.snapshot(plan(org)[:1]) for org in orgs] == [[(0, 2, 0, 2)], [(0, 1, 0, 1)]]
    # Loaded where a call needed it (the batch script: the first org's node), not on every primary.
    sha = store._calls._batch.sha
    assert [own_cluster.command(port, "SCRIPT", "EXISTS", sha) for port in healthy] == ["1", "0"]
    await store.close()
