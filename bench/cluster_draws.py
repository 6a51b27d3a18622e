"""How often a busy org draws on a shared scope's lender, and what it costs Redis: the ledger on a
local 3-master Redis Cluster, one org under concurrent load, one checkout against another.

    python bench/cluster_draws.py [--requests 4000] [--concurrency 32] [--rounds 2] [--tree NAME=PATH ...]

Each round runs every checkout once (alternating, each in a child process with that checkout
first on sys.path, against a fresh cluster): --requests reserve + commit pairs of bench/ledger_bench.py's
request (1,200 tokens, 9,000 micro-USD, five scopes; its policy limits the global scope, which the
cluster store spends from a leased allowance), --concurrency at a time. Per request it prints the
draws (ClusterStore._draw_for calls), the reserves refused once on the allowance (EXISTS runs
only on reserve.lua's refusal path), script calls and their usec (INFO commandstats summed over
the masters: wall time, so compare within a round), and pairs/s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

CHILD = r'''
import asyncio, json, sys, time, uuid
import redis
from bench.ledger_bench import POLICY, SCOPES
from proxy.ledger import Amounts, Ledger, Reservation
from proxy.stores import open_store
from tests.redis_cluster import RedisCluster

async def main(cluster, n, concurrency):
    store = open_store(cluster.url)
    draws = [0]
    draw = store._draw_for

    async def counted(*args, **kwargs):
        draws[0] += 1
        return await draw(*args, **kwargs)
    store._draw_for = counted
    ledger = Ledger(store, POLICY)
    res = await ledger.reserve("warm", Amounts(1, 1), SCOPES)           # connections, scripts
    await ledger.commit(res, Amounts(1, 1))
    draws[0] = 0
    for port in cluster.ports:
        redis.Redis(port=port).config_resetstat()
    left = [n]

    async def worker():
        while left[0] > 0:
            left[0] -= 1
            res = await ledger.reserve(uuid.uuid4().hex, Amounts(1200, 9000), SCOPES)
            assert isinstance(res, Reservation), res
            await ledger.commit(res, Amounts(900, 7000))
    start = time.monotonic()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    seconds = time.monotonic() - start
    stats = {}
    for port in cluster.ports:
        for name, v in redis.Redis(port=port).info("commandstats").items():
            s = stats.setdefault(name.split("_", 1)[1], [0, 0])
            s[0] += v["calls"]
            s[1] += v["usec"]
    await store.close()
    print(json.dumps({"draws": draws[0] / n, "refused": stats.get("exists", [0, 0])[0] / n,
                      "scripts": stats.get("evalsha", [0, 0])[0] / n, "usec": stats.get("evalsha", [0, 0])[1] / n,
                      "pairs/s": n / seconds}))

cluster = RedisCluster()
cluster.start()
try:
    asyncio.run(main(cluster, int(sys.argv[1]), int(sys.argv[2])))
finally:
    cluster.stop()
'''


def run(tree: str, requests: int, concurrency: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, str(requests), str(concurrency)], cwd=tree,
                         env=dict(os.environ, PYTHONPATH=tree), capture_output=True, text=True, timeout=1200)
    if out.returncode != 0:
        raise SystemExit(f"{tree}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=4000)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH")
    args = p.parse_args()
    trees = [(name, os.path.abspath(path)) for name, _, path in (t.partition("=") for t in args.tree)]
    trees.append(("this checkout", ROOT))
    print(f"{args.requests} reserve + commit pairs, {args.concurrency} at a time, one org, per request:\n")
    print("| round | checkout | draws | reserves refused once | script calls | script usec | pairs/s |")
    print("|---:|---|---:|---:|---:|---:|---:|")
    for r in range(1, args.rounds + 1):
        for name, path in trees:
            x = run(path, args.requests, args.concurrency)
            print(f"| {r} | {name} | {x['draws']:.3f} | {x['refused']:.3f} | {x['scripts']:.3f} | "
                  f"{x['usec']:.1f} | {x['pairs/s']:,.0f} |", flush=True)


if __name__ == "__main__":
    main()
