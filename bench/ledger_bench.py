"""Reserve+commit pairs per second on each store, and the Redis work one request costs.

    python bench/ledger_bench.py [--seconds 5] [--concurrency 32] [--redis-url URL]

Without --redis-url it starts its own redis-server on a free port (no persistence). A request
touches all five scopes under the policy bench/proxy_bench.py uses (global day, org day and month,
user minute and day limited). From the server's own `INFO commandstats` it prints, per request
(reserve + commit): round trips (script calls; target exactly 2), commands (every command,
the script calls and the commands they run included; target <= 25) and server microseconds (the
scripts' own `usec`, which includes the commands they run; target <= 40).

With its own redis-server it measures both: the concurrent run (--concurrency workers; under load
the Redis store sends the calls that wait as one batch script call, so the figures fall with load)
and 5 rounds of sequential requests (every call its own script call). `--rounds N` repeats the
concurrent run N times and prints the median [min-max]. To compare another checkout, copy this
file into its bench/ and run it from there (it imports the proxy next to it).
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
from proxy.policy import parse  # noqa: E402
from proxy.stores import open_store  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

SCOPES = (Scope("global", "*"), Scope("org", "acme"), Scope("user", "alice"),
          Scope("provider", "openai"), Scope("model", "gpt-4o"))
# bench/proxy_bench.py's policy: limits present at every level the default config uses, never hit.
POLICY = parse({"version": 1, "timezone": "UTC", "defaults": {
    "global": {"day": {"usd": 1e6}}, "org": {"day": {"usd": 1e6}, "month": {"usd": 1e6}},
    "user": {"minute": {"tokens": 10**9}, "day": {"usd": 1e5}}}}, "bench")


async def pairs_per_second(url: str, seconds: float, concurrency: int,
                           server: RedisServer | None = None) -> tuple[float, dict[str, float]]:
    """Reserve+commit pairs per second from `concurrency` workers; with `server`, also the Redis
    work per pair over the run (see `_per_request`) and this process's CPU per pair."""
    store = open_store(url)
    ledger = Ledger(store, POLICY)
    if server is not None:
        warm = await ledger.reserve("warm", Amounts(1, 1), SCOPES)     # connection set-up, SCRIPT LOAD
        await ledger.commit(warm, Amounts(1, 1))
        before, cpu0 = _commandstats(server), _cpu_us(server)
    done = 0
    proc0 = time.process_time()
    stop = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < stop:
            res = await ledger.reserve(uuid.uuid4().hex, Amounts(1200, 9000), SCOPES)
            assert isinstance(res, Reservation)
            await ledger.commit(res, Amounts(900, 7000))
            done += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = done / (time.perf_counter() - t0)
    stats = {"client_cpu": (time.process_time() - proc0) * 1e6 / done}
    if server is not None:
        cpu1, after = _cpu_us(server), _commandstats(server)
        trips, commands, usec, _ = _per_request(before, after, done)
        stats.update(trips=trips, commands=commands, usec=usec, redis_cpu=(cpu1 - cpu0) / done)
    await store.close()
    return rate, stats


def _per_request(before, after, n: int) -> tuple[float, float, float, dict[str, float]]:
    """(script calls, commands, script usec, commands by name) per request between two
    commandstats readings."""
    diff = {k: (c - before.get(k, (0, 0))[0], u - before.get(k, (0, 0))[1]) for k, (c, u) in after.items()}
    diff.pop("info", None)
    trips = sum(diff.get(k, (0, 0))[0] for k in _SCRIPTS)
    usec = sum(diff.get(k, (0, 0))[1] for k in _SCRIPTS)
    commands = sum(c for c, _ in diff.values())
    by_name = {k: c / n for k, (c, _) in sorted(diff.items(), key=lambda kv: -kv[1][0]) if c}
    return trips / n, commands / n, usec / n, by_name


def _commandstats(server: RedisServer) -> dict[str, tuple[int, int]]:
    """Per command: (calls, usec), commands run inside scripts included (Redis 7 counts them)."""
    out = {}
    for line in server.command("INFO", "commandstats").decode().split("\r\n"):
        if line.startswith("cmdstat_"):
            name, _, rest = line.partition(":")
            fields = dict(kv.split("=", 1) for kv in rest.split(","))
            out[name.removeprefix("cmdstat_")] = (int(fields["calls"]), int(fields["usec"]))
    return out


