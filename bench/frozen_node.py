"""A frozen cluster primary (SIGSTOP: a partition or a paused VM, before a failover): how the
orgs on the OTHER nodes fare (bench/results/cluster-frozen.md); under load, what
tests/stores/test_cluster_pipeline.py's `test_a_frozen_node_does_not_hold_the_calls_of_orgs_on_other_nodes`
checks for one call.

    PYTHONPATH=TREE python bench/frozen_node.py LABEL       # run from TREE, for each tree to compare

On a fresh local 3-master cluster: 8 workers reserve in turn for the orgs on the healthy nodes,
2 for the frozen node's orgs, 6 s with every node up, then 6 s with one primary stopped. Per
phase: healthy reserves answered, how many took over 1 s and the longest, the frozen orgs'
answers and failures, the wall time (a call stuck past the 6 s extends it).
"""

import asyncio
import signal
import sys
import time

from proxy.errors import StoreUnavailable
from proxy.stores import Counter, open_store
from proxy.stores.redis import SCRIPTS
from tests.redis_cluster import RedisCluster

ORGS = [f"org{i}" for i in range(12)]
NOW_MS = int(time.time() * 1000) + 86_400_000
EXPIRE = NOW_MS + 3_600_000


def plan(org):
    return [Counter("{bp}:w:day", f"org:{org}", 10 ** 12, -1, EXPIRE),
            Counter("{bp}:w:day", f"user:{org}/u", -1, -1, EXPIRE)]


async def main(label: str) -> None:
    cluster = RedisCluster()
    cluster.start()
    try:
        store = open_store(cluster.url)
        for name in ("batch", "reserve"):                 # no SCRIPT LOAD (every primary) mid-run
            await store._r.script_load(SCRIPTS[name])
        for org in ("", *ORGS):
            await store._register(org)
        homes = {o: store._r.nodes_manager.get_node_from_slot(store._r.keyslot(f"{{bp:{o}}}")).port for o in ORGS}
        victim = homes[ORGS[0]]
        proc = cluster.procs[cluster.ports.index(victim)]
        healthy = [o for o in ORGS if homes[o] != victim]
        frozen = [o for o in ORGS if homes[o] == victim]
        n = [0]

        async def worker(orgs, done, lat):
            i = 0
            while time.monotonic() < done:
                org = orgs[i % len(orgs)]
                i += 1
                t = time.monotonic()
                try:
                    await store.reserve(f"x{n[0]}", plan(org), 0, 0, NOW_MS, False)
                    lat.append(time.monotonic() - t)
                except StoreUnavailable:
                    lat.append(-(time.monotonic() - t))
                n[0] += 1

        for phase, freeze in (("all up", False), ("one frozen", True)):
            if freeze:
                proc.send_signal(signal.SIGSTOP)
            t0 = time.monotonic()
            lat_h: list[float] = []
            lat_f: list[float] = []
            await asyncio.gather(*(worker(healthy, t0 + 6, lat_h) for _ in range(8)),
                                 *(worker(frozen, t0 + 6, lat_f) for _ in range(2)))
            ok = [x for x in lat_h if x >= 0]
            print(f"{label} {phase}: healthy answered {len(ok)}, over 1 s {sum(x > 1 for x in ok)}, "
                  f"longest {max(map(abs, lat_h)):.2f} s; frozen answered {sum(x >= 0 for x in lat_f)}, "
                  f"failed {sum(x < 0 for x in lat_f)}; wall {time.monotonic() - t0:.1f} s", flush=True)
        proc.send_signal(signal.SIGCONT)
        await store.close()
    finally:
        cluster.stop()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "tree"))
