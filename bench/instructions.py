"""CPU instructions per request, counted by valgrind (callgrind): the proxy against the pass-through.

    python bench/instructions.py [--requests 1000] [--concurrency 8] [--tree NAME=PATH ...]

Why: on this machine a wrk run's CPU per request moves by a third between rounds (the same build:
154-223 µs for the pass-through in one run), so a change of a few percent cannot be seen by timing.
Instructions executed in user space are the same from run to run whatever the machine is doing
(two runs of one build differ by about 0.1 %), and their ratio between the proxy and the
pass-through tracks the wrk bench's CPU ratio (1.45 here, 1.44 in bench/results/issue10-session14-final.md).
They miss what instructions do not show: cache misses, and the kernel's side of system calls
(the proxy and the pass-through make the same ones: two reads and two writes a request, `strace -c`).

Each target runs as bench/proxy_bench.py runs it (its config and policy: memory store, limits at
the global, org and user scopes; uvloop; pinned to core 0), but under `valgrind --tool=callgrind`,
against bench/fast_upstream.py (native, core 1). A client in this process (core 1) sends
--warmup requests, the counters are zeroed (`callgrind_control -z`), it sends --requests more
(--concurrency at a time, keep-alive, the bench's body), and the counters are dumped
(`callgrind_control -d`): instructions of that interval / requests. Targets: the pass-through,
the proxy of this checkout, and the proxy of every --tree (another checkout, for an A/B of commits).
Needs valgrind (Debian: `apt-get install valgrind`).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from measure import PLAIN_BODY, BenchError, Children, free_port, wait_port  # noqa: E402
from proxy_bench import _OVERRIDES, PASSTHROUGH, UPSTREAM, Target, write_config  # noqa: E402


async def _drive(port: int, requests: int, concurrency: int) -> None:
    """`requests` POSTs of the bench's body over `concurrency` keep-alive connections; each answer
    must be a 200 with a Content-Length body (the bench's non-streaming answer)."""
    body = PLAIN_BODY.encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nAuthorization: Bearer bench\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    left = requests

    async def worker() -> None:
        nonlocal left
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            while left > 0:
                left -= 1
                writer.write(head + body)
                status = await reader.readline()
                if not status.startswith(b"HTTP/1.1 200"):
                    raise BenchError(f"answered {status!r}")
                length = 0
                while (line := await reader.readline()) not in (b"\r\n", b""):
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
        finally:
            writer.close()

    await asyncio.gather(*(worker() for _ in range(concurrency)))


def _dumped_instructions(out_prefix: str) -> int:
    """Instructions in the dump `callgrind_control -d` wrote (<prefix>.1): its `summary:` line."""
    paths = sorted(glob.glob(out_prefix + ".*"))
    if not paths:
        raise BenchError(f"callgrind wrote no dump at {out_prefix}.*")
    with open(paths[0]) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise BenchError(f"no summary line in {paths[0]}")


def measure(t: Target, args, children: Children, tmp: str, up_port: int) -> float:
    port = free_port()
    log_path = os.path.join(tmp, f"{t.name}.log".replace("@", "-"))
    out = os.path.join(tmp, f"callgrind-{t.name}".replace("@", "-"))
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    env.update(LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", PYTHONPATH=t.tree)
    if t.kind == "passthrough":
        argv = [sys.executable, PASSTHROUGH, "--port", str(port), "--upstream", f"http://127.0.0.1:{up_port}",
                "--loop", t.loop]
    else:
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", write_config(tmp, t, "memory://", up_port),
                "--port", str(port), "--loop", t.loop]
    valgrind = ["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}", "--dump-instr=no"]
    proc = children.start(t.name, ["taskset", "-c", str(args.proxy_core)] + valgrind + argv, env=env,
                          log_path=log_path, cwd=t.tree)
    try:
        wait_port(port, proc, t.name, log_path, timeout=300)
        asyncio.run(_drive(port, args.warmup, args.concurrency))
        subprocess.run(["callgrind_control", "-z", str(proc.pid)], check=True, capture_output=True)
        asyncio.run(_drive(port, args.requests, args.concurrency))
        subprocess.run(["callgrind_control", "-d", str(proc.pid)], check=True, capture_output=True)
        # The dump is written by the process itself, at its next basic block.
        deadline = time.monotonic() + 60
        while not glob.glob(out + ".*") and time.monotonic() < deadline:
            time.sleep(0.1)
        return _dumped_instructions(out) / args.requests
    finally:
        children.stop(proc, timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=1000)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--concurrency", type=int, default=8)
    p.add_argument("--tree", action="append", default=[], metavar="NAME=PATH",
                   help="also count the proxy of another checkout")
    p.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    p.add_argument("--proxy-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    args = p.parse_args(argv)
    if shutil.which("valgrind") is None or shutil.which("callgrind_control") is None:
        print("needs valgrind (apt-get install valgrind)", file=sys.stderr)
        return 1
    targets = [Target("passthrough", "pass-through", "passthrough", loop=args.loop),
               Target("memory", "proxy, memory", "proxy", "memory", loop=args.loop)]
    for spec in args.tree:
        name, _, path = spec.partition("=")
        targets.append(Target(f"memory@{name}", f"proxy, memory, tree {name}", "proxy", "memory", loop=args.loop,
                              tree=os.path.abspath(path)))
    os.sched_setaffinity(0, {args.load_core})
    children = Children()
    tmp = tempfile.mkdtemp(prefix="bp-instr-")
    try:
        up_port = free_port()
        up_log = os.path.join(tmp, "upstream.log")
        up = children.start("upstream", ["taskset", "-c", str(args.load_core), sys.executable, UPSTREAM,
                                         "--port", str(up_port)], log_path=up_log)
        wait_port(up_port, up, "upstream", up_log)
        counts = {t.name: measure(t, args, children, tmp, up_port) for t in targets}
    except BenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    base = counts["passthrough"]
    print(f"instructions per request ({args.requests} requests after {args.warmup}, "
          f"{args.concurrency} at a time, {args.loop}):\n")
    print("| target | instructions / request | vs pass-through |\n|---|---:|---:|")
    for t in targets:
        print(f"| {t.title} | {counts[t.name]:,.0f} | {counts[t.name] / base:.3f}x |")
    print("\nmemory-store throughput target (>= 75 % of the pass-through) needs <= 1.333x "
          "(CPU-bound on one core: throughput ratio = 1 / CPU ratio)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
