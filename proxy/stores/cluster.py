"""The Redis Cluster store: `redis+cluster://host:port[,host:port…]`.

Connecting and calling: cluster_client.py. Script calls go out through the Redis store's
coalescer, under load one batch.lua call per org (grouped by hash tag), a round trip's calls
pipelined per node on one pooled connection each (redis-py refuses EVALSHA in its cluster
pipeline); plain reads pipeline, split per node by the client.

Layout (docs/cluster.md): each org's keys carry the tag `{<ns>:<org>}` — its window hashes,
reservation records, lease index and settlement log — so a request's one reserve and one settle
run on its org's shard and orgs spread over the shards. A scope shared by orgs (global,
provider, model) that has a limit in a window is spent from the org's ALLOWANCE, a field of the
org's window hash, lent in chunks by `{<ns>}:a:<window>` (lend.lua) before any of it is spent;
an unlimited one is simply counted per org and summed when read. Unused allowance goes back
(`give_back`) when this process has not drawn on it for IDLE_SECONDS, and at close.
"""

from __future__ import annotations

import asyncio
import time
from typing import NamedTuple, Sequence

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisClusterException, RedisError

from ..errors import StoreUnavailable
from ..keys import home_key, in_tenant, leases_key, lend_key, log_key, record_key, tenant_tag, tenants_key, window_label
from . import wire as fmt
from .base import (EMPTY, OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS, Counter, Expired, LogEntry, Note,
                   ReserveOutcome, Seen, Status, Totals)
from .cluster_client import Direct, connect
from .redis import LUA_CONSTANTS, SCRIPTS, RedisStore, _script, _trimmed_to, _wrap_errors

SHARED = frozenset(("global", "provider", "model"))    # scope types that span orgs
FRACTION = 8              # a draw's extra is at most 1/(FRACTION x holders) of what is free
CHUNK_REQUESTS = 32       # ... and at most this many more requests of the size that drew it,
CHUNK_MAX_REQUESTS = 4096  # ... doubled (up to this) while an allowance draws again within
DRAW_SECONDS = 1.0        # this long of its last draw, halved back when it draws less often (_chunk)
MAX_EXTRA_DRAWS = 8        # draws per reserve beyond one per allowance (see reserve)
RECLAIM_SECONDS = 1.0     # at most one reclaim per process per second (see _reclaim)
SWEEP_TENANTS = 200       # orgs whose lease index one sweep call visits (see expired)
IDLE_SECONDS = 5.0        # an allowance not drawn on by this process for this long goes back


class _TenantLayout(NamedTuple):
    tenant: str                         # escaped org id ("" for counters without an org)
    counters: tuple[Counter, ...]       # in the tenant's slot; allowance limits encoded
    allowances: frozenset[int]          # positions of the counters spent from an allowance
    limits: tuple[Counter, ...]         # the counters as given (their real limits)


def _encode(limit: int) -> int:
    """reserve.lua's marker for a limit spent from an allowance: -(limit + 2) < -1."""
    return -limit - 2 if limit >= 0 else -1


def tenant_layout(ns: str, counters: Sequence[Counter]) -> _TenantLayout:
    """Where `counters` live for the org among them, and which spend from allowances."""
    tenant = next((c.scope[4:] for c in counters if c.scope.startswith("org:")), "")
    out, allowances = [], set()
    for i, c in enumerate(counters):
        key = in_tenant(c.window, ns, tenant)
        if c.scope.partition(":")[0] in SHARED and (c.token_limit >= 0 or c.usd_limit >= 0):
            allowances.add(i)
            c = Counter(key, c.scope, _encode(c.token_limit), _encode(c.usd_limit), c.expire_at)
        out.append(c if key == c.window else c._replace(window=key))
    return _TenantLayout(tenant, tuple(out), frozenset(allowances), tuple(counters))


