"""Reserve+commit pairs per second on each store, for a request touching all five scopes.

    python bench/ledger_bench.py [--seconds 5] [--concurrency 32] [--redis-url URL]

Without --redis-url it starts its own redis-server on a free port (no persistence). It also
counts Redis round trips per request from the server's own statistics (target: exactly 2 —
one reserve, one commit).
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
POLICY = parse({"version": 1, "defaults": {
    "global": {"day": {"usd": 1e9}}, "org": {"day": {"usd": 1e9}, "month": {"usd": 1e9}},
    "user": {"minute": {"tokens": 10**12}, "day": {"usd": 1e9}},
    "provider": {"minute": {"tokens": 10**12}}, "model": {"minute": {"tokens": 10**12}}}}, "bench")


async def pairs_per_second(url: str, seconds: float, concurrency: int) -> float:
    store = open_store(url)
    ledger = Ledger(store, POLICY)
    done = 0
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
    await store.close()
    return rate


def _calls(server: RedisServer) -> int:
    """Script calls the server has run: the ledger's only commands on the request path.

    (total_commands_processed would also count every redis.call inside the scripts.)"""
    info = server.command("INFO", "commandstats").decode()
    total = 0
    for line in info.split("\r\n"):
        if line.startswith(("cmdstat_evalsha:", "cmdstat_eval:", "cmdstat_script|load:")):
            total += int(line.split("calls=")[1].split(",")[0])
    return total


async def round_trips(server: RedisServer, n: int = 200) -> float:
    store = open_store(server.url)
    ledger = Ledger(store, POLICY)
    warm = await ledger.reserve("warm", Amounts(1, 1), SCOPES)   # connection set-up, SCRIPT LOAD
    await ledger.commit(warm, Amounts(1, 1))
    before = _calls(server)
    for _ in range(n):
        res = await ledger.reserve(uuid.uuid4().hex, Amounts(1, 1), SCOPES)
        await ledger.commit(res, Amounts(1, 1))
    after = _calls(server)
    await store.close()
    return (after - before) / n


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--redis-url")
    args = ap.parse_args()
    server = None
    url = args.redis_url
    if url is None:
        server = RedisServer()
        server.start()
        url = server.url
    try:
        mem = await pairs_per_second("memory://", args.seconds, args.concurrency)
        red = await pairs_per_second(url, args.seconds, args.concurrency)
        print(f"memory store: {mem:10.0f} reserve+commit pairs/s (5 scopes x 4 windows)")
        print(f"redis store:  {red:10.0f} reserve+commit pairs/s (5 scopes x 4 windows, "
              f"concurrency {args.concurrency})")
        if server is not None:
            print(f"redis round trips per request (script calls; under load several share one "
                  f"pipelined write): {await round_trips(server):.2f}")
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    asyncio.run(main())
