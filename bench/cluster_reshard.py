"""Requests while an operator reshards the cluster: failures and latency, before and during.

    python bench/cluster_reshard.py [--orgs 200] [--concurrency 32] [--seconds 3] [--slots 2700] [--pad 50]

Starts a local 3-master Redis Cluster (tests/redis_cluster.py), gives every org `--pad` extra
keys in its slot (a busy org's records: they make its slot take longer to move), then runs
reserve+commit pairs through the Ledger over `--orgs` orgs (round robin) under
bench/proxy_bench.py's policy (the global limit makes every request spend from its org's leased
allowance, so the lender's slot is exercised too): first `--seconds` of steady load, then while
`redis-cli --cluster reshard` moves `--slots` slots from the first master to the second, as an
operator growing or rebalancing the cluster would. Prints, per phase, the pairs per second, the
latency of a pair (p50, p99, max) and the pairs that failed; the reshard's duration; and how
many calls the store sent again after a TRYAGAIN or CLUSTERDOWN (cluster_client.Direct.call).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import redis as redis_sync  # noqa: E402

from bench.cluster_bench import scopes  # noqa: E402
from bench.ledger_bench import POLICY  # noqa: E402
from proxy.ledger import Amounts, Ledger, Reservation  # noqa: E402
from proxy.stores import open_store  # noqa: E402
from tests.redis_cluster import RedisCluster  # noqa: E402


def pad(cluster: RedisCluster, orgs: int, keys: int) -> None:
    """`keys` keys in every org's slot (redis-py's cluster client routes each to its node)."""
    client = redis_sync.RedisCluster(host="127.0.0.1", port=cluster.ports[0])
    try:
        for org in range(orgs):
            with client.pipeline() as p:
                for i in range(keys):
                    p.set(f"{{bp:org{org}}}:pad:{i}", "x")
                p.execute()
    finally:
        client.close()


async def run(cluster: RedisCluster, a: argparse.Namespace) -> dict:
    store = open_store(cluster.url)
    ledger = Ledger(store, POLICY)
    phase = "steady"
    lat: dict[str, list[float]] = {"steady": [], "during reshard": []}
    failed: dict[str, list[str]] = {"steady": [], "during reshard": []}
    stop = False

    async def worker(w: int) -> None:
        i = w
        while not stop:
            mine = phase
            t0 = time.perf_counter()
            try:
                res = await ledger.reserve(uuid.uuid4().hex, Amounts(1200, 9000), scopes(f"org{i % a.orgs}"))
                assert isinstance(res, Reservation), res
                assert await ledger.commit(res, Amounts(900, 7000))
                lat[mine].append(time.perf_counter() - t0)
            except Exception as exc:        # noqa: BLE001 - counted and shown
                failed[mine].append(f"{type(exc).__name__}: {exc}"[:160])
            i += a.concurrency

    workers = asyncio.gather(*(worker(w) for w in range(a.concurrency)))
    started = time.perf_counter()
    await asyncio.sleep(a.seconds)
    steady_s = time.perf_counter() - started
    phase = "during reshard"
    src, dst = cluster.ports[0], cluster.ports[1]
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        cluster.cli, "--cluster", "reshard", f"127.0.0.1:{src}",
        "--cluster-from", cluster.command(src, "CLUSTER", "MYID"),
        "--cluster-to", cluster.command(dst, "CLUSTER", "MYID"),
        "--cluster-slots", str(a.slots), "--cluster-yes", "--cluster-pipeline", str(a.pipeline),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE)
    _, err = await proc.communicate()
    reshard_s = time.perf_counter() - t0
    stop = True
    await workers
    tried_again = getattr(store._calls, "tried_again", "n/a")     # (n/a: a checkout before Direct.call waited)
    await store.close()
    if proc.returncode != 0:
        raise SystemExit(f"redis-cli --cluster reshard failed: {err.decode()[-400:]}")
    return {"lat": lat, "failed": failed, "seconds": {"steady": steady_s, "during reshard": reshard_s},
            "tried_again": tried_again}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--orgs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=3, help="steady load before the reshard")
    ap.add_argument("--slots", type=int, default=2700, help="slots moved from the first master to the second")
    ap.add_argument("--pad", type=int, default=50, help="extra keys in every org's slot")
    ap.add_argument("--pipeline", type=int, default=10, help="keys per MIGRATE (redis-cli --cluster-pipeline)")
    a = ap.parse_args()
    cluster = RedisCluster()
    cluster.start()
    try:
        pad(cluster, a.orgs, a.pad)
        out = asyncio.run(run(cluster, a))
    finally:
        cluster.stop()
    print(f"{a.orgs} orgs ({a.pad} extra keys each), {a.concurrency} concurrent; reshard of {a.slots} slots "
          f"(--cluster-pipeline {a.pipeline}) took {out['seconds']['during reshard']:.2f} s; "
          f"calls sent again after TRYAGAIN/CLUSTERDOWN: {out['tried_again']}")
    print("| phase | pairs/s | p50 ms | p99 ms | max ms | failed |")
    print("|---|---:|---:|---:|---:|---:|")
    for phase, lat in out["lat"].items():
        lat = sorted(lat)
        n = len(lat)
        q = (lambda f: lat[min(n - 1, int(f * n))] * 1000) if n else (lambda f: float("nan"))
        print(f"| {phase} | {n / out['seconds'][phase]:,.0f} | {statistics.median(lat) * 1000 if n else float('nan'):.2f} "
              f"| {q(0.99):.2f} | {(lat[-1] * 1000 if n else float('nan')):.2f} | {len(out['failed'][phase])} |")
    for phase, errors in out["failed"].items():
        for e in sorted(set(errors))[:5]:
            print(f"  {phase}: {errors.count(e)} x {e}")


if __name__ == "__main__":
    main()
