"""Connecting to a Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port…]`.

The listed nodes are start-up nodes; redis-py's cluster client discovers the rest and follows
MOVED/ASK redirections. redis-py refuses EVALSHA inside a cluster pipeline, so script calls go
out as single commands (`Direct`: batched per org under load, bounded, after the slot map is
known).
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from .redis import _Coalescer

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


# Pipelines (sweeper, snapshot, admin reads) out at once; each holds at most one connection per node.
_PIPELINES = 8


class GatedCluster(RedisCluster):
    """redis-py's cluster client, made to wait for a connection instead of failing.

    Its per-node pool raises MaxConnectionsError when every connection is busy, where the
    single-node store's blocking pool waits: a burst of first requests (each registering its
    org, drawing an allowance, reserving) must wait its turn, not fail with a 503. So every
    command waits for one of `commands` slots and every pipeline for one of `_PIPELINES`, and
    each node's pool holds both (a command uses one connection on one node; a pipeline at most
    one per node). The two gates are separate because a pipeline re-sends a redirected command
    through `execute_command` while it holds its own slot."""

    def __init__(self, *args, commands: int, **kwargs) -> None:
        super().__init__(*args, max_connections=commands + _PIPELINES, **kwargs)
        self._commands = asyncio.Semaphore(commands)
        self._pipelines = asyncio.Semaphore(_PIPELINES)

    async def execute_command(self, *args, **kwargs):
        async with self._commands:
            return await super().execute_command(*args, **kwargs)

    def pipeline(self, *args, **kwargs):
        pipe = super().pipeline(*args, **kwargs)
        run = pipe.execute

        async def execute(*a, **kw):
            async with self._pipelines:
                return await run(*a, **kw)
        pipe.execute = execute
        return pipe


def tenant_of(keys: list) -> str:
    """The hash tag of a call's first key (`{<tag>}:…`): every key of a cluster store's reserve
    or settle call carries its org's tag (cluster.py), so calls with one tag share a slot."""
    return keys[0].partition("}")[0]


class Direct(_Coalescer):
    """The Redis store's coalescer on a cluster: the same in-flight rule, batches, NOSCRIPT
    handling and error fan-out, but a batch only holds calls of one org (one hash tag, so one
    slot: never CROSSSLOT), and the script calls of a flush go out concurrently, each to the
    node owning its slot, through redis-py's cluster client (it follows MOVED/ASK and refuses
    EVALSHA in a cluster pipeline). GatedCluster bounds how many commands are out at once."""

    def __init__(self, client: RedisCluster, tasks, batch, kinds) -> None:
        super().__init__(client, tasks, batch, kinds, group=tenant_of)
        self._ready = False
        self._starting = asyncio.Lock()

    async def call(self, script, keys: list, args: list, tail: tuple = (), alone: bool = False):
        if not self._ready:
            await self._start()
        return await super().call(script, keys, args, tail, alone)

    async def _round_trip(self, commands: list[tuple]) -> list:
        """The replies to `commands` (an error as its exception, in its place), each sent as
        its own command to the node owning its keys' slot, all at once: the single-node store
        writes them on one connection, which a cluster's calls to several nodes cannot share."""
        return await asyncio.gather(*(self._r.execute_command(*c) for c in commands), return_exceptions=True)

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


def connect(url: str, max_connections: int) -> GatedCluster:
    """The cluster client for `url` (not connected until first used): at most `max_connections`
    commands out at once, the rest waiting."""
    nodes, user, password = parse_cluster_url(url)
    return GatedCluster(
        startup_nodes=[ClusterNode(h, p) for h, p in nodes], username=user, password=password,
        commands=max_connections, socket_timeout=5, socket_connect_timeout=5,
        # Two retries (re-discovering the slots between them): a node that stops answering is
        # a StoreUnavailable within seconds, not after the default ten attempts.
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2))
