"""The ledger on one Redis and on a Redis Cluster, many orgs: pairs/s and the Redis work per request.

    python bench/cluster_bench.py [--seconds 4] [--concurrency 32] [--orgs 200]

Starts its own redis-server and a local 3-master Redis Cluster (tests/redis_cluster.py), both
without persistence, and runs reserve+commit pairs over `--orgs` orgs (round robin) under
bench/proxy_bench.py's policy (global day, org day and month, user minute and day limited: the
global limit makes every request spend from its org's leased allowance on the cluster). From
each server's `INFO commandstats` (summed over the cluster's nodes) it prints, per request:
script calls, all commands (those run inside scripts included), the scripts' server
microseconds, and the share of those landing on the busiest node (the lender's, for the
cluster). bench/cluster_sim.py takes the per-call costs printed here as its inputs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from proxy.ledger import Amounts, Ledger, Reservation, Scope  # noqa: E402
from proxy.stores import open_store  # noqa: E402
from bench.ledger_bench import POLICY  # noqa: E402
from tests.redis_cluster import RedisCluster  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

_SCRIPTS = ("evalsha", "eval")


def scopes(org: str) -> tuple[Scope, ...]:
    return (Scope("global", "*"), Scope("org", org), Scope("user", f"{org}/alice"),
            Scope("provider", "openai"), Scope("model", "gpt-4o"))


async def run(url: str, seconds: float, concurrency: int, orgs: int) -> tuple[float, int]:
    store = open_store(url)
    ledger = Ledger(store, POLICY)
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            res = await ledger.reserve(uuid.uuid4().hex, Amounts(1200, 9000), scopes(f"org{i % orgs}"))
            assert isinstance(res, Reservation), res
            await ledger.commit(res, Amounts(900, 7000))
            done += 1
            i += concurrency

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    rate = done / (time.perf_counter() - t0)
    await store.close()
    return rate, done


def commandstats(info: str) -> dict[str, tuple[int, int]]:
    out = {}
    for line in info.replace("\r", "").split("\n"):
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            out[name.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
    return out


def per_request(stats: list[dict[str, tuple[int, int]]], n: int) -> dict[str, float]:
    scripts = [sum(v[0] for k, v in s.items() if k in _SCRIPTS) for s in stats]
    script_us = [sum(v[1] for k, v in s.items() if k in _SCRIPTS) for s in stats]
    commands = sum(v[0] for s in stats for k, v in s.items() if k not in ("info", "config", "cluster"))
    return {"script calls": sum(scripts) / n, "commands": commands / n, "script server us": sum(script_us) / n,
            "us per script call": sum(script_us) / max(1, sum(scripts)),
            "busiest node share": max(script_us) / max(1, sum(script_us))}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--orgs", type=int, default=200)
    a = ap.parse_args()
    single, cluster = RedisServer(), RedisCluster()
    single.start()
    cluster.start()
    try:
        rows = {}
        for name, url, read, reset in (
                ("redis", single.url, lambda: [single.command("INFO", "commandstats").decode()],
                 lambda: single.command("CONFIG", "RESETSTAT")),
                ("cluster (3 masters)", cluster.url,
                 lambda: [cluster.command(p, "INFO", "commandstats") for p in cluster.ports],
                 lambda: [cluster.command(p, "CONFIG", "RESETSTAT") for p in cluster.ports])):
            reset()
            rate, n = asyncio.run(run(url, a.seconds, a.concurrency, a.orgs))
            rows[name] = {"pairs/s": rate, **per_request([commandstats(s) for s in read()], n)}
        print(f"{a.orgs} orgs, {a.concurrency} concurrent, {a.seconds:g} s each; per request (reserve + commit):")
        print(f"{'':28}" + "".join(f"{k:>22}" for k in rows))
        for field in next(iter(rows.values())):
            print(f"{field:28}" + "".join(f"{r[field]:>22.2f}" for r in rows.values()))
    finally:
        single.stop()
        cluster.stop()


if __name__ == "__main__":
    main()
