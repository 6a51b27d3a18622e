"""Redis server time per request by batch size: what one batch.lua call costs per sub-call.

    python bench/batch_bench.py [--sizes 1,2,4,8,16,32] [--batches 20] [--rounds 5] [--tree NAME=PATH …]

Starts its own redis-server. For each size n: batches of n reserves, then batches of their n
commits (bench/ledger_bench.py's plan: 5 scopes, 3 window hashes, 5 limited counters), encoded
exactly as the Redis store's coalescer sends them (n = 1: the single scripts), sent one after
the other from one connection, so nothing else runs on the server. Prints per request (reserve
+ commit) the scripts' usec (INFO commandstats) and commands, per size the best and median of
the rounds. `--tree NAME=PATH` adds the store of another checkout (its proxy package imported
under another name), run against the same redis-server and the same window hashes, every batch
of every size alternating between the trees, so that a busy machine slows both alike (an A/B
of the scripts; with --tree the figures are the median [min-max] over rounds). Under real load (bench/proxy_bench.py) the same work costs more wall time, as Redis
shares its core; the per-size shape is the point here.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.resources
import importlib.util
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.ledger_bench import POLICY, SCOPES, _commandstats  # noqa: E402
from proxy.keys import record_key  # noqa: E402
from proxy.ledger import Amounts, Ledger  # noqa: E402
from proxy.stores import open_store  # noqa: E402
from proxy.stores.base import OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402


async def plan_counters(store):
    """The counters the ledger passes for bench/ledger_bench.py's plan."""
    seen = {}
    reserve = store.reserve

    async def spy(rid, counters, *a, **kw):
        seen["counters"] = counters
        return await reserve(rid, counters, *a, **kw)
    store.reserve = spy
    ledger = Ledger(store, POLICY)
    res = await ledger.reserve("warm", Amounts(1, 1), SCOPES)
    await ledger.commit(res, Amounts(1, 1))
    store.reserve = reserve
    return seen["counters"]


def tree_store(name: str, path: str, url: str):
    """A store of the checkout at `path`: its proxy package imported as `proxy_<name>` (its .lua
    files read from there too: the store reads them as resources of "proxy.stores")."""
    pkg = f"proxy_{name}"
    spec = importlib.util.spec_from_file_location(pkg, os.path.join(path, "proxy", "__init__.py"),
                                                  submodule_search_locations=[os.path.join(path, "proxy")])
    module = importlib.util.module_from_spec(spec)
    sys.modules[pkg] = module
    files = importlib.resources.files
    importlib.resources.files = lambda anchor: files(f"{pkg}.stores" if anchor == "proxy.stores" else anchor)
    try:
        spec.loader.exec_module(module)
        stores = importlib.import_module(f"{pkg}.stores")
        importlib.import_module(f"{pkg}.stores.redis")      # open_store imports it later
    finally:
        importlib.resources.files = files
    return stores.open_store(url)


async def run_size(store, server, wire, n: int, batches: int) -> tuple[float, float]:
    """(script usec, commands) per request for `batches` batches of n reserves + n commits."""
    c = store._calls
    deadline = int(time.time() * 1000) + 600_000
    before = _commandstats(server)
    for _ in range(batches):
        ids = [uuid.uuid4().hex for _ in range(n)]
        reserves = [(store._reserve, [record_key("bp", rid), store._leases, *wire.keys],
                     [rid, 1200, 9000, deadline, deadline + OPEN_RECORD_MARGIN_MS, "0", '["acme","alice"]'],
                     wire.reserve_tail, None) for rid in ids]
        commits = [(store._settle_script, [record_key("bp", rid), store._leases, store._log, *wire.keys],
                    [rid, "commit", 900, 7000, SETTLED_TTL_MS, 0, "0", 0, "ok", "700 0 200 0", "12", 100_000],
                    wire.settle_tail, None) for rid in ids]
        for group in (reserves, commits):
            for script, keys, args, _ in c._calls(group):
                await script(keys=keys, args=args)
    after = _commandstats(server)
    diff = {k: (v[0] - before.get(k, (0, 0))[0], v[1] - before.get(k, (0, 0))[1]) for k, v in after.items()}
    diff.pop("info", None)
    requests = n * batches
    return diff.get("evalsha", (0, 0))[1] / requests, sum(calls for calls, _ in diff.values()) / requests


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,2,4,8,16,32")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    server = RedisServer()
    server.start()
    try:
        store = open_store(server.url)
        counters = await plan_counters(store)
        if args.tree:
            await compare(server, store, counters, args, sizes)
            return
        wire = store._wired(counters)
        for n in sizes:                                   # load every script once
            await run_size(store, server, wire, n, 1)
        results: dict[int, list[tuple[float, float]]] = {n: [] for n in sizes}
        for _ in range(args.rounds):                      # sizes interleaved within each round
            for n in sizes:
                results[n].append(await run_size(store, server, wire, n, args.batches))
        print("batch size | script usec per request (best / median) | commands per request")
        for n in sizes:
            usec = sorted(u for u, _ in results[n])
            print(f"{n:10d} | {usec[0]:6.1f} / {usec[len(usec) // 2]:6.1f} | {results[n][0][1]:5.1f}")
        await store.close()
    finally:
        server.stop()


async def compare(server, store, counters, args, sizes) -> None:
    """This tree's store against each --tree's, batch by batch, on one redis-server."""
    stores = {"this": store}
    for spec in args.tree:
        name, _, path = spec.partition("=")
        stores[name] = tree_store(name, path, server.url)
    wires = {name: s._wired(counters) for name, s in stores.items()}
    for name, s in stores.items():                    # load every script once
        for n in sizes:
            await run_size(s, server, wires[name], n, 1)
    results = {(name, n): [] for name in stores for n in sizes}
    for _ in range(args.rounds):
        for n in sizes:
            usec = {name: 0.0 for name in stores}
            for _ in range(args.batches):
                for name, s in stores.items():
                    usec[name] += (await run_size(s, server, wires[name], n, 1))[0]
            for name in stores:
                results[name, n].append(usec[name] / args.batches)
    print("script usec per request (reserve + commit), median [min-max] over rounds")
    print("| batch size | " + " | ".join(stores) + " |")
    print("|---|" + "---|" * len(stores))
    for n in sizes:
        cells = []
        for name in stores:
            u = sorted(results[name, n])
            cells.append(f"{u[len(u) // 2]:.1f} [{u[0]:.1f}-{u[-1]:.1f}]")
        print(f"| {n} | " + " | ".join(cells) + " |")
    for s in stores.values():
        await s.close()


if __name__ == "__main__":
    asyncio.run(main())
