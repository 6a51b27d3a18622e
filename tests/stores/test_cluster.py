"""The Redis Cluster store beyond the shared contract: its URL, its failures, its key layout."""

from __future__ import annotations

import asyncio
import time

import pytest

from proxy.errors import ConfigError, StoreUnavailable
from proxy.stores import Counter, open_store
from proxy.stores.cluster_client import parse_cluster_url
from tests.redis_server import free_port

NOW_MS = int(time.time() * 1000) + 86_400_000


def test_cluster_url_lists_start_up_nodes_and_credentials():
    assert parse_cluster_url("redis+cluster://a:7000,b.example:7001/0") == ([("a", 7000), ("b.example", 7001)], None, None)
    assert parse_cluster_url("redis+cluster://bob:p%40ss@10.0.0.1:6379") == ([("10.0.0.1", 6379)], "bob", "p@ss")
    with pytest.raises(ConfigError) as bad:
        open_store("redis+cluster://a:7000,a")
    assert str(bad.value) == "store: expected redis+cluster://host:port[,host:port…] ('a' is not host:port), got 'redis+cluster'://…"


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


# --- the tenant layout and the leased allowances (docs/cluster.md) ---------------------------

from proxy.keys import lend_key  # noqa: E402
from proxy.ledger import Amounts, Reservation  # noqa: E402
from proxy.stores.cluster import CHUNK_MAX_REQUESTS, CHUNK_REQUESTS, FRACTION  # noqa: E402
from tests.ledgers import Clock, ledger_for, tomorrow_at  # noqa: E402
from tests.stores.clusters import ORGS, cluster_keys, on_other_nodes, scopes  # noqa: E402

async def test_two_orgs_keys_land_in_different_slots_on_different_nodes(cluster_url, redis_cluster):
    a, b = on_other_nodes(redis_cluster, ORGS)
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"global": {"day": {"usd": 100}}, "org": {"day": {"usd": 10}}})
    for org in (a, b):
        assert isinstance(await ledger.reserve(f"r-{org}", Amounts(10, 1000), scopes(org)), Reservation)
    where = {port: [k for k in keys if "{bp:" in k] for port, keys in cluster_keys(redis_cluster).items()}
    homes = {org: {port for port, keys in where.items() for k in keys if k.startswith(f"{{bp:{org}}}")} for org in (a, b)}
    assert len(homes[a]) == len(homes[b]) == 1 and homes[a] != homes[b]     # each org on one node, not the same
    slot = {org: redis_cluster.command(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", f"{{bp:{org}}}:w:x") for org in (a, b)}
    assert slot[a] != slot[b]
    # the org's window hash, record and lease index are all in its slot
    assert {k.split("}:")[1].split(":")[0] for k in where[next(iter(homes[a]))] if k.startswith(f"{{bp:{a}}}")} >= {"w", "r", "leases"}
    await store.close()


async def test_an_orgs_window_hashes_are_hashtables_and_its_lease_index_a_skiplist(cluster_url, redis_cluster):
    # proxy/keys.py WINDOW_MARKER and LEASE_ANCHOR, on the cluster's per-org keys: the org's
    # window hashes are first written by its allowance's credit (allowance.lua) or its reserve.
    org = ORGS[0]
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"global": {"day": {"usd": 100}}, "org": {"day": {"usd": 10}}})
    assert isinstance(await ledger.reserve("r-enc", Amounts(10, 1000), scopes(org)), Reservation)
    encodings = {k: redis_cluster.command(port, "OBJECT", "ENCODING", k)
                 for port, keys in cluster_keys(redis_cluster).items() for k in keys if k.startswith(f"{{bp:{org}}}:")}
    windows = {k: e for k, e in encodings.items() if ":w:" in k}
    assert windows and set(windows.values()) == {"hashtable"}
    assert encodings[f"{{bp:{org}}}:leases"] == "skiplist"
    # An allowance's first credit (allowance.lua) may be a window hash's first write.
    key = f"{{bp:{org}}}:w:fresh"
    assert await store._allowance(keys=[key], args=["credit", "global:*", 100, 0, NOW_MS]) == 1
    port = next(p for p, keys in cluster_keys(redis_cluster).items() if key in keys)
    assert redis_cluster.command(port, "OBJECT", "ENCODING", key) == "hashtable"
    await store.close()


