"""Connecting to a Redis Cluster: `redis+cluster://[user:password@]host:port[,host:port…]`.

The listed nodes are start-up nodes; redis-py's cluster client discovers the rest and follows
MOVED/ASK redirections. redis-py refuses EVALSHA inside a cluster pipeline, so script calls go
out through `Direct`: batched per org under load, and a flush's calls pipelined per node on one
of that node's pooled connections (one write, one read), routed by the client's slot map;
whatever the slot map got wrong (a redirection) goes again through the client's own
redirect-following path, but an ASK to the importing node with ASKING in the same write
(`Direct._part`); a call whose node could not be reached waits for the map to name another
(a failover) and goes again (`Direct.call`).
"""

from __future__ import annotations

import asyncio
from urllib.parse import unquote

from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.exceptions import (AskError, AuthenticationError, AuthorizationError, ClusterDownError, MovedError,
                              NoScriptError, RedisClusterException, ResponseError, TryAgainError)
from redis.exceptions import ConnectionError as RedisConnectionError

from .redis import _FAILURES, _c_pack, _Coalescer, _Lane

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
    each node's pool holds both (a command, or a script round trip's exchange with one node,
    uses one connection on one node; a pipeline at most one per node). The two gates are separate because a pipeline re-sends a redirected command
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

    async def exchange(self, node: ClusterNode, commands: list[tuple], replies: list) -> None:
        """Send `commands` to `node` as ONE write on one of its pooled connections and append
        their replies to `replies` in order (an error reply as its exception), holding one
        command slot: what a cluster pipeline does for one node, which redis-py refuses for
        EVALSHA. `Unsent` when no connection could be made (nothing was written); any other
        failure leaves in `replies` what was read: the rest may or may not have run."""
        async with self._commands:
            conn = node.acquire_connection()
            try:
                await _usable(node, conn)
                await conn.send_packed_command(_packed(conn, commands), check_health=False)
                for _ in commands:
                    try:
                        replies.append(await conn.read_response())
                    except ResponseError as exc:
                        replies.append(exc)
            finally:
                node.release(conn)


class _NoScriptOn(NoScriptError):
    """A NOSCRIPT reply and the node that gave it (asked: after an ASKING)."""

    def __init__(self, node: ClusterNode, asking: bool, reply: NoScriptError) -> None:
        super().__init__(*reply.args)
        self.node, self.asking = node, asking


class Unsent(RedisConnectionError):
    """No connection to the node (`node_name`) could be made: nothing of an exchange was
    written. A Redis connection error, so a call that still meets it when its wait is over fails
    as every Redis failure does (StoreUnavailable)."""

    def __init__(self, message: str, node_name: str) -> None:
        super().__init__(message)
        self.node_name = node_name


# Connection errors that waiting does not mend (a wrong password, a user without rights).
_FINAL = (AuthenticationError, AuthorizationError)


async def _usable(node: ClusterNode, conn) -> None:
    """`conn` connected and clean, as the single-node store's pool makes sure before a use: a
    pooled connection the server closed (a restarted or killed node: the check sees its EOF) or
    with stray data is dropped and made again, so a command is only written where it can be
    answered. Unsent if the connection cannot be made."""
    try:
        await node.disconnect_if_needed(conn)            # marked by redis-py after a topology change
        if conn.is_connected and await conn.can_read():
            await conn.disconnect()
    except _FAILURES:                                   # closed under us: connect afresh
        await conn.disconnect()
    try:
        await conn.connect()
    except _FINAL:
        raise
    except _FAILURES as exc:
        raise Unsent(f"{node.name}: {exc}", node.name) from exc


def _packed(conn, commands: list[tuple]) -> list[bytes]:
    """The commands packed by hiredis's C packer (as the single-node store's `_CPacked` does;
    the cluster client's connections use the default UTF-8 encoding), else by redis-py."""
    if _c_pack is not None:
        try:
            return [_c_pack(c) for c in commands]
        except TypeError:
            pass
    return conn.pack_commands(commands)


def _asking(commands: list[tuple]) -> list[tuple]:
    """Each command after an ASKING, which lets the importing node of a migrating slot run it."""
    return [c for command in commands for c in (("ASKING",), command)]


def tenant_of(keys: list) -> str:
    """The hash tag of a call's first key (`{<tag>}:…`): every key of a cluster store's reserve
    or settle call carries its org's tag (cluster.py), so calls with one tag share a slot."""
    return keys[0].partition("}")[0]


