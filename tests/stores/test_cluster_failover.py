"""A primary killed on a Redis Cluster with replicas: the calls of the orgs it served wait for a
replica to take its slots (cluster_client.Direct.call), then run there, counted exactly."""

from __future__ import annotations

import asyncio
import time

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

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


@pytest.mark.parametrize("redis_py_dropped_its_map", [False, True])
async def test_calls_of_a_killed_primarys_orgs_wait_for_its_replica_and_count_exactly(
        replicated_cluster, monkeypatch, redis_py_dropped_its_map):
    # How long a failover takes depends on the machine's load: the test checks the waiting, not
    # Direct.WAIT_SECONDS's 5 s.
    monkeypatch.setattr(Direct, "WAIT_SECONDS", 30.0)
    cluster = replicated_cluster
    store = open_store(cluster.url)
    org = ORGS[0]
    try:
        for i in range(3):
            assert (await store.reserve(f"warm-{i}", plan(org), 5, 1, NOW_MS, False)).status is Status.ADMITTED
        victim = home(store, org)
        other = next(o for o in ORGS if home(store, o) != victim)       # an org on a node that lives
        # registered before (the tenant set's SADD goes by redis-py, on the deployment's slot)
        assert (await store.reserve("other-warm", plan(other), 5, 1, NOW_MS, False)).status is Status.ADMITTED
        assert cluster.command(victim, "WAIT", "1", "5000") == "1"      # its replica has every write
        cluster.kill(victim)
        # The event loop sees the dead node's connections closed (as it would have long before
        # the next request in a real proxy); a call written on one before that is a reply lost,
        # which fails by design (it may have run: the ledger undoes it by id).
        await asyncio.sleep(0.1)
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
    finally:
        await store.close()
