"""What the Redis Cluster tests share (tests/stores/test_cluster.py, test_cluster_batch.py,
test_cluster_pipeline.py, test_cluster_redirects.py): the orgs and scopes they reserve for,
finding orgs whose slots live on different nodes, queueing calls behind a filler on each node so
they go out in one flush per node, every node's keys, and migrating a slot as an operator would."""

from __future__ import annotations

import asyncio

import redis as redis_sync

from proxy.keys import leases_key, tenant_tag, tenants_key
from proxy.ledger import Scope
from proxy.stores import Counter, Status
from proxy.stores.redis import SCRIPTS

from ..redis_cluster import RedisCluster
from ..redis_server import dump_keys
from .batches import EXPIRE, FILLER_DEADLINE, NOW_MS, _fillers

ORGS = [f"org{i}" for i in range(12)]


def scopes(org: str) -> tuple[Scope, ...]:
    return (Scope("global", "*"), Scope("org", org), Scope("user", f"{org}/u"),
            Scope("provider", "openai"), Scope("model", "gpt-4o"))


def cluster_keys(redis_cluster) -> dict[int, list[str]]:
    """Every key on each node (the tests' own small data set)."""
    return {port: redis_cluster.command(port, "--scan").split() for port in redis_cluster.ports}


def on_other_nodes(redis_cluster, candidates: list[str]) -> tuple[str, str]:
    """Two orgs whose tags map to slots served by different nodes."""
    owner = {}
    for org in candidates:
        slot = int(redis_cluster.command(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", f"{{bp:{org}}}"))
        owner[org] = next(port for port in redis_cluster.ports
                          if _serves(redis_cluster.command(port, "CLUSTER", "MYID"),
                                     redis_cluster.command(port, "CLUSTER", "SHARDS"), slot))
    first = candidates[0]
    return first, next(org for org in candidates if owner[org] != owner[first])


def _serves(node_id: str, shards: str, slot: int) -> bool:
    # CLUSTER SHARDS (redis-cli output): "slots", start, end, ..., "nodes", ..., "id", <id>, ...
    for shard in shards.split("slots\n")[1:]:
        head, _, nodes = shard.partition("nodes\n")
        bounds = [int(x) for x in head.split() if x.isdigit()]
        if node_id in nodes and any(a <= slot <= b for a, b in zip(bounds[::2], bounds[1::2])):
            return True
    return False


FILLER = [Counter("{bp}:w:filler", "f", -1, -1, EXPIRE)]        # no org: tenant ""


def filler_plans(store) -> list[list[Counter]]:
    """One filler plan per primary: a counter of an org ("filler-<n>") whose slot that node
    serves (the store's calls wait per node: Direct.lane_of). Its keys all hold "filler"."""
    plans, seen, n = [], set(), 0
    primaries = {node.port for node in store._r.get_primaries()}
    while seen != primaries:
        org = f"filler-{n}"
        port = home(store, org)
        if port not in seen:
            seen.add(port)
            plans.append([Counter("{bp}:w:filler", f"org:{org}", -1, -1, EXPIRE)])
        n += 1
    return plans


async def queued(store, calls, tenants=("", "a")):
    """Run the coroutine functions `calls` in one flush per node: the tenants registered first
    (so no call waits on its SADD), then a filler on each node takes that node's only in-flight
    slot and the calls queue behind them. Each result is the call's return value or the
    exception it raised. The fillers' orgs are taken out of the tenant set again, so the keys
    compare equal with a run without them (their own keys hold "filler": `dump` skips them)."""
    for t in tenants:
        await store._register(t)
    await store._calls.ready()
    if store._calls.lane_of is None:                   # one_lane(store): one filler holds every call
        plans, orgs = [FILLER], []
    else:
        plans = filler_plans(store)
        orgs = [p[0].scope[4:] for p in plans]
    for org in orgs:
        await store._register(org)
    store._calls.MAX_IN_FLIGHT = 1
    fillers = [store.reserve(f"filler{next(_fillers)}", p, 0, 0, FILLER_DEADLINE, False) for p in plans]
    out = await asyncio.gather(*fillers, *(c() for c in calls), return_exceptions=True)
    if orgs:
        await store._r.srem(tenants_key("bp"), *orgs)
        store._tenants.difference_update(orgs)
    return out[len(fillers):]


def one_lane(store) -> None:
    """The store's calls kept in ONE lane for the whole cluster, as before session 16 (one
    queue, one in-flight count): so a flush carries calls for several nodes, as a lane chosen on
    a slot map that has changed since can; `queued` then needs one filler."""
    store._calls.lane_of = None


async def in_one_batch(store, calls, tenants=("", "a")):
    """test_batch.in_one_batch on the cluster: `queued`, every call through batch.lua."""
    before = store._calls.batched
    out = await queued(store, calls, tenants)
    assert store._calls.batched - before == len(calls), "the calls did not run in batches"
    return out


def dump(redis_cluster) -> dict:
    """Every key of every node but the filler's (test_batch.dump, record keys of any tenant)."""
    out = {}
    for port in redis_cluster.ports:
        client = redis_sync.Redis(port=port)
        try:
            client.zremrangebyscore(leases_key(tenant_tag("bp", "")), FILLER_DEADLINE, FILLER_DEADLINE)
        except redis_sync.exceptions.ResponseError:         # MOVED: another node holds it
            pass
        out.update(dump_keys(client, skip=lambda key: b"filler" in key))
        client.close()
    return out


def plan(org: str) -> list[Counter]:
    """Counters in the org's slot only (no shared limited scope: no lending calls)."""
    return [Counter("{bp}:w:day", f"org:{org}", 100, -1, EXPIRE), Counter("{bp}:w:day", f"user:{org}/u", -1, -1, EXPIRE)]


def home(store, org: str) -> int:
    """The port of the node the store's client maps the org's slot to."""
    return store._r.nodes_manager.get_node_from_slot(store._r.keyslot(f"{{bp:{org}}}")).port


async def open_for(store, orgs) -> None:
    """Reservations the many-orgs calls settle; every tenant registered and batch.lua loaded on
    every node (no SADD or NOSCRIPT in the flush)."""
    await store._r.script_load(SCRIPTS["batch"])
    for org in ("", *ORGS):
        await store._register(org)
    for org in orgs:
        assert (await store.reserve(f"pre-{org}", plan(org), 40, 4, NOW_MS, False)).status is Status.ADMITTED


def move_slot(cluster: RedisCluster, slot: int, src: int, dst: int) -> None:
    """Migrate `slot` with its keys from node `src` to node `dst` (redis-cli, as an operator
    would), and tell every node the new owner."""
    begin_migration(cluster, slot, src, dst)
    migrate_keys(cluster, slot, src, dst)
    end_migration(cluster, slot, dst)


def begin_migration(cluster: RedisCluster, slot: int, src: int, dst: int) -> None:
    """`slot` IMPORTING on `dst` and MIGRATING on `src`: from now on `src` answers ASK for a key
    it no longer holds, and TRYAGAIN for a multi-key command of which it holds only some."""
    cluster.command(dst, "CLUSTER", "SETSLOT", str(slot), "IMPORTING", cluster.command(src, "CLUSTER", "MYID"))
    cluster.command(src, "CLUSTER", "SETSLOT", str(slot), "MIGRATING", cluster.command(dst, "CLUSTER", "MYID"))


def migrate_keys(cluster: RedisCluster, slot: int, src: int, dst: int, keys: list[str] | None = None) -> None:
    """Move `keys` (default: every key of `slot` on `src`) to `dst` (MIGRATE)."""
    keys = cluster.command(src, "CLUSTER", "GETKEYSINSLOT", str(slot), "1000").split() if keys is None else keys
    if keys:
        assert cluster.command(src, "MIGRATE", "127.0.0.1", str(dst), "", "0", "5000", "KEYS", *keys) == "OK"


def end_migration(cluster: RedisCluster, slot: int, dst: int) -> None:
    """Every node told that `dst` owns `slot` (the importing node first, as redis-cli does)."""
    owner = cluster.command(dst, "CLUSTER", "MYID")
    for port in (dst, *cluster.ports):
        cluster.command(port, "CLUSTER", "SETSLOT", str(slot), "NODE", owner)
