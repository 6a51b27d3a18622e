"""Two source trees' cluster stores A/B on ONE local 3-master Redis Cluster, interleaved rounds.

    python bench/cluster_ab.py --a /work/main --b . [--orgs 200] [--rounds 5] [--seconds 4]

Each round runs bench/cluster_bench.py's `run` (reserve+commit pairs over `--orgs` orgs, round
robin, its policy) once per tree, in a fresh process with that tree first on sys.path, in
alternating order, against the same cluster (flushed before each run). Per run: pairs/s, the
bench process's CPU per pair (the client's cost: what a proxy process pays), and from the
nodes' INFO commandstats, script calls and all commands per pair. Printed: each tree's median
[min-max] over the rounds, the ratio b/a of the medians and
the ratios within each round. On a shared, noisy machine only
figures from one run of this script compare.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.cluster_bench import commandstats  # noqa: E402
from tests.redis_cluster import RedisCluster  # noqa: E402

_CHILD = """
import asyncio, json, sys, time
sys.path.insert(0, {tree!r})
from bench.cluster_bench import run
cpu = time.process_time()
rate, n = asyncio.run(run({url!r}, {seconds!r}, {concurrency!r}, {orgs!r}))
print(json.dumps({{"rate": rate, "n": n, "cpu_us": (time.process_time() - cpu) * 1e6 / max(1, n)}}))
"""


def one(tree: str, cluster: RedisCluster, a) -> dict[str, float]:
    cluster.flush()
    for port in cluster.ports:
        cluster.command(port, "CONFIG", "RESETSTAT")
    code = _CHILD.format(tree=os.path.abspath(tree), url=cluster.url, seconds=a.seconds,
                         concurrency=a.concurrency, orgs=a.orgs)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          cwd=os.path.abspath(tree), env={**os.environ, "PYTHONPATH": os.path.abspath(tree)})
    out = json.loads(done.stdout.strip().splitlines()[-1])
    stats = [commandstats(cluster.command(p, "INFO", "commandstats")) for p in cluster.ports]
    n = out["n"]
    scripts = sum(v[0] for s in stats for k, v in s.items() if k in ("evalsha", "eval"))
    commands = sum(v[0] for s in stats for k, v in s.items() if k not in ("info", "config", "cluster"))
    return {"pairs/s": out["rate"], "client CPU us/pair": out["cpu_us"],
            "script calls/pair": scripts / n, "commands/pair": commands / n}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True, help="the baseline tree")
    ap.add_argument("--b", required=True, help="the tree measured against it")
    ap.add_argument("--orgs", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=4)
    ap.add_argument("--rounds", type=int, default=5)
    a = ap.parse_args()
    cluster = RedisCluster()
    cluster.start()
    runs: dict[str, list[dict[str, float]]] = {"a": [], "b": []}
    try:
        for r in range(a.rounds):
            for name in (("a", "b") if r % 2 == 0 else ("b", "a")):
                runs[name].append(one(getattr(a, name), cluster, a))
                print(f"round {r + 1} {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[name][-1].items()),
                      flush=True)
    finally:
        cluster.stop()
    print(f"\n{a.orgs} orgs, {a.concurrency} concurrent, {a.seconds:g} s x {a.rounds} rounds each; "
          f"a = {a.a}, b = {a.b}; median [min-max]:")
    for field in runs["a"][0]:
        cells = []
        for name in ("a", "b"):
            vals = [x[field] for x in runs[name]]
            cells.append(f"{statistics.median(vals):10.2f} [{min(vals):.2f}-{max(vals):.2f}]")
        ratio = statistics.median(x[field] for x in runs["b"]) / max(1e-9, statistics.median(x[field] for x in runs["a"]))
        rounds = ", ".join(f"{y[field] / max(1e-9, x[field]):.2f}" for x, y in zip(runs["a"], runs["b"]))
        print(f"{field:22} a {cells[0]:>28}   b {cells[1]:>28}   b/a {ratio:.2f} (per round {rounds})")


if __name__ == "__main__":
    main()
