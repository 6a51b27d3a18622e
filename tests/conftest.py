from __future__ import annotations

import pytest

from proxy.stores import open_store
from proxy.tokens import TokenCounter

from . import harness
from .redis_cluster import RedisCluster
from .redis_server import RedisServer


@pytest.fixture(scope="session")
def redis_server():
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    if redis_server.proc is None:       # a test stopped it and failed before restarting
        redis_server.start()
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_cluster():
    cluster = RedisCluster()
    cluster.start()
    yield cluster
    cluster.stop()


@pytest.fixture
def cluster_url(redis_cluster):
    redis_cluster.flush()
    return redis_cluster.url


@pytest.fixture(scope="session")
def tokens():
    return TokenCounter.load()


_STORE_URLS = {"memory": lambda request: "memory://",
               "redis": lambda request: request.getfixturevalue("redis_url"),
               "cluster": lambda request: request.getfixturevalue("cluster_url")}


@pytest.fixture(params=list(_STORE_URLS))
def store_url(request):
    """A store URL for e2e tests: the embedded store, a real redis-server, a real Redis Cluster."""
    return _STORE_URLS[request.param](request)


@pytest.fixture(params=list(_STORE_URLS))
async def store(request):
    """Each store on a fresh database: embedded, a real redis-server, a real Redis Cluster."""
    s = open_store(_STORE_URLS[request.param](request))
    yield s
    await s.close()


@pytest.fixture
async def start_proxy(tokens):
    """A factory: `await start_proxy(store_url, policy, **kw)` starts a fake upstream and a proxy
    in front of it (see harness.start). Every proxy it started is stopped after the test, after
    asserting that no counter of any scope still holds a reservation."""
    started: list[harness.Harness] = []

    async def start(store_url: str, policy: dict | None = None, **kw) -> harness.Harness:
        h = await harness.start(store_url, policy or {}, tokens, **kw)
        started.append(h)
        return h

    yield start
    for h in started:
        await harness.stop(h)
