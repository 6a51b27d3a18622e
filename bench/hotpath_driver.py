"""The proxy's own CPU per request, without sockets: an A/B of checkouts, low noise.

    python bench/hotpath_driver.py [--requests 3000] [--rounds 4] [--tree NAME=PATH ...]

Each run builds the app of one checkout (the bench's config and policy: memory store, budgets
at global, org and user scopes), starts its lifetimes, and drives `Application._handle` (the
middlewares, the router, the gateway, the ledger, the memory store, settlement) with mocked
requests of the bench's body, 32 at a time, against a stub upstream that answers a canned chat
completion at once. What it times (process CPU per request) is the proxy's own code and the
part of aiohttp around a handler; not HTTP parsing, sockets or the upstream client, which the
pass-through pays too. Requests are built before the clock starts and the collector is kept
off them (frozen), so GC is not measured either: bench/proxy_bench.py measures everything.

Checkouts run alternately in fresh processes pinned to one core (`taskset`, core 0), every
round timed `--rounds` times after a warm-up; the report is the median [min-max] per checkout.
bench/results/hotpath-2.md used it to size changes of a few µs that a wrk run cannot see.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
BODY = b'{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Say hello in one word."}],"max_tokens":16}'
ANSWER = json.dumps({
    "id": "chatcmpl-x", "object": "chat.completion", "created": 1, "model": "gpt-4o-mini-2024-07-18",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello!", "refusal": None},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 13, "completion_tokens": 2, "total_tokens": 15}}, separators=(",", ":")).encode()


class _Pairs(list):
    def items(self):
        return self


_HTTP1 = False      # set by _drive: does the checkout under test have proxy/http1.py?


class _Answer:
    """What the gateway reads of an upstream response."""
    status = 200
    content_type = "application/json"

    def __init__(self) -> None:
        from multidict import CIMultiDict, CIMultiDictProxy
        pairs = [("Content-Type", "application/json"), ("Content-Length", str(len(ANSWER))),
                 ("Date", "Sun, 29 Nov 2026 02:00:00 GMT"), ("Server", "fast")]
        # proxy/http1.py's answers hold (name, value) pairs; aiohttp's (older trees) a multidict
        self.headers = _Pairs(pairs) if _HTTP1 else CIMultiDictProxy(CIMultiDict(pairs))

    async def read(self) -> bytes:
        return ANSWER

    def release(self) -> None:
        pass

    def close(self) -> None:
        pass


async def _drive(requests: int, rounds: int) -> list[float]:
    """CPU µs per request of each timed round, in this process (the checkout on sys.path)."""
    from unittest import mock

    from aiohttp import web
    from aiohttp.streams import StreamReader
    from aiohttp.test_utils import make_mocked_request

    from proxy import app as app_mod
    global _HTTP1
    _HTTP1 = importlib.util.find_spec("proxy.http1") is not None
    sys.path.insert(0, HERE)
    import proxy_bench as pb
    tmp = tempfile.mkdtemp(prefix="bp-driver-")
    try:
        cfg_path = pb.write_config(tmp, pb.Target("driver", "driver", "proxy", "memory", loop="auto"), "memory://", 1)
        cfg, pol = app_mod.load(cfg_path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    app = app_mod.build_app(cfg, pol)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()

    async def post(*args, **kwargs):
        return _Answer()
    app[app_mod.UPSTREAMS].post = post
    loop = asyncio.get_running_loop()
    protocol = mock.Mock(_reading_paused=False)
    headers = {"Host": "127.0.0.1:8000", "Authorization": "Bearer bench", "Content-Type": "application/json",
               "Content-Length": str(len(BODY))}

    def request():
        payload = StreamReader(protocol, 2 ** 16, loop=loop)
        payload.feed_data(BODY)
        payload.feed_eof()
        return make_mocked_request("POST", "/v1/chat/completions", app=app, payload=payload, headers=headers)

    async def one(req) -> None:
        resp = await app._handle(req)
        if resp.status != 200:
            raise RuntimeError(f"the proxy answered {resp.status}: {resp.body!r}")

    tasks = app[app_mod.TASKS]
    out = []
    for r in range(rounds + 1):                     # round 0 warms up
        reqs = [request() for _ in range(requests)]
        gc.collect()
        gc.freeze()                                 # the mocked requests are not the proxy's
        t0 = time.process_time()
        for i in range(0, requests, 32):
            await asyncio.gather(*(one(q) for q in reqs[i:i + 32]))
        while len(tasks):                           # settlements
            await asyncio.sleep(0)
        spent = time.process_time() - t0
        del reqs
        gc.unfreeze()
        gc.collect()
        if r:
            out.append(spent / requests * 1e6)
    await runner.cleanup()
    return out


def _child(argv: list[str]) -> int:
    requests, rounds = int(argv[0]), int(argv[1])
    import uvloop
    print(json.dumps(uvloop.run(_drive(requests, rounds))))
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=3000, help="requests per timed round")
    p.add_argument("--rounds", type=int, default=4, help="processes per checkout (3 timed rounds each)")
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="a checkout to compare (default: this one); repeatable")
    args = p.parse_args(argv)
    trees = [t.split("=", 1) for t in args.tree] or [["this", REPO]]
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []
    got: dict[str, list[float]] = {name: [] for name, _ in trees}
    for r in range(args.rounds):
        for name, path in (trees if r % 2 == 0 else trees[::-1]):
            env = {**os.environ, "PYTHONPATH": os.path.abspath(path), "LOG_LEVEL": "ERROR"}
            run = subprocess.run([*pin, sys.executable, os.path.abspath(__file__), "--child", str(args.requests), "3"],
                                 env=env, cwd=path, capture_output=True, text=True, timeout=600)
            if run.returncode:
                print(run.stderr[-3000:], file=sys.stderr)
                return 1
            got[name] += json.loads(run.stdout.strip().splitlines()[-1])
    base = statistics.median(got[trees[0][0]])
    for name, values in got.items():
        med = statistics.median(values)
        print(f"{name}: {med:.1f} µs per request [{min(values):.1f}-{max(values):.1f}], x{med / base:.3f}")
    return 0


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        sys.exit(_child(sys.argv[2:]))
    sys.exit(main())
