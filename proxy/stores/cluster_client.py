"""Connecting to a Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port…]`.

The listed nodes are start-up nodes; redis-py's cluster client discovers the rest and follows
MOVED/ASK redirections. redis-py refuses EVALSHA inside a cluster pipeline, so script calls go
out one by one (`Direct`), bounded and after the slot map is known.
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

SCHEME = "redis+cluster://"


def parse_cluster_url(url: str) -> tuple[list[tuple[str, int]], str | None, str | None]:
    """(start-up nodes, username, password) of `redis+cluster://[user:password@]h:p[,h:p…][/0]`;
    ValueError naming what is wrong (see proxy.stores.url_problem)."""
    rest = url[len(SCHEME):].split("/", 1)[0]
    user = password = None
    if "@" in rest:
        auth, rest = rest.rsplit("@", 1)
        user, _, password = auth.partition(":")
        user, password = unquote(user) or None, unquote(password) or None
    nodes = []
    for part in rest.split(","):
        host, _, port = part.strip().rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"expected {SCHEME}host:port[,host:port…] ({part.strip()!r} is not host:port)")
        nodes.append((host.strip("[]"), int(port)))
    return nodes, user, password


# Connections per node beyond the script calls' own, for the pipelined reads (sweeper, snapshot).
_SPARE_CONNECTIONS = 8


class Direct:
    """Script calls one by one as the Redis store's `_Coalescer` takes them, without batching.

    At most `limit` calls are out at once: redis-py's cluster client fails a call outright
    (MaxConnectionsError) when a node's pool is exhausted, where the single-node store's blocking
    pool waits; a burst of requests must wait its turn, not fail."""

    tasks: set = frozenset()

    def __init__(self, client: RedisCluster, limit: int) -> None:
        self._r = client
        self._slots = asyncio.Semaphore(limit)
        self._ready = False
        self._starting = asyncio.Lock()

    async def call(self, script, keys: list, args: list):
        if not self._ready:
            await self._start()
        async with self._slots:
            return await script(keys=keys, args=args)

    async def ready(self) -> None:
        if not self._ready:
            await self._start()

    async def _start(self) -> None:
        # Learn the slot map once before the first burst: redis-py swaps its start-up node
        # objects for the discovered ones on initialisation and closes their connections, which
        # breaks calls already sent on them when a burst of first calls races the swap.
        async with self._starting:
            if not self._ready:
                await self._r.initialize()
                self._ready = True


def connect(url: str, max_connections: int) -> RedisCluster:
    """redis-py's cluster client for `url` (not connected until first used)."""
    nodes, user, password = parse_cluster_url(url)
    return RedisCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user, password=password,
        max_connections=max_connections + _SPARE_CONNECTIONS, socket_timeout=5, socket_connect_timeout=5,
        # Two retries (re-discovering the slots between them): a node that stops answering is
        # a StoreUnavailable within seconds, not after the default ten attempts.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))