async def test_many_orgs_racing_for_a_global_limit_never_exceed_it_and_are_refused_at_most_the_bound_early(cluster_url):
    limit, amount = 1000, 7
    policy = {"defaults": {"global": {"day": {"tokens": limit}}}}
    clock = Clock(tomorrow_at(12))
    stores = [open_store(cluster_url) for _ in range(2)]                # two proxy processes
    ledgers = [ledger_for(s, clock, **policy) for s in stores]
    calls = [ledgers[i % 2].reserve(f"{org}-{i}", Amounts(amount, 0), scopes(org))
             for i in range(20) for org in ORGS]
    results = await asyncio.gather(*calls)
    admitted = sum(isinstance(r, Reservation) for r in results)
    assert len(calls) * amount > limit                                  # demand exceeds supply
    held = (await ledgers[0].usage("day", "global"))[0].reserved.tokens
    assert held == admitted * amount <= limit                           # exact: never over
    # The documented bound: refused early by at most what allowances hold unused, each at most its
    # last draw's extra, min(CHUNK_MAX_REQUESTS x amount, limit / (FRACTION x holders)).
    bound = sum(min(CHUNK_MAX_REQUESTS * amount, limit // (FRACTION * n)) for n in range(1, len(ORGS) + 1))
    assert limit - held < amount + bound
    # Once the idle allowances go back (sweeper or shutdown), the limit is met exactly.
    for s in stores:
        await s.give_back(0)
    more = [await ledgers[i % 2].reserve(f"late-{i}", Amounts(amount, 0), scopes(ORGS[i % len(ORGS)]))
            for i in range(limit // amount)]
    total = admitted + sum(isinstance(r, Reservation) for r in more)
    assert total == limit // amount
    assert (await ledgers[1].usage("day", "global"))[0].reserved.tokens == total * amount
    for s in stores:
        await s.close()


async def test_a_chunk_lent_but_never_credited_only_underspends_and_comes_back(cluster_url):
    # A process that died between taking a chunk from the lender and crediting it to the org.
    limit, amount = 100, 10
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"global": {"day": {"tokens": limit}}})
    counters = ledger.counters(scopes("acme"))
    g = next(c for c in counters if c.scope == "global:*" and c.token_limit >= 0)
    lender = lend_key("bp", g.window.rpartition(":w:")[2])
    ok, drawn, *_ = await store._calls.call(store._draw, [lender], [
        "draw", g.scope, "acme", limit, -1, 40, 0, 0, 0, FRACTION, g.expire_at])
    assert (ok, drawn) == (1, 40)
    other = [await ledger.reserve(f"o{i}", Amounts(amount, 0), scopes("globex")) for i in range(10)]
    assert sum(isinstance(r, Reservation) for r in other) == (limit - 40) // amount   # short, not over
    mine = [await ledger.reserve(f"a{i}", Amounts(amount, 0), scopes("acme")) for i in range(10)]
    assert sum(isinstance(r, Reservation) for r in mine) == 40 // amount    # acme's next credit recovers it
    assert (await ledger.usage("day", "global"))[0].reserved.tokens == limit
    await store.close()


async def test_unlimited_shared_scopes_cost_no_lending_and_are_summed_on_read(cluster_url, redis_cluster):
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"org": {"day": {"usd": 10}}})
    for i, org in enumerate(ORGS[:3]):
        res = await ledger.reserve(f"r{i}", Amounts(10 * (i + 1), 100), scopes(org))
        assert await ledger.commit(res, Amounts(10 * (i + 1), 100))
    keys = [k for ks in cluster_keys(redis_cluster).values() for k in ks]
    assert not [k for k in keys if ":a:" in k]                          # nothing was lent
    usage = {(u.scope.type, u.window): u for u in await ledger.usage()}
    assert usage["global", "day"].used == (60, 300) and usage["model", "month"].used == (60, 300)
    await store.close()


