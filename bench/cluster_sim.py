"""How many Redis operations, and how many Cluster shards, a large deployment needs.

    python bench/cluster_sim.py [--processes 100] [--orgs 10000] [--rate 50000] [--seconds 20]

A deterministic simulation (fixed seed, ~5 s) of the cluster store's rules (proxy/stores/cluster.py,
lend.lua, allowance.lua): requests arrive at `--rate` per second, each from an org drawn from a
Zipf(1) popularity over `--orgs` orgs and served by one of `--processes` processes at random. Each
request spends from `--allowances` leased allowances (default 2: a global and a model day limit in
USD). Per request it counts exactly the calls the store makes: reserve and settle on the org's
shard; per allowance found short, a draw on the lender's shard, a credit and a reserve retry on the
org's; per allowance a process gives back (idle IDLE_SECONDS, checked at each 5 s sweep), a read
and a give on the org's shard and a return on the lender's; per sweep, one SSCAN and SWEEP_TENANTS
lease reads. Server time per call comes from bench/cluster_bench.py on this project's 2-core VM
(script ~50 us under load, a plain read ~3 us); a shard is planned at 70 % of one core. Orgs map
to shards uniformly (CRC16 slots over equal slot ranges); the lender lives on one shard.
"""

from __future__ import annotations

import argparse
import bisect
import itertools
import os
import random
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from redis.crc import key_slot  # noqa: E402

from proxy.stores.cluster import CHUNK_REQUESTS, FRACTION, IDLE_SECONDS, SWEEP_TENANTS  # noqa: E402

US_SCRIPT = 50.0          # server us per script call (bench/cluster_bench.py, this VM, under load)
US_READ = 3.0             # server us per plain read (HGET, ZRANGEBYSCORE, SSCAN page)
COMMANDS_PER_SCRIPT = 10  # commands a script runs, itself included (bench/cluster_bench.py: ~20 per request)
SHARD_BUDGET_US = 700_000  # server us per second one shard is planned for (70 % of a core)
SWEEP_SECONDS = 5.0
USD_PER_REQUEST = 9000     # micro-dollars reserved per request (bench/proxy_bench.py's request)
FREE = 500_000_000_000     # micro-dollars free in the lender at the start ($500k of a $1M day)


class Load:
    """Calls per second: per org (on its slot's shard), on the lender's shard, and sweep reads
    (spread evenly: the sweep pages through every org)."""
    def __init__(self, orgs: int) -> None:
        self.org_scripts = [0.0] * orgs
        self.org_reads = [0.0] * orgs
        self.lender_scripts = 0.0
        self.lender_reads = 0.0
        self.sweep_reads = 0.0