_SCRIPTS = ("evalsha", "eval", "evalsha_ro", "eval_ro")


def _cpu_us(server: RedisServer) -> float:
    """CPU time of Redis's main thread (user + system), in microseconds: unlike commandstats'
    usec (wall time inside each command) it does not grow when other processes take the core,
    and it includes reading, parsing and answering the calls."""
    info = dict(line.split(":", 1) for line in server.command("INFO", "cpu").decode().split("\r\n")
                if ":" in line)
    return (float(info["used_cpu_user_main_thread"]) + float(info["used_cpu_sys_main_thread"])) * 1e6


async def redis_work(server: RedisServer, n: int = 500) -> tuple[float, float, float, float, dict[str, float]]:
    """(round trips, commands, server usec, main-thread CPU usec, commands by name) per sequential
    reserve+commit."""
    store = open_store(server.url)
    ledger = Ledger(store, POLICY)
    warm = await ledger.reserve("warm", Amounts(1, 1), SCOPES)   # connection set-up, SCRIPT LOAD
    await ledger.commit(warm, Amounts(1, 1))
    before, cpu0 = _commandstats(server), _cpu_us(server)
    for _ in range(n):
        res = await ledger.reserve(uuid.uuid4().hex, Amounts(1200, 9000), SCOPES)
        await ledger.commit(res, Amounts(900, 7000))
    cpu1, after = _cpu_us(server), _commandstats(server)
    await store.close()
    trips, commands, usec, by_name = _per_request(before, after, n)
    return trips, commands, usec, (cpu1 - cpu0) / n, by_name


def _spread(values: list[float], spec: str) -> str:
    """The median [min-max] of `values` (just the value when there is one)."""
    v = sorted(values)
    mid = format(v[len(v) // 2], spec)
    return mid if len(v) == 1 else f"{mid} [{format(v[0], spec)}-{format(v[-1], spec)}]"


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--redis-url")
    ap.add_argument("--rounds", type=int, default=1, help="concurrent Redis runs (median [min-max])")
    ap.add_argument("--redis-only", action="store_true", help="skip the memory store")
    args = ap.parse_args()
    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer()
        server.start()
        url = server.url
    try:
        if not args.redis_only:
            mem, _ = await pairs_per_second("memory://", args.seconds, args.concurrency)
            print(f"memory store: {mem:10.0f} reserve+commit pairs/s (5 scopes x 4 windows)")
        runs = [await pairs_per_second(url, args.seconds, args.concurrency, server) for _ in range(args.rounds)]
        print(f"redis store:  {_spread([r for r, _ in runs], '.0f')} reserve+commit pairs/s "
              f"(5 scopes x 4 windows, concurrency {args.concurrency}); client CPU "
              f"{_spread([s['client_cpu'] for _, s in runs], '.0f')} us per request")
        if server is not None:
            print(f"redis per request at concurrency {args.concurrency}: "
                  f"{_spread([s['trips'] for _, s in runs], '.2f')} script calls, "
                  f"{_spread([s['commands'] for _, s in runs], '.1f')} commands, "
                  f"{_spread([s['usec'] for _, s in runs], '.1f')} us script usec, "
                  f"{_spread([s['redis_cpu'] for _, s in runs], '.1f')} us Redis main-thread CPU")
        if server is not None:
            # usec is wall time inside Redis: on a shared machine other processes inflate it, so
            # the best of several rounds is the figure that compares between runs.
            rounds = [await redis_work(server) for _ in range(5)]
            trips, commands, _, _, by_name = rounds[0]
            usecs = sorted(r[2] for r in rounds)
            cpus = sorted(r[3] for r in rounds)
            print(f"redis per request (reserve + commit, sequential): {trips:.2f} round trips, "
                  f"{commands:.1f} commands, {usecs[0]:.1f} us of server time (scripts' usec; best "
                  f"of 5 rounds, median {usecs[2]:.1f}); Redis main-thread CPU {cpus[0]:.1f} us "
                  f"(median {cpus[2]:.1f})")
            print("  commands: " + ", ".join(f"{k} {v:.2f}" for k, v in by_name.items()))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
