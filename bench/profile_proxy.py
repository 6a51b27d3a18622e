"""Profile the proxy's hot path under load with py-spy (sampling; the proxy runs unmodified).

    python bench/profile_proxy.py [--store redis|memory] [--stream] [--seconds 20] [--top 30]

Starts the fast upstream, (for Redis) its own redis-server, and the proxy pinned as in
bench/proxy_bench.py, drives it with wrk at saturation, and records the proxy with
`py-spy record --function --format raw --nonblocking`. Prints the top functions by self time and
by inclusive time (percent of the samples where the proxy was on CPU) and writes the raw
(collapsed) stacks to --out. Needs py-spy (`pip install py-spy`) and root (or ptrace rights).

Why --nonblocking: py-spy otherwise stops the process for each sample, and a stopped thread
stops on its way back from the kernel, mostly at a system call's return. Those samples pile up
on whatever made a system call: blocking, `Flight.mark_sent` (one getpid() inside
`asyncio.get_running_loop()`, ~0.2 µs) had 3 % of the samples, as much as the whole reservation
code, and the getpid()s 13 % with --native; without stopping, they vanish from the top. Reading
a running process's stack can tear a sample now and then; it does not favour any frame.
`--native` (C frames too) needs the stops: its system call shares are inflated the same way.
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import measure  # noqa: E402
import proxy_bench as pb  # noqa: E402

_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _short(path: str) -> str:
    for marker in ("site-packages/", "lib/python3"):
        if marker in path:
            return path.split(marker, 1)[1]
    if path.startswith(pb.REPO + os.sep):
        return os.path.relpath(path, pb.REPO)
    return path


def parse_raw(path: str) -> tuple[collections.Counter, collections.Counter, int]:
    """(self samples per frame, inclusive samples per frame, total samples) from py-spy raw output."""
    own: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(path) as f:
        for line in f:
            line = line.rstrip("\n")
            stack, _, count = line.rpartition(" ")
            if not stack or not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = []
            for fr in stack.split(";"):
                m = _FRAME.match(fr)
                if m is None:
                    frames.append(fr)
                    continue
                file = _short(m.group("file"))
                frames.append(f"{m.group('func')} ({file}:{m.group('line')})" if m.group("line")
                              else f"{m.group('func')} ({file})")
            if not frames:
                continue
            own[frames[-1]] += n
            for fr in set(frames):
                incl[fr] += n
    return own, incl, total


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--store", choices=("redis", "memory"), default="redis")
    p.add_argument("--stream", action="store_true", help="profile streaming requests instead")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--connections", type=int, default=32)
    p.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--native", action="store_true",
                   help="also sample C frames (py-spy --native; stops the process per sample, so system "
                        "calls are over-counted, see above)")
    p.add_argument("--out", default=None, help="directory for raw stacks and the flamegraph")
    args = p.parse_args(argv)
    if not 1 <= args.seconds <= 600:
        p.error("--seconds must be 1..600")
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 1
    wrk = pb.ensure_wrk()
    signal.signal(signal.SIGTERM, pb._on_sigterm)
    signal.signal(signal.SIGHUP, pb._on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    cores = os.cpu_count() or 1
    proxy_core, load_core = (0, 1) if cores >= 2 and shutil.which("taskset") else (None, None)
    if load_core is not None:
        os.sched_setaffinity(0, {load_core})
    ns = argparse.Namespace(proxy_core=proxy_core, load_core=load_core, all_cores=None)
    out = args.out or tempfile.mkdtemp(prefix="bp-profile-")
    os.makedirs(out, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bp-bench-")
    children = pb.Children()
    body = measure.STREAM_BODY if args.stream else measure.PLAIN_BODY
    try:
        up_port = pb.free_port()
        up_log = os.path.join(tmp, "upstream.log")
        up = children.start("upstream", pb.pinned(load_core, [sys.executable, pb.UPSTREAM, "--port", str(up_port)]),
                            log_path=up_log)
        pb.wait_port(up_port, up, "fast upstream", up_log)
        redis = pb.Redis(children, load_core) if args.store == "redis" else None
        target = pb.Target(args.store, args.store, "proxy", args.store, loop="auto")
        port, proc, log_path = pb.start(target, children, tmp, up_port, redis, ns)
        print(f"warm-up 3 s ({args.store} store, {'streaming' if args.stream else 'non-streaming'})", flush=True)
        pb.run_wrk(wrk, load_core, port, 3, args.connections, children, body)
        raw = os.path.join(out, f"proxy-{args.store}{'-stream' if args.stream else ''}.raw.txt")
        spy_argv = pb.pinned(load_core, [spy, "record", "--pid", str(proc.pid), "--function", "--rate",
                                         str(args.rate), "--duration", str(args.seconds), "--format", "raw",
                                         "--output", raw] + (["--native"] if args.native else ["--nonblocking"]))
        spy_proc = children.start("py-spy", spy_argv, log_path=os.path.join(tmp, "py-spy.log"))
        result: dict = {}

        def load() -> None:
            try:
                result["wrk"] = pb.run_wrk(wrk, load_core, port, args.seconds + 2, args.connections, children, body)
            except pb.BenchError as exc:
                result["error"] = exc

        t = threading.Thread(target=load, daemon=True)
        t.start()
        try:
            spy_proc.wait(timeout=args.seconds + 60)
        except subprocess.TimeoutExpired:
            raise pb.BenchError("py-spy did not finish") from None
        t.join(timeout=args.seconds + 90)
        if "error" in result:
            raise result["error"]
        if not os.path.exists(raw):
            raise pb.BenchError("py-spy wrote no output" + pb._log_tail(os.path.join(tmp, "py-spy.log")))
        w = result.get("wrk")
        if w is not None:
            print(f"load during the profile: {w.rps:,.0f} req/s, errors {w.errors}")
        own, incl, total = parse_raw(raw)
        print(f"\n{total} samples of the proxy on CPU ({args.rate}/s for {args.seconds} s; "
              f"idle time excluded)\n")
        print(f"### Top {args.top} by self time\n\n| self % | function (file:first line) |\n|---:|---|")
        for fr, n in own.most_common(args.top):
            print(f"| {100 * n / total:.1f} | `{fr}` |")
        print(f"\n### Top {args.top} by inclusive time\n\n| incl % | function (file:first line) |\n|---:|---|")
        for fr, n in incl.most_common(args.top):
            print(f"| {100 * n / total:.1f} | `{fr}` |")
        print(f"\nraw stacks (collapsed format, for speedscope or flamegraph.pl): {raw}")
        return 0
    except pb.BenchError as exc:
        print(f"profile failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 1
    finally:
        children.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