def simulate(processes: int, orgs: int, rate: int, seconds: float, allowances: int, seed: int = 1) -> Load:
    rng = random.Random(seed)
    weights = list(itertools.accumulate(1 / (k + 1) for k in range(orgs)))
    load = Load(orgs)
    held: dict[tuple[int, int], float] = {}      # (org x allowance, process) -> its last draw time
    room = [0] * (orgs * allowances)             # allowance unused, micro-dollars
    holders = [0] * allowances
    drew = [False] * (orgs * allowances)
    free = [FREE] * allowances
    next_sweep = [rng.uniform(0, SWEEP_SECONDS) for _ in range(processes)]
    n = int(rate * seconds)
    for i in range(n):
        now = i / rate
        org = bisect.bisect_left(weights, rng.random() * weights[-1])
        proc = rng.randrange(processes)
        load.org_scripts[org] += 2                                 # reserve + settle
        for a in range(allowances):
            k = org * allowances + a
            if room[k] < USD_PER_REQUEST:                          # short: draw, credit, retry
                if not drew[k]:
                    drew[k], holders[a] = True, holders[a] + 1
                need = USD_PER_REQUEST - room[k]
                extra = min(CHUNK_REQUESTS * USD_PER_REQUEST, (free[a] - need) // (FRACTION * holders[a]))
                room[k] += need + extra
                free[a] -= need + extra
                held[k, proc] = now
                load.lender_scripts += 1
                load.org_scripts[org] += 2
            room[k] -= USD_PER_REQUEST
        if now >= next_sweep[proc]:                                # this process's sweep tick
            next_sweep[proc] += SWEEP_SECONDS
            load.lender_reads += 1                                 # SSCAN page of the tenant set
            load.sweep_reads += SWEEP_TENANTS                      # lease indexes
            for key in [h for h in held if h[1] == proc and now - held[h] >= IDLE_SECONDS]:
                del held[key]
                k = key[0]
                free[k % allowances] += room[k]
                room[k] = 0
                load.lender_reads += 1                             # the lender's total
                load.org_scripts[k // allowances] += 1             # give
                load.lender_scripts += 1                           # returned
    load.org_scripts = [c / seconds for c in load.org_scripts]
    load.lender_scripts /= seconds
    load.lender_reads /= seconds
    load.sweep_reads /= seconds
    return load


def shard_loads(load: Load, shards: int, ns: str = "bp") -> list[float]:
    """Server us per second on each shard: orgs by their tag's CRC16 slot over equal slot
    ranges, the lender on the shard of `{ns}`, sweep reads spread evenly."""
    out = [load.sweep_reads * US_READ / shards] * shards
    for i, calls in enumerate(load.org_scripts):
        out[key_slot(f"{{{ns}:org{i}}}".encode()) * shards // 16384] += calls * US_SCRIPT
    out[key_slot(f"{{{ns}}}".encode()) * shards // 16384] += load.lender_scripts * US_SCRIPT + load.lender_reads * US_READ
    return out


def balanced_loads(load: Load, shards: int, ns: str = "bp") -> list[float]:
    """Server us per second on each shard when slots are placed by load (heaviest slot first on
    the least loaded shard), as an operator rebalancing slots by weight would approach."""
    slots: dict[int, float] = {}
    for i, calls in enumerate(load.org_scripts):
        slot = key_slot(f"{{{ns}:org{i}}}".encode())
        slots[slot] = slots.get(slot, 0.0) + calls * US_SCRIPT
    lender = key_slot(f"{{{ns}}}".encode())
    slots[lender] = slots.get(lender, 0.0) + load.lender_scripts * US_SCRIPT + load.lender_reads * US_READ
    out = [load.sweep_reads * US_READ / shards] * shards
    for us in sorted(slots.values(), reverse=True):
        out[out.index(min(out))] += us
    return out


def shards_needed(load: Load, loads=shard_loads, most: int = 256) -> int:
    """The fewest shards whose busiest stays under SHARD_BUDGET_US (-1: none up to `most`, as
    when one org alone is over it)."""
    return next((s for s in range(1, most + 1) if max(loads(load, s)) <= SHARD_BUDGET_US), -1)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--processes", type=int, default=100)
    ap.add_argument("--orgs", type=int, default=10_000)
    ap.add_argument("--rate", type=int, default=50_000)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--allowances", type=int, default=2)
    a = ap.parse_args()
    load = simulate(a.processes, a.orgs, a.rate, a.seconds, a.allowances)
    org_scripts = sum(load.org_scripts)
    scripts = org_scripts + load.lender_scripts
    reads = load.lender_reads + load.sweep_reads
    s = shards_needed(load)
    b = shards_needed(load, balanced_loads)
    loads = shard_loads(load, max(s, 1))
    hottest = max(load.org_scripts) * US_SCRIPT
    print(f"{a.processes} processes, {a.orgs:,} orgs (Zipf 1), {a.rate:,} requests/s, {a.allowances} leased "
          f"allowances per request, {a.seconds:g} s simulated")
    print(f"script calls/s      {scripts:>12,.0f}  ({scripts / a.rate:.3f} per request; on org shards "
          f"{org_scripts:,.0f}, on the lender's {load.lender_scripts:,.0f})")
    print(f"plain reads/s       {reads:>12,.0f}  (sweeps and give-backs)")
    print(f"commands/s          {scripts * COMMANDS_PER_SCRIPT + reads:>12,.0f}  (scripts' own commands included)")
    print(f"server time         {sum(loads) / 1e6:>12,.2f}  cores (the lender's calls "
          f"{(load.lender_scripts * US_SCRIPT + load.lender_reads * US_READ) / 1e6:.2f}, the busiest org {hottest / 1e6:.2f})")
    print(f"shards needed       {s:>12}  masters with equal slot ranges (busiest at {max(loads) / 1e4:.0f} % "
          f"of a core; planned <= {SHARD_BUDGET_US / 1e4:.0f} %), plus a replica each for failover")
    print(f"                    {b:>12}  masters with slots placed by load (busiest at "
          f"{max(balanced_loads(load, max(b, 1))) / 1e4:.0f} %)")


if __name__ == "__main__":
    main()