class _Held(NamedTuple):
    """An allowance this process drew into."""
    tenant: str
    window: str          # the tenant's window hash
    lender: str          # the window's lending hash
    scope: str
    expire_at: int


# What an org's registration (an SADD, which may run twice) waits out: see Direct.waited. Not
# TRYAGAIN or CLUSTERDOWN: redis-py answers each by closing every connection of the client.
_REGISTER_WAITS = (RedisConnectionError,)


@_wrap_errors
class ClusterStore(RedisStore):
    def __init__(self, url: str, namespace: str = "bp", **kw) -> None:
        super().__init__(url, namespace, **kw)
        self._draw = self._r.register_script(_script("lend"))
        self._allowance = self._r.register_script(LUA_CONSTANTS + _script("allowance"))
        self._tenants: set[str] = set()                  # registered in tenants_key already
        self._layouts: dict[tuple[Counter, ...], _TenantLayout] = {}
        self._lent: dict[tuple[str, str], tuple[int, int]] = {}   # (lender, scope) -> lent, last seen
        self._held: dict[_Held, float] = {}              # -> monotonic time of this process's last draw
        self._drawing: dict[tuple[str, str], asyncio.Future] = {}   # (org window hash, scope) -> its draw
        self._chunks: dict[tuple[str, str], tuple[int, float]] = {}  # the same -> requests a chunk, last draw
        self._reclaimed_at = float("-inf")
        self._sweep_cursor = 0
        self._tenant_of: dict[str, str] = {}             # open reservation id -> tenant (for extend)

    @staticmethod
    def _connect(url: str, timeout: float, max_connections: int):
        return connect(url, max_connections)

    def _caller(self):
        return Direct(self._r, self._tasks, self._r.register_script(SCRIPTS["batch"]),
                      {self._reserve: "r", self._settle_script: "s"})

    def _tenant_layout(self, counters: Sequence[Counter]) -> _TenantLayout:
        key = counters if isinstance(counters, tuple) else tuple(counters)
        layout = self._layouts.get(key)
        if layout is None:
            if len(self._layouts) > 4096:
                self._layouts.clear()
            layout = self._layouts[key] = tenant_layout(self._ns, key)
        return layout

    async def _register(self, tenant: str) -> None:
        """Name the tenant in the deployment's tenant set before its first reservation, so the
        sweeper finds every lease index (once per process and tenant). SADD may run twice, so a
        connection error (a failover of the set's primary) is waited out like a script call's
        (Direct.waited)."""
        if tenant not in self._tenants:
            await self._calls.ready()
            await self._calls.waited(lambda: self._r.sadd(tenants_key(self._ns), tenant), _REGISTER_WAITS)
            self._tenants.add(tenant)

    async def reserve(self, rid: str, counters: Sequence[Counter], tokens: int, usd: int,
                      deadline_ms: int, force: bool, info: str = "") -> ReserveOutcome:
        layout = self._tenant_layout(counters)
        await self._register(layout.tenant)
        self._tenant_of[rid] = layout.tenant
        # A refusal on an allowance draws for it, then tries again; a refusal the lender
        # confirms (or one on the org's own counters) decides. Each draw lends at least one
        # unit more, so this ends; the cap only matters when other processes of the same org
        # spend every fresh chunk before this one can (then a refusal may come early, never
        # late). In shadow mode the forced write comes last, after the draws, so the allowances
        # still follow the spend.
        for _ in range(len(layout.allowances) + MAX_EXTRA_DRAWS):
            out = await self._reserve_in(layout, rid, tokens, usd, deadline_ms, False, info)
            if out.status is not Status.REFUSED or out.over.index not in layout.allowances:
                break
            if not await self._draw_shared(layout, out.over, tokens, usd) and not await self._reclaim():
                break
        if out.status is Status.REFUSED and force:
            out = await self._reserve_in(layout, rid, tokens, usd, deadline_ms, True, info)
        if out.status not in (Status.ADMITTED, Status.FORCED):
            self._tenant_of.pop(rid, None)
        return self._as_lent(layout, out)

    async def _reserve_in(self, layout: _TenantLayout, rid: str, tokens: int, usd: int, deadline_ms: int,
                          force: bool, info: str) -> ReserveOutcome:
        tag = tenant_tag(self._ns, layout.tenant)
        wire = self._wired(layout.counters)
        keys = [record_key(tag, rid), leases_key(tag), *wire.keys]
        args = [rid, tokens, usd, deadline_ms, deadline_ms + OPEN_RECORD_MARGIN_MS,
                "1" if force else "0", info]
        reply = await self._calls.call(self._reserve, keys, args, wire.reserve_tail)
        return fmt.outcome(reply, wire.limited)

    async def _draw_shared(self, layout: _TenantLayout, over: Seen, tokens: int, usd: int) -> bool:
        """One draw at a time per allowance in this process: reserves refused on an allowance
        while its draw is out wait for that draw and try again, instead of each drawing a chunk
        of its own. A burst of first requests (300 at once over 12 orgs) otherwise drew a chunk
        per request before any credit landed, lent out the whole global limit, and refused
        early. A waiter whose need the shared draw did not cover is refused again and draws."""
        key = (layout.counters[over.index].window, layout.limits[over.index].scope)
        pending = self._drawing.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        done = self._drawing[key] = asyncio.get_running_loop().create_future()
        ok = True                        # if the draw fails, the waiters try again themselves
        try:
            ok = await self._draw_for(layout, over, tokens, usd)
            return ok
        finally:
            del self._drawing[key]
            done.set_result(ok)

    async def _draw_for(self, layout: _TenantLayout, over: Seen, tokens: int, usd: int) -> bool:
        """Borrow the shortfall of allowance `over` (plus an extra, see lend.lua) from its
        lender, then credit it to the allowance. False: the lender has not that much free."""
        given, mine = layout.limits[over.index], layout.counters[over.index]
        t, tr, d, dr = over.totals                       # relative to the allowance (reserve.lua)
        need_t = max(0, t + tr + tokens) if given.token_limit >= 0 else 0
        need_d = max(0, d + dr + usd) if given.usd_limit >= 0 else 0
        lender = lend_key(self._ns, window_label(given.window))
        chunk = self._chunk((mine.window, given.scope))
        ok, drawn_t, drawn_d, lent_t, lent_d = await self._calls.call(self._draw, [lender], [
            "draw", given.scope, layout.tenant, given.token_limit, given.usd_limit, need_t, need_d,
            chunk * tokens, chunk * usd, FRACTION, given.expire_at])
        self._lent[lender, given.scope] = (lent_t, lent_d)
        if not ok and not (drawn_t or drawn_d):
            return False
        # A crash between the draw and this credit leaves the chunk lent and not credited: spend
        # can only fall short. Credit merges the lender's cumulative total (max), so the org's
        # next credit recovers it, even after a draw that did not fit.
        grew = await self._calls.call(self._allowance, [mine.window],
                                      ["credit", given.scope, drawn_t, drawn_d, given.expire_at])
        if ok or grew:
            self._held[_Held(layout.tenant, mine.window, lender, given.scope, given.expire_at)] = time.monotonic()
        return bool(ok or grew)

    def _chunk(self, key: tuple[str, str]) -> int:
        """How many more requests (of the size that draws) a draw of allowance `key` asks for
        beyond its need: CHUNK_REQUESTS at first, doubled at each draw that comes within
        DRAW_SECONDS of the one before (up to CHUNK_MAX_REQUESTS), halved at each that comes
        later. A busy org then draws about once a DRAW_SECONDS instead of every 32 requests: at
        each draw every reserve in flight on the allowance was refused, waited for the draw and
        was sent again (at 32 concurrent requests, about half of all reserves). The lender still
        caps each extra at what is free / (FRACTION x holders), so the early-refusal bound is the
        same function of CHUNK_MAX_REQUESTS (docs/cluster.md)."""
        now = time.monotonic()
        requests, last = self._chunks.get(key, (0, 0.0))
        if not requests:
            requests = CHUNK_REQUESTS
        elif now - last < DRAW_SECONDS:
            requests = min(2 * requests, CHUNK_MAX_REQUESTS)
        else:
            requests = max(CHUNK_REQUESTS, requests // 2)
        if len(self._chunks) >= 4096:                  # window hashes come and go: bounded
            self._chunks.clear()
        self._chunks[key] = (requests, now)
        return requests

    async def _reclaim(self) -> bool:
        """The lender is short: give back what this process's allowances hold unused (all of
        them, idle or not) so the refusal that follows is not early because of them; at most
        once per RECLAIM_SECONDS, so requests refused at the limit stay cheap. True if any
        allowance went back (the caller draws again)."""
        now = time.monotonic()
        if now - self._reclaimed_at < RECLAIM_SECONDS:
            return False
        self._reclaimed_at = now
        return await self.give_back(0) > 0

    def _as_lent(self, layout: _TenantLayout, out: ReserveOutcome) -> ReserveOutcome:
        """Allowance counters reported as the deployment-wide scope this tenant sees: its limit
        minus (what is lent elsewhere + its own spend) remaining, from the last lent total this
        process learned (admission itself never depends on it)."""
        if not layout.allowances:
            return out

        def lent(s: Seen) -> Seen:
            if s.index not in layout.allowances:
                return s
            c = layout.limits[s.index]
            lt, ld = self._lent.get((lend_key(self._ns, window_label(c.window)), c.scope), (0, 0))
            t, tr, d, dr = s.totals
            return Seen(s.index, Totals(max(0, t + lt), tr, max(0, d + ld), dr))
        return ReserveOutcome(out.status, out.over and lent(out.over), tuple(map(lent, out.seen)))

    async def give_back(self, idle_seconds: float | None = None) -> int:
        """Return to the lenders what the allowances this process drew into hold unused, for
        those it has not drawn on for `idle_seconds` (default IDLE_SECONDS; 0: all, as at
        close); the count returned. Three calls each: the lender's total for the tenant, the
        give, the lender's update. A crash between the last two leaves the amount lent and
        unused: spend can only fall short, and the tenant's next give-back sends the same
        cumulative total again."""
        idle = IDLE_SECONDS if idle_seconds is None else idle_seconds
        now = time.monotonic()
        due = [(h, at) for h, at in self._held.items() if now - at >= idle]
        for h, at in due:
            if self._held.pop(h, None) is None:        # another task is giving it back
                continue
            try:
                still_reserved = await self._give(h)
            except BaseException:
                self._held.setdefault(h, at)           # try again at the next sweep
                raise
            if still_reserved:                         # a release may free some: look again later
                self._held.setdefault(h, at)
        return len(due)

    async def _give(self, h: _Held) -> bool:
        """Give back one allowance's unused part; True if reservations are still open on it."""
        drawn_t, _, drawn_d, _ = fmt.totals(await self._r.hget(h.lender, f"{h.scope} {h.tenant}"))
        ret_t, ret_d, tr, dr = await self._calls.call(self._allowance, [h.window], ["give", h.scope, drawn_t, drawn_d])
        self._lent[h.lender, h.scope] = tuple(await self._calls.call(
            self._draw, [h.lender], ["returned", h.scope, h.tenant, ret_t, ret_d]))
        return bool(tr or dr)

    async def _settle(self, rid: str, counters: Sequence[Counter], mode: str, tokens: int, usd: int,
                      note: Note, now_ms: int = 0, charge: str = "0", keep_until: int = 0) -> bool:
        """RedisStore's commit, release and expire, settled in the request's tenant slot."""
        layout = self._tenant_layout(counters)
        await self._register(layout.tenant)          # a settle of a lost record may be its first write
        tag = tenant_tag(self._ns, layout.tenant)
        wire = self._wired(layout.counters)
        keys = [record_key(tag, rid), leases_key(tag), log_key(tag), *wire.keys]
        args = [rid, mode, tokens, usd, SETTLED_TTL_MS, now_ms, charge, keep_until,
                note.outcome, note.usage, note.latency_ms, self._log_length]
        done = bool(await self._calls.call(self._settle_script, keys, args, wire.settle_tail))
        if mode != "expire":
            self._tenant_of.pop(rid, None)
        return done

    async def extend(self, rid: str, deadline_ms: int) -> bool:
        # Only the process that reserved extends (its requests are the live ones), so it knows
        # the tenant; an id it does not know is not open here.
        tenant = self._tenant_of.get(rid)
        if tenant is None:
            return False
        tag = tenant_tag(self._ns, tenant)
        return bool(await self._calls.call(self._extend, [record_key(tag, rid), leases_key(tag)],
                                           [rid, deadline_ms, deadline_ms + OPEN_RECORD_MARGIN_MS]))

    async def _all_tenants(self) -> list[str]:
        return sorted(m.decode() for m in await self._r.smembers(tenants_key(self._ns)))

    async def expired(self, now_ms: int, limit: int) -> list[Expired]:
        """Due leases from the next SWEEP_TENANTS orgs of the tenant set (one ZRANGEBYSCORE each,
        pipelined per node), continuing where this process's last call stopped: with many
        processes sweeping, each org is visited every few seconds without any process reading
        every org's lease index each time."""
        await self._calls.ready()
        due: list[tuple[str, str]] = []
        visited = 0
        while len(due) < limit and visited < SWEEP_TENANTS:
            self._sweep_cursor, members = await self._r.sscan(tenants_key(self._ns), self._sweep_cursor,
                                                             count=SWEEP_TENANTS)
            tenants = [m.decode() for m in members]
            visited += len(tenants)
            pipe = self._r.pipeline(transaction=False)
            for tenant in tenants:
                pipe.zrangebyscore(leases_key(tenant_tag(self._ns, tenant)), "-inf", now_ms, start=0, num=limit)
            due += [(t, rid.decode()) for t, ids in zip(tenants, await pipe.execute() if tenants else []) for rid in ids]
            if self._sweep_cursor == 0:
                break
        due = due[:limit]
        if not due:
            return []
        pipe = self._r.pipeline(transaction=False)
        for tenant, rid in due:
            pipe.get(record_key(tenant_tag(self._ns, tenant), rid))
        records = await pipe.execute()
        return [Expired(rid, tuple(c._replace(window=home_key(c.window, self._ns)) for c in fmt.record_counters(rec)))
                for (_, rid), rec in zip(due, records)]

    async def snapshot(self, counters: Sequence[Counter]) -> list[Totals]:
        """An org's counters, its allowance counters as `_as_lent` reports them (with the lent
        total read now, one HGET each on the lender's shard). Counters naming no org (an
        operator's look at the global scope, say) are summed over every org: one HMGET per org."""
        await self._calls.ready()
        layout = self._tenant_layout(counters)
        if not layout.tenant:
            return await self._summed(layout.limits)
        rows = await super().snapshot(layout.counters)
        if not layout.allowances:
            return rows
        order = sorted(layout.allowances)
        pipe = self._r.pipeline(transaction=False)
        for i in order:
            pipe.hget(lend_key(self._ns, window_label(layout.limits[i].window)), layout.limits[i].scope)
        for i, raw in zip(order, await pipe.execute()):
            self._lent[lend_key(self._ns, window_label(layout.limits[i].window)), layout.limits[i].scope] = fmt.totals(raw)[:2]
        held = await super().snapshot([Counter(layout.counters[i].window, "~" + layout.counters[i].scope, -1, -1, 0)
                                       for i in order])
        out = list(rows)
        for i, (gt, rt, gd, rd) in zip(order, held):
            t, tr, d, dr = rows[i]
            mine = Seen(i, Totals(t - (gt - rt), tr, d - (gd - rd), dr))
            out[i] = self._as_lent(layout, ReserveOutcome(Status.ADMITTED, None, (mine,))).seen[0].totals
        return out

    async def _summed(self, counters: Sequence[Counter]) -> list[Totals]:
        tenants = await self._all_tenants()
        pipe = self._r.pipeline(transaction=False)
        for c in counters:
            for tenant in tenants:
                pipe.hget(in_tenant(c.window, self._ns, tenant), c.scope)
        rows = iter(await pipe.execute())
        out = []
        for _ in counters:
            total = EMPTY
            for _ in tenants:
                total = Totals(*(a + b for a, b in zip(total, fmt.totals(next(rows)))))
            out.append(total)
        return out

    async def windows(self, keys: Sequence[str]) -> list[dict[str, Totals]]:
        """Every tenant's window hashes summed: a scope shared by tenants is the sum of their
        spend; allowance fields are left out. One HGETALL per tenant and window."""
        await self._calls.ready()
        tenants = await self._all_tenants()
        pipe = self._r.pipeline(transaction=False)
        for key in keys:
            for tenant in tenants:
                pipe.hgetall(in_tenant(key, self._ns, tenant))
        rows = iter(await pipe.execute())
        out = []
        for _ in keys:
            merged: dict[str, Totals] = {}
            for _ in tenants:
                for f, v in next(rows).items():
                    name = f.decode()
                    if name == "_" or name.startswith("~"):
                        continue
                    merged[name] = Totals(*(a + b for a, b in zip(merged.get(name, EMPTY), fmt.totals(v))))
            out.append(merged)
        return out

    async def log_trimmed_to(self) -> int:
        """The newest entry any tenant's log dropped: an audit needs every tenant's window."""
        await self._calls.ready()
        trimmed = [await _trimmed_to(self._r, log_key(tenant_tag(self._ns, t)), self._log_length) for t in await self._all_tenants()]
        return max(trimmed, default=0)

    async def settlements(self, since_ms: int | None, until_ms: int | None, limit: int,
                          before: str | None = None) -> list[LogEntry]:
        """Every tenant's log merged, newest first (ids are "<ms>-<n>" of each shard's clock)."""
        await self._calls.ready()
        top = f"({before}" if before else ("+" if until_ms is None else str(until_ms))
        bottom = "-" if since_ms is None else str(since_ms)
        pipe = self._r.pipeline(transaction=False)
        for tenant in await self._all_tenants():
            pipe.xrevrange(log_key(tenant_tag(self._ns, tenant)), top, bottom, count=limit)
        entries = [self._home(fmt.log_entry(seq.decode(), f)) for rows in await pipe.execute() for seq, f in rows]
        entries.sort(key=lambda e: tuple(map(int, e.seq.split("-"))), reverse=True)
        return entries[:limit]

    def _home(self, entry: LogEntry) -> LogEntry:
        return entry._replace(windows=tuple((home_key(k, self._ns), f) for k, f in entry.windows))

    async def close(self) -> None:
        try:
            await self.give_back(0)
        except StoreUnavailable:
            pass                       # what is not given back stays lent until the window ends
        if self._own_tasks:
            await self._tasks.drain(5)     # batches still out answer before the client closes
        try:
            await self._r.aclose()
            # redis-py's aclose does nothing while a failed node has it waiting to re-learn the
            # slot map (its reinitialise flag): close every node's connections regardless.
            await self._r.nodes_manager.aclose()
            await self._r.nodes_manager.aclose("startup_nodes")
        except (RedisError, RedisClusterException, OSError):
            pass