async def test_a_busy_allowance_draws_chunks_sized_to_its_pace(cluster_url, monkeypatch):
    # Each draw asks for the request's shortfall and an extra of k requests: k = 32 at first,
    # doubled while draws come within DRAW_SECONDS of each other, halved when they come later.
    from proxy.stores import cluster
    from proxy.stores.wire import totals
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"global": {"day": {"tokens": 10 ** 9}}})
    g = next(c for c in ledger.counters(scopes("acme")) if c.scope == "global:*" and c.token_limit >= 0)
    lender = lend_key("bp", g.window.rpartition(":w:")[2])
    lent = [0]

    async def reserve_until(draws: int) -> None:
        i = len(lent)
        while len(lent) < draws + 1:
            i += 1
            assert isinstance(await ledger.reserve(f"p{len(lent)}-{i}", Amounts(10, 0), scopes("acme")), Reservation)
            now = totals(await store._r.hget(lender, "global:*")).tokens_used       # lent tokens
            if now != lent[-1]:
                lent.append(now)

    monkeypatch.setattr(cluster, "DRAW_SECONDS", 3600.0)        # every draw "soon after" the last
    await reserve_until(3)
    monkeypatch.setattr(cluster, "DRAW_SECONDS", 0.0)           # every draw "long after" the last
    await reserve_until(5)
    # each draw: the request's 10 tokens and an extra of k x 10
    assert [b - a - 10 for a, b in zip(lent, lent[1:])] == [320, 640, 1280, 640, 320]
    await store.close()


async def test_the_sweep_gives_back_what_an_idle_allowance_holds_unused(cluster_url, monkeypatch):
    from proxy.stores import cluster
    store = open_store(cluster_url)
    ledger = ledger_for(store, defaults={"global": {"day": {"tokens": 10_000}}})
    res = await ledger.reserve("a", Amounts(10, 0), scopes("acme"))
    g = next(c for c in res.counters if c.scope == "global:*" and c.token_limit >= 0)
    lender = lend_key("bp", g.window.rpartition(":w:")[2])

    async def lent() -> int:
        from proxy.stores.wire import totals
        return totals(await store._r.hget(lender, "global:*")).tokens_used      # first field: lent tokens

    assert await lent() == 10 + CHUNK_REQUESTS * 10            # the need and an extra of 32 requests
    await ledger.sweep()
    assert await lent() == 10 + CHUNK_REQUESTS * 10            # not idle yet: kept
    monkeypatch.setattr(cluster, "IDLE_SECONDS", 0.0)
    await ledger.sweep()
    assert await lent() == 10                                  # only what the open reservation holds
    assert await ledger.commit(res, Amounts(4, 0))
    await ledger.reserve("b", Amounts(9_990, 0), scopes("globex"))   # the rest of the limit, elsewhere
    await ledger.sweep()
    assert await lent() == 10_000 - 6                          # acme's 6 unused went back too
    await store.close()


async def test_a_burst_larger_than_the_connection_pool_waits_instead_of_failing(cluster_url):
    # redis-py's cluster pool fails a command outright when every connection is busy: a burst
    # of first requests over many orgs (each registering its org, drawing its allowances and
    # reserving) once failed with StoreUnavailable(MaxConnectionsError) in CI.
    store = open_store(cluster_url, max_connections=2)
    ledger = ledger_for(store, Clock(tomorrow_at(12)), defaults={"global": {"hour": {"tokens": 10_000}}})
    results = await asyncio.gather(*(ledger.reserve(f"b{i}", Amounts(3, 1), scopes(ORGS[i % 12]))
                                     for i in range(300)), return_exceptions=True)
    assert [r for r in results if not isinstance(r, Reservation)] == []
    await asyncio.gather(*(ledger.release(r) for r in results))
    await store.close()


LIMIT, AMOUNT = 500, 3


