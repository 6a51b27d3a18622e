"""The cluster store's pipelined calls during a slot migration and an uncovered slot, on real
local 3-master clusters (cluster_client.Direct): a call answered ASK runs once on the importing
node, a call answered TRYAGAIN or CLUSTERDOWN runs once when the slot is served again, and the
other orgs' calls of the same flush stay pipelined. Each ends exactly: the counters move once,
and a retried reserve answers DUPLICATE, a retried settle 0. (MOVED: test_cluster_pipeline.py.)
"""

from __future__ import annotations

import asyncio

from proxy.stores import Status, open_store
from proxy.stores.base import Note
from proxy.stores.redis import SCRIPTS

from .batches import NOW_MS
from .clusters import ORGS, begin_migration, end_migration, home, migrate_keys, open_for, plan, queued

ASKING = b"*1\r\n$6\r\nASKING\r\n"


def reserves(store, orgs, prefix: str):
    return [lambda org=org: store.reserve(f"{prefix}-{org}", plan(org), 30, 3, NOW_MS, False) for org in orgs]


def slot_of(store, org: str) -> int:
    return store._r.keyslot(f"{{bp:{org}}}")


async def test_a_call_answered_ask_runs_once_on_the_importing_node_with_asking_on_its_connection(own_cluster, writes):
    store = open_store(own_cluster.url)
    await open_for(store, ORGS)                     # pre-<org>: 40 tokens reserved for every org
    await store._r.script_load(SCRIPTS["settle"])   # no NOSCRIPT on the importing node
    moving = ORGS[0]
    assert await store.commit(f"pre-{moving}", plan(moving), 20, 2, Note("ok"))     # its log exists
    assert (await store.reserve("open", plan(moving), 30, 3, NOW_MS, False)).status is Status.ADMITTED
    slot, src = slot_of(store, moving), home(store, moving)
    dst = next(port for port in own_cluster.ports if port != src)
    # A busy node has several pooled connections: redis-py's own ASK handling sends ASKING on
    # one of them and the command on another, which the importing node then answers MOVED.
    importing = store._r.get_node("127.0.0.1", dst)
    await asyncio.gather(*(importing.execute_command("PING") for _ in range(4)))
    begin_migration(own_cluster, slot, src, dst)
    migrate_keys(own_cluster, slot, src, dst)       # every key of the org on dst: src answers ASK

    writes.clear()
    others = [org for org in ORGS if org != moving]
    out = await queued(store, [lambda: store.commit("open", plan(moving), 25, 2, Note("ok")),
                               *reserves(store, others, "after")], tenants=())
    assert out[0] is True
    assert [o.status for o in out[1:]] == [Status.ADMITTED] * len(others)
    asked = [(port, data.count(ASKING), data.count(b"EVALSHA")) for port, data in writes if ASKING in data]
    assert asked == [(dst, 1, 1)]                   # ASKING and the call in one write, on the importing node
    end_migration(own_cluster, slot, dst)
    assert await store.commit("open", plan(moving), 25, 2, Note("ok")) is False     # settled once
    # pre: 40 reserved, 20 spent; open: 30 reserved, 25 spent
    assert await store.snapshot(plan(moving)[:1]) == [(45, 0, 4, 0)]
    await store.close()


async def test_calls_answered_tryagain_mid_migration_run_once_when_the_slot_has_moved(own_cluster, monkeypatch):
    store = open_store(own_cluster.url)
    await open_for(store, ORGS)
    moving = ORGS[0]
    slot, src = slot_of(store, moving), home(store, moving)
    dst = next(port for port in own_cluster.ports if port != src)
    begin_migration(own_cluster, slot, src, dst)
    # Only the window hash moved: src holds the record and the lease index, so a call naming
    # keys on both nodes is answered TRYAGAIN (it did not run).
    migrate_keys(own_cluster, slot, src, dst, [f"{{bp:{moving}}}:w:day"])
    resent: list[tuple] = []
    execute = store._r.execute_command

    async def finish_first(*args, **kw):            # the migration ends before the call goes again
        if args[0] == "EVALSHA" and f"{{bp:{moving}}}".encode() in str(args).encode():
            if not resent:
                migrate_keys(own_cluster, slot, src, dst)
                end_migration(own_cluster, slot, dst)
            resent.append(args)
        return await execute(*args, **kw)
    monkeypatch.setattr(store._r, "execute_command", finish_first)

    others = [org for org in ORGS if org != moving]
    out = await queued(store, [lambda: store.commit(f"pre-{moving}", plan(moving), 20, 2, Note("ok")),
                               lambda: store.reserve("new", plan(moving), 30, 3, NOW_MS, False),
                               *reserves(store, others, "after")], tenants=())
    assert out[0] is True and out[1].status is Status.ADMITTED
    assert [o.status for o in out[2:]] == [Status.ADMITTED] * len(others)
    assert len(resent) == 1                         # the org's one batch call, sent again once
    assert home(store, moving) == dst
    assert await store.commit(f"pre-{moving}", plan(moving), 20, 2, Note("ok")) is False
    assert (await store.reserve("new", plan(moving), 30, 3, NOW_MS, False)).status is Status.DUPLICATE
    assert await store.snapshot(plan(moving)[:1]) == [(20, 30, 2, 3)]
    assert own_cluster.command(src, "CLUSTER", "COUNTKEYSINSLOT", str(slot)) == "0"
    await store.close()


async def test_calls_answered_clusterdown_run_once_when_the_slot_is_served_again(own_cluster, monkeypatch):
    store = open_store(own_cluster.url)
    await open_for(store, ORGS)
    down = ORGS[0]
    slot, owner = slot_of(store, down), home(store, down)
    on_owner = [org for org in ORGS if home(store, org) == owner]
    # The owner forgets one slot: it answers "CLUSTERDOWN Hash slot not served" for that org,
    # and, a slot being uncovered, "CLUSTERDOWN The cluster is down" for its other orgs.
    assert own_cluster.command(owner, "CLUSTER", "DELSLOTS", str(slot)) == "OK"
    resent: list[tuple] = []
    execute = store._r.execute_command

    async def serve_again_first(*args, **kw):       # the slot is served again before a call goes again
        if args[0] == "EVALSHA":
            if not resent:
                assert own_cluster.command(owner, "CLUSTER", "ADDSLOTS", str(slot)) == "OK"
                own_cluster._wait(lambda: "cluster_state:ok" in own_cluster.command(owner, "CLUSTER", "INFO"),
                                  "the node did not serve its slots again")
            resent.append(args)
        return await execute(*args, **kw)
    monkeypatch.setattr(store._r, "execute_command", serve_again_first)

    out = await queued(store, [lambda: store.commit(f"pre-{down}", plan(down), 20, 2, Note("ok")),
                               *reserves(store, ORGS, "after")], tenants=())
    assert out[0] is True
    assert [o.status for o in out[1:]] == [Status.ADMITTED] * len(ORGS)
    assert len(resent) == len(on_owner)             # one script call per org of the owner, once
    assert await store.commit(f"pre-{down}", plan(down), 20, 2, Note("ok")) is False
    assert (await store.reserve(f"after-{down}", plan(down), 30, 3, NOW_MS, False)).status is Status.DUPLICATE
    assert await store.snapshot(plan(down)[:1]) == [(20, 30, 2, 3)]
    await store.close()
