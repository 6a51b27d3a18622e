"""A primary killed on a Redis Cluster with replicas: the calls of the orgs it served wait for a
replica to take its slots (cluster_client.Direct.call), then run there, counted exactly."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from proxy.keys import tenants_key
from proxy.stores import Status, open_store
from proxy.stores.cluster_client import Direct

from ..redis_cluster import RedisCluster
from .clusters import ORGS, home, plan
from .batches import NOW_MS


@pytest.fixture
def replicated_cluster():
    """Three masters with a replica each; a node is failed after 1 s without an answer (Redis's
    default is 15 s), so a failover takes a few seconds."""
    cluster = RedisCluster(replicas=1, node_timeout_ms=1000)
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
async def store(replicated_cluster, monkeypatch):
    """A cluster store on it that waits long enough for any failover: how long one takes
    depends on the machine's load, and the tests check the waiting, not Direct.WAIT_SECONDS's
    5 s."""
    monkeypatch.setattr(Direct, "WAIT_SECONDS", 30.0)
    s = open_store(replicated_cluster.url)
    yield s
    await s.close()


async def kill(cluster, victim: int) -> None:
    """Primary `victim` killed once its replica has every write, and its connections seen
    closed by the event loop (as they would be long before the next request in a real proxy;
    a call written on one before that is a reply lost, which fails by design: it may have run,
    and the ledger undoes it by id)."""
    cluster.replicated(victim)
    cluster.kill(victim)
    await asyncio.sleep(0.1)


@pytest.mark.parametrize("redis_py_dropped_its_map", [False, True])
async def test_calls_of_a_killed_primarys_orgs_wait_for_its_replica_and_count_exactly(
        replicated_cluster, store, redis_py_dropped_its_map):
    org = ORGS[0]
    for i in range(3):
        assert (await store.reserve(f"warm-{i}", plan(org), 5, 1, NOW_MS, False)).status is Status.ADMITTED
    victim = home(store, org)
    other = next(o for o in ORGS if home(store, o) != victim)       # an org on a node that lives
    # registered before (the tenant set's SADD goes by redis-py, on the deployment's slot)
    assert (await store.reserve("other-warm", plan(other), 5, 1, NOW_MS, False)).status is Status.ADMITTED
    await kill(replicated_cluster, victim)
    if redis_py_dropped_its_map:
        # A plain command of redis-py's own (a read, the sweeper) meets the dead node first:
        # redis-py drops its slot map, and the calls go by its path until it is read again.
        with pytest.raises(RedisConnectionError):
            await store._r.execute_command("GET", f"{{bp:{org}}}:x")
        assert store._r._initialize
    started = time.monotonic()
    out = await asyncio.gather(*(store.reserve(f"during-{i}", plan(org), 5, 1, NOW_MS, False) for i in range(8)),
                               store.reserve("other-org", plan(other), 5, 1, NOW_MS, False),
                               return_exceptions=True)
    waited = time.monotonic() - started
    assert [getattr(x, "status", x) for x in out] == [Status.ADMITTED] * 9
    assert waited > 0.5 and store._calls.tried_again > 0        # they did wait for the failover
    assert home(store, org) != victim                            # now served by the promoted replica
    # Exact: the 3 reserves before the kill (replicated) and the 8 during it, each once.
    assert (await store.snapshot(plan(org)[:1]))[0][:2] == (0, 55)


async def test_a_new_orgs_first_request_waits_out_a_failover_of_the_tenant_sets_primary(replicated_cluster, store):
    # The tenant set ({bp}:tenants, the deployment's slot) is named before an org's first
    # reservation, by redis-py: its primary killed, a new org's first request waits for the
    # replica too (Direct.waited) instead of failing.
    assert (await store.reserve("warm", plan(ORGS[0]), 5, 1, NOW_MS, False)).status is Status.ADMITTED
    victim = store._r.nodes_manager.get_node_from_slot(store._r.keyslot(tenants_key("bp"))).port
    new = next(o for o in ORGS[1:] if home(store, o) != victim)   # its own counters on a live node
    await kill(replicated_cluster, victim)
    assert (await store.reserve("first", plan(new), 5, 1, NOW_MS, False)).status is Status.ADMITTED
    assert store._calls.tried_again > 0
    assert set(await store._r.smembers(tenants_key("bp"))) >= {ORGS[0].encode(), new.encode()}


async def test_the_default_node_killed_fails_no_call_of_the_orgs_on_live_nodes(replicated_cluster, store):
    # redis-py's default node (its first primary) killed, and redis-py's map dropped by a plain
    # command of its own during the cluster's fail state: the orgs on live nodes wait out the
    # CLUSTERDOWN and go on, never through RedisCluster.initialize (which the dead default node
    # fails, closing every connection of the client).
    cluster = replicated_cluster
    await store.reserve("warm", plan(ORGS[0]), 5, 1, NOW_MS, False)
    victim = store._r.nodes_manager.default_node.port
    live = [o for o in ORGS if home(store, o) != victim]
    for o in live:
        assert (await store.reserve(f"warm-{o}", plan(o), 1, 0, NOW_MS, False)).status is Status.ADMITTED
    await kill(cluster, victim)
    other = next(p for p in cluster.ports if p != victim)
    deadline = time.monotonic() + 20
    while "cluster_state:fail" not in cluster.command(other, "CLUSTER", "INFO") and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    try:
        await store._r.execute_command("GET", f"{{bp:{live[0]}}}:x")
    except RedisError:
        pass
    else:       # the failover was over before the GET (a slow machine): drop the map as it would
        store._r._initialize = True
    assert store._r._initialize
    outcomes = []
    end = time.monotonic() + 4
    n = 0
    while time.monotonic() < end:
        outcomes += await asyncio.gather(*(store.reserve(f"r-{n + j}", plan(live[j % len(live)]), 0, 0, NOW_MS, False)
                                           for j in range(8)), return_exceptions=True)
        n += 8
    assert outcomes and [getattr(x, "status", x) for x in outcomes] == [Status.ADMITTED] * len(outcomes)