# Error replies of a command that did not run where the slot map sent it (MOVED and ASK: the
# slot is elsewhere or moving): sent again through execute_command, which follows them.
_ELSEWHERE = AskError                            # AskError covers MovedError
# Error replies of a command that did not run and cannot yet anywhere: TRYAGAIN (its keys are
# split by a migration in progress), CLUSTERDOWN (its slot is not served, during a failover or
# a resharding gone wrong). The caller's to wait out (Direct.call), outside the flush; not
# through execute_command, whose CLUSTERDOWN handling closes every connection of the client
# (redis-py 8.1 RedisCluster.aclose) at each attempt: every node reconnects, and an exchange out
# on another node loses its connection.
_NOT_YET = (TryAgainError, ClusterDownError)


# What a script call waits out (Direct.call): the not-yet replies, and a node it could not reach.
_CALL_WAITS = (*_NOT_YET, Unsent)


class Direct(_Coalescer):
    """The Redis store's coalescer on a cluster: the same in-flight rule, batches and error
    fan-out, but a batch only holds calls of one org (one hash tag, so one slot: never
    CROSSSLOT), a NOSCRIPT loads the script on the call's node only, and a round trip's script
    calls go out per node: each node's calls as one pipelined write on one of its connections,
    the nodes at once, each node's callers answered as soon as its replies are read. With many
    orgs a flush is many single-org calls; one exchange per node pays redis-py's per-call cost
    and a round trip once per node instead of once per call. GatedCluster bounds the
    connections in use.

    The single store's rule ("one batch out under load", FLUSH_BELOW), kept per node: each node
    is a lane of its own (`lane_of`, by the slot map's node for the call's first key), with its
    calls out, its flushes out and its queue. Kept for the whole cluster, one frozen node (a
    partition, a paused VM, before failover) held every org's calls behind the flush carrying
    its call, for its timeouts (up to 20 s, bench/frozen_node.py); so the cluster used the
    plain in-flight rule instead, and batched less than one Redis (0.36 script calls a request
    against 0.10). Per node, a frozen node holds its own lane, and the other nodes batch as one
    Redis does (tests/stores/test_cluster_pipeline.py, the frozen-node tests). A flush's calls
    still go per node (`_routes`): a lane chosen on a map that has changed since (a resharding,
    a failover) may hold calls for several nodes, each answered when its node replies."""

    WAIT_SECONDS = 5.0          # how long a call answered TRYAGAIN or CLUSTERDOWN (or Unsent) is sent again
    RELEARN_SECONDS = 0.5       # the slot map is read again at most this often for calls that found a node down

    def __init__(self, client: RedisCluster, tasks, batch, kinds) -> None:
        super().__init__(client, tasks, batch, kinds, group=tenant_of)
        self._slots: dict[str, int] = {}           # hash tag -> slot
        self._node_lanes: dict[str | None, _Lane] = {}   # node name (None: no map yet) -> its lane
        self._ready = False
        self._starting = asyncio.Lock()
        self.tried_again = 0            # calls sent again after a TRYAGAIN or CLUSTERDOWN (tests)
        self._relearning: asyncio.Future | None = None      # the slot map's reading in progress
        self._relearned_at = float("-inf")

    async def call(self, script, keys: list, args: list, tail: tuple = ()):
        """A call answered TRYAGAIN or CLUSTERDOWN did not run. TRYAGAIN: its slot is migrating
        and its keys are on both sides, or on one side with a new key (a reserve's record) that
        could go to either; that lasts until the operator's resharding has moved every key of
        the slot, seconds for an org with many keys (a record per recent request), where
        redis-py's own retries gave up after ~0.4 s. CLUSTERDOWN: its slot is not served (a
        primary lost, not yet failed over). So the call is sent again, with backoff (10 ms
        doubling to 200 ms), for up to WAIT_SECONDS, then fails as before (StoreUnavailable,
        having run nowhere). Waiting here, not in the flush: the flush answered it at once and
        freed its in-flight slot, so other orgs' calls never queue behind it.

        Unsent (no connection to the node the slot map gives could be made, so nothing was
        written): its primary died, or it left the cluster. The slot map is read again
        (`_relearn`) and the call sent again the same way, for the same WAIT_SECONDS: a failover
        promotes a replica once the cluster has marked the primary failed (cluster-node-timeout,
        then an election: 2.6 s at a node timeout of 1 s here), and until then the other nodes
        still name the dead primary. Before, the call went through redis-py, whose two retries
        gave up within a few tens of ms: every call of the shard's orgs failed (503) for the
        whole failover. A failover slower than WAIT_SECONDS still fails them after it."""
        if not self._ready:
            await self._start()
        return await self.waited(lambda: _Coalescer.call(self, script, keys, args, tail), _CALL_WAITS)

    async def waited(self, send, waits: tuple[type[BaseException], ...]):
        """`await send()`, sent again after any of `waits` with backoff (10 ms doubling to 200
        ms) until WAIT_SECONDS after it was first sent (an attempt that took long, a connect
        timeout to a host that does not answer, counts), then that error raised; after an
        Unsent (or a connection error, when `waits` names it) the slot map is read again first
        (`_relearn`). A wrong password or missing rights is raised at once. For a script call
        (`call`), and for redis-py commands that may run twice (`cluster.py`: the tenant set's
        SADD, by redis-py on the deployment's slot, which a failover of that slot's primary
        would otherwise fail: a new org's first request)."""
        deadline, delay = self._tasks.loop().time() + self.WAIT_SECONDS, 0.01
        while True:
            try:
                return await send()
            except _FINAL:
                raise
            except waits as exc:
                if self._tasks.loop().time() >= deadline:
                    raise
                if isinstance(exc, RedisConnectionError):       # Unsent is one
                    await self._relearn(getattr(exc, "node_name", None))
                now = self._tasks.loop().time()
                if now >= deadline:
                    raise
            await asyncio.sleep(min(delay, deadline - now))
            delay = min(delay * 2, 0.2)
            self.tried_again += 1

    async def _relearn(self, failed: str | None = None) -> None:
        """The slot map read again from the cluster, for the calls that found their node down:
        one reading at a time, shared by the calls that wait for it (a task of the store's, so
        shutdown drains it), and at most one every RELEARN_SECONDS (redis-py marks every pooled
        connection for a lazy reconnect at each reading). The node that failed (`failed`) is
        asked last: until the failover it is still a start-up node, and one that does not
        answer would hold the reading for its connect timeout. Read through the nodes manager,
        not RedisCluster.initialize, which closes every connection of the client when a reading
        fails; a reading that fails leaves the map as it was, and the calls' next attempts
        meet the same node down and wait on. A good reading also clears redis-py's flag that
        it must read the map again (`_initialize`, set after a failure on its own path), which
        the lanes go by (`lane_of`)."""
        pending = self._relearning
        if pending is None or pending.done():
            now = self._tasks.loop().time()
            if now - self._relearned_at < self.RELEARN_SECONDS:
                return
            self._relearned_at = now
            pending = self._relearning = self._tasks.spawn(self._read_map(failed))
        await asyncio.shield(pending)

    async def _read_map(self, failed: str | None) -> None:
        try:
            await self._r.nodes_manager.initialize(last_failed_node_name=failed)
        except _FAILURES:
            return
        self._r._initialize = False

    def lane_of(self, keys: list) -> _Lane:
        """The lane of the node the slot map gives the call's keys (one tag: one slot); a lane
        of its own for calls whose slot has no node yet (no map, or a slot not covered)."""
        node = None if self._r._initialize else self._node_of(keys[0])
        name = node.name if node is not None else None
        lane = self._node_lanes.get(name)
        if lane is None:
            lane = self._node_lanes[name] = _Lane()
        return lane

    def _lanes(self):
        return (self._lane, *self._node_lanes.values())

    def _routes(self, commands: list[tuple]) -> list[tuple[ClusterNode | None, list[int]]]:
        """`commands` grouped by the node the client's slot map gives their first key's slot;
        None: the commands to send through execute_command (the slot is not covered). A map
        redis-py marked to be read again (after a failure on its own path) is still the best
        guess: a command it sends to the wrong node is redirected or Unsent, and both are
        handled (`_part`, `call`)."""
        by_node: dict = {}
        for i, c in enumerate(commands):
            by_node.setdefault(self._node(c), []).append(i)
        return list(by_node.items())

    def _node(self, command: tuple) -> ClusterNode | None:
        """The node the client's slot map gives a script call's first key (None: not covered)."""
        return self._node_of(command[3]) if command[0] == "EVALSHA" and command[2] else None

    def _node_of(self, key: str) -> ClusterNode | None:
        """The node the client's slot map gives `key`'s slot (None: not covered). The slot is
        kept per hash tag: every key of a script call carries its org's (cluster.py), so a
        call and its flush compute it once per org, not per call."""
        tag = tenant_of((key,)) if key[:1] == "{" and key.find("}") > 1 else None
        slot = self._slots.get(tag) if tag is not None else None
        if slot is None:
            slot = self._r.keyslot(key)
            if tag is not None:
                if len(self._slots) >= 65536:
                    self._slots.clear()
                self._slots[tag] = slot
        try:
            return self._r.nodes_manager.get_node_from_slot(slot)
        except RedisClusterException:                  # the slot is not covered (yet)
            return None

    async def _part(self, node: ClusterNode | None, commands: list[tuple], asking: bool = False) -> list:
        """The replies to `commands` (an error as its exception, in its place): one exchange
        with `node`. A command that could not be sent (no connection to the node) is answered
        Unsent, which its caller waits out (`call`: the node died or left). A command with no
        node (its slot not covered) or that the map sent to the wrong node (a redirection: it
        did not run) goes again through execute_command, which follows redirections, refreshes
        the map and retries;
        but an ASK (its slot is migrating and its keys are on the importing node) goes to that
        node with ASKING before it in the same write (`asking`), as ASKING admits only the next
        command on its connection: redis-py's execute_command sends the two on two of the
        node's pooled connections when it has several free, and the importing node then
        answers MOVED until the request's TTL runs out (redis-py 8.1).

        A command whose reply was lost (the connection failed after the write) may have run: it
        is not resent but fails with that error (StoreUnavailable to its caller), as on the
        single-node store, whose callers undo a lost reserve by id and retry a lost settle
        (idempotent by id). A command sent through execute_command is resent by redis-py's own
        retry after a timeout; still exact: a reserve that ran answers DUPLICATE, a settle that
        ran 0. The flush answers each node's callers when this returns (_Coalescer._answer_part),
        so a frozen node holds only its own."""
        if node is None:
            return await self._resent(commands)
        replies: list = []
        lost = None
        try:
            await self._r.exchange(node, _asking(commands) if asking else commands, replies)
        except Unsent as exc:                            # nothing was written: the caller waits it out (call)
            return [exc] * len(commands)
        except Exception as exc:                         # noqa: BLE001 - given to the unanswered calls
            lost = exc
            # As redis-py does on a failed node: its other connections are suspect, reconnect them.
            node.update_active_connections_for_reconnect()
            await node.disconnect_free_connections()
        if asking:
            replies = replies[1::2]                      # each command's reply, after its ASKING's OK
        redirected: dict = {}
        for i, reply in enumerate(replies):
            if isinstance(reply, _ELSEWHERE):            # None: execute_command (so too after an ASKING)
                redirected.setdefault(None if asking else self._asked(reply), []).append(i)
            elif isinstance(reply, NoScriptError):       # where to load the script (_reload)
                replies[i] = _NoScriptOn(node, asking, reply)
        replies += [lost] * (len(commands) - len(replies))
        if redirected:
            again = await asyncio.gather(*(self._part(to, [commands[i] for i in at], asking=to is not None)
                                           for to, at in redirected.items()))
            for at, got in zip(redirected.values(), again):
                for i, reply in zip(at, got):
                    replies[i] = reply
        return replies

    def _asked(self, reply: Exception) -> ClusterNode | None:
        """The node an ASK reply sends its command to; None for any other redirection (MOVED,
        which execute_command follows and patches the map with) or a node the client does not
        know."""
        if isinstance(reply, MovedError) or not isinstance(reply, AskError):
            return None
        return self._r.get_node(reply.host, reply.port)

    async def _reload(self, script, keys: list, args: list, reply: NoScriptError):
        """A call answered NOSCRIPT (a failover to a fresh replica, SCRIPT FLUSH): the script
        loaded on the node that answered only, and the call sent there again (with ASKING if it
        was asked). redis-py's script object loads it on every primary and waits for each, so
        one frozen primary failed every node's reload; it still takes a NOSCRIPT that came
        through execute_command (the node is not known) or a second one."""
        if not isinstance(reply, _NoScriptOn):
            return await script(keys=keys, args=args)
        await self._r.execute_command("SCRIPT LOAD", script.script, target_nodes=reply.node)
        reply, = await self._part(reply.node, [("EVALSHA", script.sha, len(keys), *keys, *args)], reply.asking)
        if isinstance(reply, NoScriptError):
            return await script(keys=keys, args=args)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _resent(self, commands: list[tuple]) -> list:
        return await asyncio.gather(*(self._r.execute_command(*c) for c in commands), return_exceptions=True)

    async def _round_trip(self, commands: list[tuple]) -> list:
        """The replies to `commands` (a single call's, `_one`): each node's part at once."""
        routes = self._routes(commands)
        if len(routes) == 1:
            return await self._part(routes[0][0], commands)
        replies: list = [None] * len(commands)

        async def part(node, at: list[int]) -> None:
            for i, reply in zip(at, await self._part(node, [commands[i] for i in at])):
                replies[i] = reply
        await asyncio.gather(*(part(node, at) for node, at in routes))
        return replies

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
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
        # A MOVED patches the one slot in the map (redis-py's default also closes EVERY
        # connection, in use or not, at every 5th MOVED to re-learn the whole map: during a
        # resharding that would cut the replies of Direct's exchanges out on other nodes, which
        # then fail as lost). Connection failures and CLUSTERDOWN still re-learn it all.
        reinitialize_steps=0)
