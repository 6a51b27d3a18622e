"""The Redis Cluster store beyond the shared contract: its URL, its failures, its key layout."""

from __future__ import annotations

import time

import pytest

from proxy.errors import ConfigError, StoreUnavailable
from proxy.stores import Counter, open_store
from proxy.stores.cluster import parse_cluster_url
from tests.redis_server import free_port

NOW_MS = int(time.time() * 1000) + 86_400_000


def test_cluster_url_lists_start_up_nodes_and_credentials():
    assert parse_cluster_url("redis+cluster://a:7000,b.example:7001/0") == ([("a", 7000), ("b.example", 7001)], None, None)
    assert parse_cluster_url("redis+cluster://bob:p%40ss@10.0.0.1:6379") == ([("10.0.0.1", 6379)], "bob", "p@ss")
    with pytest.raises(ConfigError, match=r"store: expected redis\+cluster://host:port\[,host:port…\], got 'a' "):
        parse_cluster_url("redis+cluster://a:7000,a")


async def test_an_unreachable_cluster_is_store_unavailable():
    store = open_store(f"redis+cluster://127.0.0.1:{free_port()}")
    cs = [Counter("{bp}:w:test", "test:0", 1, -1, NOW_MS)]
    started = time.monotonic()
    with pytest.raises(StoreUnavailable, match="redis reserve failed"):
        await store.reserve("a", cs, 1, 1, NOW_MS, False)
    with pytest.raises(StoreUnavailable, match="redis snapshot failed"):
        await store.snapshot(cs)
    assert time.monotonic() - started < 10
    await store.close()
