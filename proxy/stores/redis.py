"""The Redis store: many proxy processes and machines share one Redis.

Scripts are `.lua` files shipped in this package, assembled and registered once (EVALSHA,
reloaded by redis-py on NOSCRIPT, so a `SCRIPT FLUSH` or a failover to a fresh replica changes
nothing). Each store operation is one round trip (script calls: the coalescer's own, on a pooled
connection, packed in C; docs/store.md "The client side"); under load, reserves and settles that wait for
one go out together as one batch script call (`_Coalescer`, docs/store.md "Batches"). A call
that times out or loses its connection is not retried on the spot (redis-py 8 takes the retry
policy from the pool's connections, which have none): the caller gets StoreUnavailable, a reserve
whose answer was lost is undone by id (`Ledger._undo`) and settles retry (`retry.until_stored`);
the scripts are idempotent by reservation id, so a retried call never counts twice. Every redis-py or OS error is wrapped into StoreUnavailable
once, by `_wrap_errors` on every public method, and never escapes upward.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from importlib import resources
from typing import Sequence

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import NoScriptError, RedisClusterException, RedisError, ResponseError

from ..errors import StoreUnavailable
from ..tasks import Tasks
from ..keys import LEASE_ANCHOR, WINDOW_MARKER, claim_key, leases_key, log_key, record_key
from . import wire as fmt
from .base import (LOG_LENGTH, OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS, Counter, Expired, LogEntry, Note,
                   ReserveOutcome, Store, Totals)

try:
    from hiredis import pack_command as _c_pack
except ImportError:                             # hiredis is a dependency (pyproject); stay correct without it
    _c_pack = None

# A batched call's own keys, before its plan's window keys: the record and the lease index, and
# for settle the log. A call naming an earlier call's plan sends only these (batch.lua).
OWN_KEYS = {"r": 2, "s": 3}

_FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)


def _script(name: str) -> str:
    return resources.files("proxy.stores").joinpath("lua", f"{name}.lua").read_text()


def _lua_constants() -> str:
    """Lua `local`s for the texts that proxy/keys.py defines, for a script to start with: the
    lease index's anchor member (LEASE_ANCHOR) and a window hash's marker value (WINDOW_MARKER)."""
    out = []
    for name, text in (("LEASE_ANCHOR", LEASE_ANCHOR), ("WINDOW_MARKER", WINDOW_MARKER)):
        if not (text.isascii() and text.isprintable()) or "'" in text or "\\" in text:
            raise ValueError(f"{name} must be printable ASCII without ' or \\ (a plain Lua string literal)")
        out.append(f"local {name} = '{text}'\n")
    return "".join(out)


LUA_CONSTANTS = _lua_constants()


def _assembled() -> dict[str, str]:
    """The texts of the reserve, settle and batch scripts, built once at import from the .lua
    files: reserve.lua and settle.lua define the bodies as functions over a few helpers, direct
    Redis commands for a single call (direct.lua), a per-batch cache in batch.lua (cached.lua);
    so the logic has one source and a batch runs exactly the single calls, in order. The two
    helper files start with the constants (LUA_CONSTANTS)."""
    direct, cached, plan = LUA_CONSTANTS + _script("direct"), LUA_CONSTANTS + _script("cached"), _script("plan")
    reserve, settle = _script("reserve"), _script("settle")
    return {"reserve": f"{direct}\n{plan}\n{reserve}\n"
                       "return reserve(KEYS, 1, ARGV, 1, reserve_plan(KEYS, 3, #KEYS - 2, ARGV, 8))\n",
            "settle": f"{direct}\n{plan}\n{settle}\n"
                      "return settle(KEYS, 1, ARGV, 1, settle_plan(KEYS, 4, #KEYS - 3, ARGV, 13))\n",
            "batch": f"{cached}\n{plan}\n{reserve}\n{settle}\n{_script('batch')}"}


SCRIPTS = _assembled()


class _CPacked:
    """A connection (mixed into the pool's connection class) that packs commands with hiredis's
    C packer. redis-py's asyncio connection packs every argument in Python (an encode call, a
    length and a join per argument: a batch script call carries a few hundred), which was about
    40 % of the client's CPU under load (bench/results/redis-client.md); the sync client already
    uses the C packer. Same bytes on the wire (UTF-8 strings, decimal numbers); an argument the C
    packer takes no form for (a memoryview; a bool or None, which redis-py refuses) goes to
    redis-py's packer, so it behaves exactly as before. Only for the default UTF-8/strict
    encoding: the C packer knows no other."""

    def pack_command(self, *args):
        if isinstance(args[0], str):            # "XINFO STREAM" and the like: one word an argument
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [_c_pack(args)]
        except TypeError:
            return super().pack_command(*args)


class _Lane:
    """The calls of one lane of a _Coalescer: round trips out (its single calls and flushes),
    flushes out, and the calls waiting for the next flush."""

    __slots__ = ("in_flight", "batches", "queue")

    def __init__(self) -> None:
        self.in_flight = 0
        self.batches = 0                # flushes out (batch.lua calls, or queued calls sent)
        self.queue: list[tuple[AsyncScript, list, list, tuple, asyncio.Future]] = []


class _Coalescer:
    """Script calls made while MAX_IN_FLIGHT round trips are already out (or, under load, while
    a batch is out or calls wait) wait, and then go together as ONE call of batch.lua, which
    runs them in order in one atomic script.

    Idle or at one connection nothing waits: a call goes out at once, as its own script. Under
    load, a batch pays redis-py's per-call cost (pool checkout, retry wrapper, timeouts, packing)
    once, and Redis's too: one EVALSHA, and each window hash (all the day's requests share it)
    read and written once per batch instead of once per call, so the server's time per request
    falls as load grows. Calls of scripts not in `kinds` (none from RedisStore) go out as their
    own EVALSHA in the same pipeline; so does a batch of one. Scripts are idempotent by
    reservation id, so a retried pipeline is safe; a NOSCRIPT (SCRIPT FLUSH, failover) loads the
    script and runs its call again (it did not run).

    `group` (the cluster's caller, cluster_client.Direct): a batch may only hold calls of one
    group (their keys in one slot); queued calls are split by group(keys), in order within each.

    The rule is kept per lane (`_Lane`: its calls out, its flushes out, its queue). One Redis is
    one lane; the cluster's caller gives each node its own (`lane_of`), so a node's calls wait
    only for that node's round trips, and a frozen node holds only its own calls.

    Within a batch, settles run before reserves (`settles_first`): the calls of a batch all
    waited at the same time, so any order of them is one they could have run in, except that a
    settle of an id stays after a reserve of that id in the same batch (the ledger's undo of a
    reserve whose caller went away). A settle reads nothing to decide, so batch.lua adds a run of
    settles up per plan and writes each field once (cached.lua `settle_later`), where a reserve
    between two settles made it write the fields for each: under load the proxy's batches mix
    commits and reserves about evenly (bench/redis_instructions.py `--mixed`).
    """

    MAX_IN_FLIGHT = 4
    # Under load (a batch is out, or calls wait) a call waits, and the queue goes out when a
    # round trip comes back and fewer than FLUSH_BELOW are out: about one batch is out at a
    # time, and it carries every call that came meanwhile (at 32 concurrent requests ~15 calls
    # instead of ~5: fewer round trips, and less Redis and client time a request). Otherwise a
    # call goes at once while fewer than MAX_IN_FLIGHT are out, so a few concurrent requests
    # never wait for each other (bench/results/lua-percall.md: a flat cap of 2 cost throughput
    # at 4 concurrent requests, which then waited for each other in batches of two). The price:
    # under load, a round trip that hangs holds the queue until its socket timeout (1 s), where
    # 3 other round trips could go on before. FLUSH_BELOW = MAX_IN_FLIGHT is the plain rule (a
    # call goes at once while fewer than MAX_IN_FLIGHT are out, nothing waits otherwise). The
    # cluster keeps this rule per node (its lanes, cluster_client.Direct), so one frozen node
    # holds only its own calls.
    FLUSH_BELOW = 2
    MAX_BATCH = 64          # sub-calls per batch script call: bounds how long one call holds Redis

    def __init__(self, client: aioredis.Redis, tasks: Tasks, batch: AsyncScript,
                 kinds: dict[AsyncScript, str], group=None) -> None:
        self._r = client
        self._group = group             # keys -> the group a call may be batched with (None: one)
        self._lane = _Lane()            # the one lane, unless lane_of gives others
        self._tasks = tasks             # the flushes run there: the app drains them before closing us
        self._batch = batch
        self._kinds = kinds             # script -> its kind in batch.lua ("r", "s")
        self.batched = 0                # calls that went through batch.lua (tests, benchmarks)

    async def call(self, script: AsyncScript, keys: list, args: list, tail: tuple = ()):
        """Run `script` on `keys` and the arguments `args` followed by `tail`. The tail is the
        part that calls of one plan share (the same tuple object, see RedisStore._wired): a
        batch sends it once, later calls of the batch name the first that carried it."""
        lane = self._lane if self.lane_of is None else self.lane_of(keys)
        loaded = self.FLUSH_BELOW < self.MAX_IN_FLIGHT and (lane.queue or lane.batches)
        if lane.in_flight < self.MAX_IN_FLIGHT and not loaded:
            lane.in_flight += 1
            try:
                return await self._one(script, keys, [*args, *tail] if tail else args)
            finally:
                self._done(lane)
        fut = self._tasks.loop().create_future()
        lane.queue.append((script, keys, args, tail, fut))
        return await fut

    lane_of = None                      # keys -> their lane (cluster_client.Direct); None: one lane

    def _done(self, lane: _Lane) -> None:
        lane.in_flight -= 1
        if lane.queue and lane.in_flight < min(self.FLUSH_BELOW, self.MAX_IN_FLIGHT):
            batch, lane.queue = lane.queue, []
            lane.in_flight += 1
            lane.batches += 1
            self._tasks.spawn(self._flush(batch, lane))

    def _lanes(self):
        return (self._lane,)

    @property
    def _queue(self) -> list:
        """Every lane's waiting calls (tests)."""
        return [item for lane in self._lanes() for item in lane.queue]

    @property
    def _batches(self) -> int:
        """Flushes out, over every lane (tests)."""
        return sum(lane.batches for lane in self._lanes())

    async def _one(self, script: AsyncScript, keys: list, args: list):
        """One script call, as its own round trip; a NOSCRIPT (SCRIPT FLUSH, failover: it did not
        run) goes to redis-py's script object, which loads the script and runs the call again."""
        reply, = await self._round_trip([("EVALSHA", script.sha, len(keys), *keys, *args)])
        if isinstance(reply, NoScriptError):
            return await self._reload(script, keys, args, reply)
        if isinstance(reply, BaseException):
            raise reply
        return reply

    async def _reload(self, script: AsyncScript, keys: list, args: list, reply: NoScriptError):
        """A call answered NOSCRIPT (`reply`; SCRIPT FLUSH, failover: it did not run), run by
        redis-py's script object, which loads the script and runs the call again."""
        return await script(keys=keys, args=args)

    async def _round_trip(self, commands: list[tuple]) -> list:
        """The replies to `commands`, sent together on one pooled connection (an error reply as
        its ResponseError, in its place): what a non-transactional pipeline does, without its
        per-call layers (the pipeline object, observability hooks, field-set preparation). The
        failure handling is redis-py's own: the blocking pool's checkout (waits up to the pool
        timeout), the connection's socket timeout and disconnect on a failed or cancelled read
        or write, and the connection's Retry (it disconnects, backs off, resends; scripts are
        idempotent by reservation id)."""
        pool = self._r.connection_pool
        conn = await pool.get_connection()
        try:
            return await conn.retry.call_with_retry(lambda: _exchange(conn, commands), lambda _: conn.disconnect())
        finally:
            await pool.release(conn)

    def _calls(self, batch) -> list[tuple[AsyncScript, list, list, list[asyncio.Future]]]:
        """The script calls that carry `batch`: runs of batchable calls (up to MAX_BATCH) as one
        batch.lua call each, the others (and a run of one) as themselves."""
        out = []
        run: list = []

        def close_run() -> None:
            if len(run) == 1:
                script, keys, args, tail, fut = run[0]
                out.append((script, keys, [*args, *tail], [fut]))
            elif run:
                run[:] = self.settles_first(run)
                keys, args, carried = [], [], {}        # id(tail) -> the call that carried it (1-based)
                for i, (script, k, a, tail, _) in enumerate(run, 1):
                    first = carried.get(id(tail)) if tail else None
                    kind = self._kinds[script]
                    if first is None:
                        keys += k
                        args += (kind, len(k), len(a), len(tail), *a, *tail)
                        carried[id(tail)] = i
                    else:                               # its own keys; the plan's window keys were sent
                        keys += k[:OWN_KEYS[kind]]
                        args += (kind, OWN_KEYS[kind], len(a), -first, *a)
                out.append((self._batch, keys, args, [fut for *_, fut in run]))
                self.batched += len(run)
            run.clear()

        for part in self._grouped(batch):
            for item in part:
                if item[0] in self._kinds:
                    run.append(item)
                    if len(run) == self.MAX_BATCH:
                        close_run()
                else:
                    close_run()
                    script, keys, args, tail, fut = item
                    out.append((script, keys, [*args, *tail], [fut]))
            close_run()
        return out

    def settles_first(self, run: list) -> list:
        """The calls of one batch in the order they run: settles first, then reserves, each in
        their order, but a settle of an id reserved earlier in the batch stays after it (among
        the reserves, in its place). Each call's id is its first argument."""
        kinds = self._kinds
        settles, rest, reserving = [], [], set()
        for item in run:
            rid = item[2][0]
            if kinds[item[0]] == "r":
                reserving.add(rid)
                rest.append(item)
            elif rid in reserving:
                rest.append(item)
            else:
                settles.append(item)
        return settles + rest if settles and rest else run

    def _grouped(self, batch) -> list:
        if self._group is None:
            return [batch]
        parts: dict = {}
        for item in batch:
            parts.setdefault(self._group(item[1]), []).append(item)
        return list(parts.values())

    def _routes(self, commands: list[tuple]) -> list[tuple[object, list[int]]]:
        """`commands` split into the parts that travel apart, each (its route, its positions):
        on one Redis, one part, the whole flush on one connection (cluster_client.Direct: one
        part per node)."""
        return [(None, list(range(len(commands))))]

    async def _part(self, route, commands: list[tuple]) -> list:
        """The replies to one part's `commands` (see `_routes`)."""
        return await self._round_trip(commands)

    async def _flush(self, batch, lane: _Lane) -> None:
        try:
            calls = self._calls(batch)
            commands = [("EVALSHA", script.sha, len(keys), *keys, *args) for script, keys, args, _ in calls]
            try:
                routes = self._routes(commands)
            except BaseException as exc:                       # noqa: BLE001 - handed to every caller
                for *_, futs in calls:
                    _answer(futs, [exc] * len(futs))
                return
            if len(routes) == 1:
                await self._answer_part(calls, commands, *routes[0])
            else:
                await asyncio.gather(*(self._answer_part(calls, commands, route, at) for route, at in routes))
        finally:
            lane.batches -= 1
            self._done(lane)

    async def _answer_part(self, calls, commands: list[tuple], route, at: list[int]) -> None:
        """Send the calls at positions `at` by `route` and answer their callers as soon as
        their replies are read: a part never waits for another (a frozen cluster node holds
        only its own callers)."""
        try:
            results = await self._part(route, [commands[i] for i in at])
        except BaseException as exc:                           # noqa: BLE001 - handed to every caller
            results = [exc] * len(at)
        for i, res in zip(at, results):
            script, keys, args, futs = calls[i]
            if isinstance(res, NoScriptError):                 # SCRIPT FLUSH, failover: load, rerun
                try:
                    res = await self._reload(script, keys, args, res)
                except BaseException as exc:                   # noqa: BLE001
                    res = exc
            # A batch answers one reply per call (an error reply for a call that failed);
            # an error of the whole call goes to each of its callers.
            replies = res if script is self._batch and isinstance(res, list) else [res] * len(futs)
            if len(replies) != len(futs):
                replies = [ResponseError(f"batch answered {len(replies)} replies for {len(futs)} calls")] * len(futs)
            _answer(futs, replies)


def _answer(futs: list[asyncio.Future], replies: list) -> None:
    """Each caller's reply (an exception raised in it), but not to a caller that went away."""
    for fut, reply in zip(futs, replies):
        if fut.done():                                         # its caller went away
            continue
        if isinstance(reply, BaseException):
            fut.set_exception(reply)
        else:
            fut.set_result(reply)


async def _exchange(conn, commands: list[tuple]) -> list:
    """One write of `commands`, then their replies in order; every reply is read, so the
    connection goes back to the pool in step even when one is an error."""
    await conn.send_packed_command(conn.pack_commands(commands))
    replies = []
    for _ in commands:
        try:
            replies.append(await conn.read_response())
        except ResponseError as exc:
            replies.append(exc)
    return replies


async def _trimmed_to(client, key: str, cap: int) -> int:
    """Epoch ms of the newest entry trimmed from the stream `key`; 0 when none was. MAXLEN
    trimming drops the oldest entries (and does not touch max-deleted-entry-id), so when more
    entries were added than remain, everything before the first remaining entry is gone; its ms
    is the bound. Before Redis 7 (no entries-added) a stream at its cap is taken as trimmed."""
    try:
        info = await client.xinfo_stream(key)
    except ResponseError:                   # no such key: nothing logged, nothing trimmed
        return 0
    get = lambda name: info.get(name, info.get(name.encode()))      # noqa: E731 - str or bytes keys
    added, length, first = get("entries-added"), get("length"), get("first-entry")
    if not first or (added is not None and int(added) <= int(length)) or (added is None and int(length) < cap):
        return 0
    return int(first[0].split(b"-")[0] if isinstance(first[0], bytes) else first[0].split("-")[0])


def _wrap_errors(cls):
    """Every public coroutine method of `cls` raises StoreUnavailable for any redis-py, OS or
    timeout error, naming the operation; nothing from redis.exceptions reaches the caller."""
    def wrap(name, fn):
        @functools.wraps(fn)
        async def method(*args, **kwargs):
            try:
                return await fn(*args, **kwargs)
            except _FAILURES as exc:
                raise StoreUnavailable(f"redis {name} failed: {type(exc).__name__}") from exc
        return method
    for name, fn in list(vars(cls).items()):
        if not name.startswith("_") and name != "close" and inspect.iscoroutinefunction(fn):
            setattr(cls, name, wrap(name, fn))
    return cls


@_wrap_errors
class RedisStore(Store):
    def __init__(self, url: str, namespace: str = "bp", *, timeout: float = 1.0,
                 max_connections: int = 64, log_length: int = LOG_LENGTH, tasks: Tasks | None = None) -> None:
        # Background work (batched script calls) runs on the app's task tracker when given one;
        # a store used alone (the CLI, tests) keeps its own and drains it at close.
        self._tasks, self._own_tasks = (tasks, False) if tasks is not None else (Tasks(), True)
        self._ns = namespace
        self._leases = leases_key(namespace)
        self._log = log_key(namespace)
        self._log_length = log_length
        self._max_connections = max_connections
        self._r = self._connect(url, timeout, max_connections)
        self._reserve = self._r.register_script(SCRIPTS["reserve"])
        self._settle_script = self._r.register_script(SCRIPTS["settle"])
        self._extend = self._r.register_script(LUA_CONSTANTS + _script("extend"))
        self._calls = self._caller()
        self._wires: dict[tuple[Counter, ...], fmt.Wire] = {}

    @staticmethod
    def _connect(url: str, timeout: float, max_connections: int):
        # A blocking pool: a burst larger than the pool waits (up to `timeout`) for a connection
        # instead of failing; 64 connections keep one Redis core busy from one proxy process.
        pool = aioredis.BlockingConnectionPool.from_url(
            url, max_connections=max_connections, timeout=timeout,
            socket_timeout=timeout, socket_connect_timeout=timeout, health_check_interval=30)
        kw = pool.connection_kwargs
        if _c_pack is not None and kw.get("encoding", "utf-8") == "utf-8" and kw.get("encoding_errors", "strict") == "strict":
            base = pool.connection_class        # TCP, TLS or unix socket, by the URL's scheme
            pool.connection_class = type(f"CPacked{base.__name__}", (_CPacked, base), {})
        return aioredis.Redis(
            connection_pool=pool,
            retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
            retry_on_error=[ConnectionError, TimeoutError, OSError],
        )

    def _caller(self):
        return _Coalescer(self._r, self._tasks, self._r.register_script(SCRIPTS["batch"]),
                          {self._reserve: "r", self._settle_script: "s"})

    def _wired(self, counters: Sequence[Counter]) -> fmt.Wire:
        """The wire form of `counters`, cached: the ledger passes the same tuple for every
        request of one plan, so encoding (most of the client's cost per call) happens once."""
        key = counters if isinstance(counters, tuple) else tuple(counters)
        wire = self._wires.get(key)
        if wire is None:
            if len(self._wires) > 4096:
                self._wires.clear()
            wire = self._wires[key] = fmt.wire(key)
        return wire

    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool, info: str = "") -> ReserveOutcome:
        wire = self._wired(counters)
        keys = [record_key(self._ns, rid), self._leases, *wire.keys]
        args = [rid, tokens, usd, deadline_ms, deadline_ms + OPEN_RECORD_MARGIN_MS, "1" if force else "0", info]
        reply = await self._calls.call(self._reserve, keys, args, wire.reserve_tail)
        return fmt.outcome(reply, wire.limited)

    async def commit(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                     note: Note = Note("ok")) -> bool:
        return await self._settle(rid, counters, "commit", tokens, usd, note)

    async def release(self, rid: str, counters: Sequence[Counter], note: Note = Note("released")) -> bool:
        return await self._settle(rid, counters, "release", 0, 0, note)

    async def expire(self, rid: str, counters: Sequence[Counter], charge: bool, now_ms: int) -> bool:
        keep_until = max((c.expire_at for c in counters), default=now_ms)
        return await self._settle(rid, counters, "expire", 0, 0, Note("expired"), now_ms,
                                  "1" if charge else "0", keep_until)

    async def _settle(self, rid: str, counters: Sequence[Counter], mode: str, tokens: int, usd: int,
                      note: Note, now_ms: int = 0, charge: str = "0", keep_until: int = 0) -> bool:
        wire = self._wired(counters)
        keys = [record_key(self._ns, rid), self._leases, self._log, *wire.keys]
        args = [rid, mode, tokens, usd, SETTLED_TTL_MS, now_ms, charge, keep_until,
                note.outcome, note.usage, note.latency_ms, self._log_length]
        return bool(await self._calls.call(self._settle_script, keys, args, wire.settle_tail))

    async def extend(self, rid: str, deadline_ms: int) -> bool:
        keys = [record_key(self._ns, rid), self._leases]
        return bool(await self._extend(keys=keys, args=[rid, deadline_ms, deadline_ms + OPEN_RECORD_MARGIN_MS]))

    async def expired(self, now_ms: int, limit: int) -> list[Expired]:
        ids = await self._r.zrangebyscore(self._leases, "-inf", now_ms, start=0, num=limit)
        if not ids:
            return []
        pipe = self._r.pipeline(transaction=False)
        for rid in ids:
            pipe.get(record_key(self._ns, rid.decode()))
        records = await pipe.execute()
        # A vanished record is passed on with no counters, for expire to drop from the lease index.
        return [Expired(rid.decode(), fmt.record_counters(rec)) for rid, rec in zip(ids, records)]

    async def snapshot(self, counters: Sequence[Counter]) -> list[Totals]:
        wire = self._wired(counters)
        pipe = self._r.pipeline(transaction=False)
        fields: dict[str, list[str]] = {k: [] for k in wire.keys}
        for c in counters:
            fields[c.window].append(c.scope)
        for key, names in fields.items():
            pipe.hmget(key, names)
        rows = await pipe.execute()
        found = {}
        for (key, names), vals in zip(fields.items(), rows):
            for name, v in zip(names, vals):
                found[key, name] = fmt.totals(v)
        return [found[c.window, c.scope] for c in counters]

    async def windows(self, keys: Sequence[str]) -> list[dict[str, Totals]]:
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            pipe.hgetall(key)
        rows = await pipe.execute()
        return [{f.decode(): fmt.totals(v) for f, v in row.items() if f != b"_"} for row in rows]

    async def settlements(self, since_ms: int | None, until_ms: int | None, limit: int,
                          before: str | None = None) -> list[LogEntry]:
        # Stream ids are "<ms>-<n>" of the server's clock: the range is read by id, newest first.
        top = f"({before}" if before else ("+" if until_ms is None else str(until_ms))
        bottom = "-" if since_ms is None else str(since_ms)
        rows = await self._r.xrevrange(self._log, top, bottom, count=limit)
        return [fmt.log_entry(seq.decode(), fields) for seq, fields in rows]

    async def log_trimmed_to(self) -> int:
        return await _trimmed_to(self._r, self._log, self._log_length)

    async def claim(self, name: str, expire_at_ms: int) -> bool:
        return bool(await self._r.set(claim_key(self._ns, name), b"1", nx=True, pxat=expire_at_ms))

    async def close(self) -> None:
        if self._own_tasks:
            await self._tasks.drain(5)
        try:
            await self._r.aclose(close_connection_pool=True)
        except (RedisError, OSError):
            pass
