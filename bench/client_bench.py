"""The upstream client's own CPU per request: aiohttp's ClientSession against proxy/http1.py.

    python bench/client_bench.py [--requests 3000] [--concurrency 16] [--rounds 5] [--stream] [--loop uvloop]

Starts bench/fast_upstream.py on core 1 and, in this process on core 0, sends --requests POSTs
of the bench's usual chat body with --concurrency in flight, reading every answer whole (or, with
--stream, streamed, piece by piece). The two clients alternate round by round in one process;
each cell is this process's CPU time (user + system) per request, median [min-max] over rounds,
and the ratio of the medians. Both clients are set up as the proxy sets them up: aiohttp with the
proxy's old session options (unlimited pool, no decompression, no cookie jar, a read timeout),
http1 with a prebuilt request head.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import aiohttp  # noqa: E402
from measure import PLAIN_BODY, STREAM_BODY, free_port, wait_port  # noqa: E402  (puts the repo on sys.path)

from proxy import http1  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
HEADERS = {"Content-Type": "application/json", "Accept-Encoding": "identity", "Authorization": "Bearer sk-bench"}


async def _aiohttp_round(url: str, body: bytes, n: int, conc: int, stream: bool) -> float:
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
                                    auto_decompress=False, skip_auto_headers=("User-Agent",),
                                    cookie_jar=aiohttp.DummyCookieJar())
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=600)
    headers = dict(HEADERS, Accept="text/event-stream") if stream else HEADERS

    async def one() -> None:
        async with session.post(url, data=body, headers=headers, timeout=timeout) as up:
            if stream:
                async for _ in up.content.iter_any():
                    pass
            else:
                await up.read()
    try:
        return await _timed(one, n, conc)
    finally:
        await session.close()


async def _http1_round(url: str, body: bytes, n: int, conc: int, stream: bool) -> float:
    client = http1.Client()
    target = http1.Url.parse(url)
    head = target.head("POST", dict(HEADERS, Accept="text/event-stream") if stream else HEADERS)

    async def one() -> None:
        up = await client.send(target, head, body, 10, 600)
        try:
            if stream:
                async for _ in up.iter_any():
                    pass
            else:
                await up.read()
        finally:
            up.release()
    try:
        return await _timed(one, n, conc)
    finally:
        await client.close()


async def _timed(one, n: int, conc: int) -> float:
    for _ in range(conc):                    # warm the pool
        await one()
    left = n

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await one()
    start = time.process_time()
    await asyncio.gather(*(worker() for _ in range(conc)))
    return (time.process_time() - start) / n * 1e6


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--stream", action="store_true")
    p.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    args = p.parse_args()
    port = free_port()
    up = subprocess.Popen(["taskset", "-c", "1", sys.executable, os.path.join(HERE, "fast_upstream.py"),
                           "--port", str(port)])
    try:
        os.sched_setaffinity(0, {0})
        wait_port(port, up, "fast_upstream", None)
        url = f"http://127.0.0.1:{port}/v1/chat/completions"
        body = (STREAM_BODY if args.stream else PLAIN_BODY).encode()
        if args.loop == "uvloop":
            import uvloop
            run = uvloop.run
        else:
            run = asyncio.run
        results: dict[str, list[float]] = {"aiohttp": [], "http1": []}
        for r in range(args.rounds):
            order = ("aiohttp", "http1") if r % 2 == 0 else ("http1", "aiohttp")
            for name in order:
                fn = _aiohttp_round if name == "aiohttp" else _http1_round
                results[name].append(run(fn(url, body, args.requests, args.concurrency, args.stream)))
        med = {k: statistics.median(v) for k, v in results.items()}
        print(f"client CPU per request, {args.requests} requests x {args.rounds} rounds, "
              f"{args.concurrency} in flight, {'streamed' if args.stream else 'whole'} answers, {args.loop}:")
        for k, v in results.items():
            print(f"  {k:8s} {med[k]:6.1f} us  [{min(v):.1f}-{max(v):.1f}]")
        print(f"  http1 / aiohttp: x{med['http1'] / med['aiohttp']:.2f}")
        return 0
    finally:
        up.terminate()
        up.wait()


if __name__ == "__main__":
    sys.exit(main())