async def _race_orgs(url: str, worker: int, now: float) -> int:
    store = open_store(url)
    ledger = ledger_for(store, Clock(now), defaults={"global": {"hour": {"tokens": LIMIT}}})
    results = await asyncio.gather(*(ledger.reserve(f"p{worker}-{i}", Amounts(AMOUNT, 1), scopes(ORGS[i % 8]))
                                     for i in range(100)))
    await store.close()                               # gives back what its allowances hold unused
    return sum(isinstance(r, Reservation) for r in results)


def _org_worker(url: str, worker: int, now: float, start, out) -> None:
    start.wait()
    try:
        out.put(asyncio.run(_race_orgs(url, worker, now)))
    except BaseException as exc:               # reported to the test, not lost in a queue timeout
        out.put(f"worker {worker} failed: {exc!r}")
        raise


async def test_processes_racing_over_many_orgs_never_exceed_a_global_limit(cluster_url):
    import multiprocessing
    ctx = multiprocessing.get_context("spawn")
    start, out = ctx.Event(), ctx.Queue()
    now = tomorrow_at(12)
    procs = [ctx.Process(target=_org_worker, args=(cluster_url, w, now, start, out)) for w in range(4)]
    for p in procs:
        p.start()
    await asyncio.sleep(1.0)
    start.set()
    counts = [out.get(timeout=60) for _ in procs]
    assert all(isinstance(c, int) for c in counts), counts
    admitted = sum(counts)
    for p in procs:
        p.join(timeout=30)
    store = open_store(cluster_url)
    ledger = ledger_for(store, Clock(now), defaults={"global": {"hour": {"tokens": LIMIT}}})
    assert 4 * 100 * AMOUNT > LIMIT                                     # the race is real
    held = next(u for u in await ledger.usage("hour", "global")).reserved.tokens
    assert held == admitted * AMOUNT <= LIMIT                            # exact across processes
    # Every process gave its allowances back at close: what is left is admitted here, exactly.
    late = [await ledger.reserve(f"late-{i}", Amounts(AMOUNT, 1), scopes(ORGS[i % 8])) for i in range(LIMIT)]
    assert admitted + sum(isinstance(r, Reservation) for r in late) == LIMIT // AMOUNT
    await store.close()


async def test_a_burst_of_first_requests_shares_one_draw_per_allowance(cluster_url):
    """300 first reservations over 12 orgs, all refused on an empty allowance at once: the
    refusals on one org's allowance wait for one draw instead of drawing a chunk each (which
    lent out the whole global limit before any credit landed, and refused early)."""
    store = open_store(cluster_url)
    draws = 0
    draw_for = store._draw_for

    async def counted(*args):
        nonlocal draws
        draws += 1
        return await draw_for(*args)
    store._draw_for = counted
    ledger = ledger_for(store, Clock(tomorrow_at(12)), defaults={"global": {"hour": {"tokens": 10_000}}})
    try:
        results = await asyncio.gather(*(ledger.reserve(f"d{i}", Amounts(3, 1), scopes(ORGS[i % 12]))
                                         for i in range(300)))
        assert all(isinstance(r, Reservation) for r in results)
        assert draws <= 2 * 12
    finally:
        await store.close()


def test_the_test_cluster_starts_a_node_again_when_its_port_is_taken_before_it_binds():
    # tests/redis_cluster.py picks free ports, but the suite's own connections draw their source
    # ports from the same range: a node whose port was taken meanwhile exits at once, and the
    # cluster started on other ports instead of failing the test ("node … did not start").
    import socket

    from tests.redis_cluster import RedisCluster
    cluster = RedisCluster()
    taken = cluster.ports[0]
    with socket.socket() as s:
        s.bind(("127.0.0.1", taken))
        s.listen()
        cluster.start()
        try:
            assert taken not in cluster.ports and len(set(cluster.ports)) == 3
            assert all(cluster.command(p, "CLUSTER", "INFO").startswith("cluster_state:ok") for p in cluster.ports)
        finally:
            cluster.stop()
