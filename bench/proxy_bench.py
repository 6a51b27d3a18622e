"""End-to-end benchmark of budget-proxy against a fast fake upstream, every configuration side by side.

    python bench/proxy_bench.py [--quick] [--rounds 3] [--workers N] [--only NAME,…] [--tree NAME=PATH …]

Targets of one run (all of them each round, --rounds rounds, the order rotated every round):

  direct               wrk -> bench/fast_upstream.py
  passthrough          wrk -> bench/passthrough.py (bare aiohttp: read, POST on, answer) -> upstream
  memory               wrk -> budget-proxy, memory store, 1 worker -> upstream
  redis                wrk -> budget-proxy, Redis store (its own redis-server), 1 worker -> upstream
  redis-xN             the same with `serve --workers N` (--workers, default: the machine's cores)
  redis-cluster        budget-proxy, `store: redis+cluster://…` on a local 3-master Redis Cluster
                       (tests/redis_cluster.py), 1 worker -> upstream
  *-asyncio            passthrough, memory and redis again on asyncio's own event loop

The plain targets run on uvloop when it is installed (the proxy's default then), the -asyncio
ones on asyncio's loop; without uvloop there are no -asyncio targets and everything is asyncio.
`--tree NAME=PATH` adds memory@NAME, redis@NAME and redis-cluster@NAME (the last on the plain
targets' loop): the proxy started from another checkout (its own code, its own defaults), to
compare commits in one run (bench/results/issue9-regression.md).

Each target: requests/s at saturation (wrk -t1 -c<connections>), latency p50/p99 at one connection
(wrk -t1 -c1), time to the first `data:` byte of a streamed answer (sequential requests on one
connection), the proxy's CPU (process and workers) per request, and on Redis, over the saturation
run, per proxied request: commands (INFO commandstats calls, those run inside scripts included),
command µs (the sum of usec over all commandstats entries, as issue 10 counts it: a script's own
usec already includes the commands it runs, which count again under their own names), EVALSHA
calls and µs each, and the redis-server's CPU µs (INFO cpu: the whole server, network included).
On the cluster every figure is summed over its three masters, and the busiest master's share of
the script time is shown. Server time per request (the <= 40 µs target) is the script time: the
usec of EVALSHA/EVAL, which already includes every command a script runs (issue 10's "2 scripts
of ~169 µs each" = its "~340 µs"); the sum over all commandstats entries counts those inner
commands twice and is shown beside it as an upper bound.
The bench's one caller is one org, so the cluster serves it from one shard plus the lender's shard
for the global scope's leased allowance: this measures what the cluster client and the leases
cost one proxy process, not how a cluster spreads many orgs (bench/cluster_bench.py does that).
The policy limits global, org and user scopes with limits never reached: every proxied request is
reserved and committed, none refused.

Placement (2 cores): a 1-worker proxy and the pass-through run alone on core 0 (`taskset`); the
upstream, wrk, redis-server, the cluster's three masters and the TTFB client (this process) on
core 1. An N-worker proxy runs on every core: on 2 cores its second worker shares core 1 with the
load generator, so its scaling figure understates what N cores of its own would give. The report
ends with the foreign load seen on core 0 over every 1-worker measurement.

Every cell of the report is the median over rounds [min–max]. Ratios are taken inside a round
(each proxy against the same round's pass-through on the same event loop; N workers against the
same round's one worker), then their median. Targets checked (issue 10): one worker with Redis
>= 60 % of the pass-through, memory >= 75 %; N workers >= 1.7x one worker; added latency with Redis
at one connection <= 1 ms p50 over the pass-through; <= 40 µs of Redis command time and <= 25
commands per request. Exit status: 0 when the run worked (targets may fail), 1 when it did not.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field

from bench_report import report
from measure import (BENCH_DIR, PLAIN_BODY, REPO, BenchError, Children, RedisServer, WrkResult, _cpu_model,
                     _git, _log_tail, _on_sigterm, _version, busy_fraction, core_times, ensure_wrk, free_port,
                     http_json, pinned, redis_calls, redis_command, redis_cpu_seconds, run_wrk, tree_cpu_seconds,
                     wait_idle, wait_port)
from tests.redis_cluster import RedisCluster  # noqa: E402  (measure put the repo on sys.path)
from ttfb import TtfbResult, run_ttfb

UPSTREAM = os.path.join(BENCH_DIR, "fast_upstream.py")
PASSTHROUGH = os.path.join(BENCH_DIR, "passthrough.py")


# Variables the proxy reads that would override the generated config.
_OVERRIDES = ("APP_ENV", "BUDGET_ENFORCEMENT_MODE", "BUDGET_POLICY_PATH", "REDIS_URL", "REDIS_HOST",
              "REDIS_PORT", "REDIS_DB", "REDIS_PASSWORD", "BUDGET_PROXY_HOST", "BUDGET_PROXY_PORT",
              "PYTHONPATH")

POLICY_YAML = """\
# Generated by bench/proxy_bench.py: limits so large that nothing is ever refused, but present
# at every scope level the default config uses, so each request snapshots, reserves and commits.
version: 1
timezone: UTC
defaults:
  global:
    day: {usd: 1000000}
  org:
    day: {usd: 1000000}
    month: {usd: 1000000}
  user:
    minute: {tokens: 1000000000}
    day: {usd: 100000}
"""

CONFIG_YAML = """\
# Generated by bench/proxy_bench.py.
environment: dev
enforcement: strict
store: {store}
policy: {policy}
providers:
  fake:
    base_url: "http://127.0.0.1:{upstream_port}/v1"
    api_key_env: null
models:
  gpt-4o-mini:
    provider: fake
    input_per_million: 0.15
    output_per_million: 0.6
keys: {{}}
"""


# --- targets ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class Target:
    name: str
    title: str
    kind: str                   # direct | passthrough | proxy
    store: str = ""             # memory | redis | cluster
    workers: int = 1
    loop: str = "asyncio"       # asyncio | uvloop
    tree: str = REPO            # the checkout whose proxy runs
    floor: str = ""             # the pass-through it is compared with (same loop)


def has_uvloop() -> bool:
    import importlib.util
    return importlib.util.find_spec("uvloop") is not None


def plan(args) -> list[Target]:
    fast = "uvloop" if has_uvloop() else "asyncio"
    n = args.workers
    out = [Target("direct", "direct (no proxy)", "direct"),
           Target("passthrough", f"bare aiohttp pass-through ({fast})", "passthrough", loop=fast),
           Target("memory", f"proxy, memory, 1 worker ({fast})", "proxy", "memory", loop=fast, floor="passthrough"),
           Target("redis", f"proxy, Redis, 1 worker ({fast})", "proxy", "redis", loop=fast, floor="passthrough"),
           Target(f"redis-x{n}", f"proxy, Redis, {n} workers ({fast})", "proxy", "redis", workers=n, loop=fast,
                  floor="passthrough"),
           Target("redis-cluster", f"proxy, Redis Cluster (3 masters), 1 worker ({fast})", "proxy", "cluster",
                  loop=fast, floor="passthrough")]
    if fast == "uvloop":
        out += [Target("passthrough-asyncio", "bare aiohttp pass-through (asyncio)", "passthrough"),
                Target("memory-asyncio", "proxy, memory, 1 worker (asyncio)", "proxy", "memory",
                       floor="passthrough-asyncio"),
                Target("redis-asyncio", "proxy, Redis, 1 worker (asyncio)", "proxy", "redis",
                       floor="passthrough-asyncio")]
    floor = "passthrough-asyncio" if fast == "uvloop" else "passthrough"
    for name, path in args.tree:
        for store in ("memory", "redis"):
            out.append(Target(f"{store}@{name}", f"proxy, {store}, tree {name}", "proxy", store,
                              tree=os.path.abspath(path), floor=floor))
        out.append(Target(f"redis-cluster@{name}", f"proxy, Redis Cluster, tree {name} ({fast})", "proxy", "cluster",
                          loop=fast, tree=os.path.abspath(path), floor="passthrough"))
    if args.only:
        keep = set(args.only)
        keep |= {t.floor for t in out if t.name in keep and t.floor}
        keep |= {"direct"}
        if any(t.workers > 1 for t in out if t.name in keep):
            keep.add("redis")
        out = [t for t in out if t.name in keep]
    return out


# --- one target ------------------------------------------------------------------------------

@dataclass
class TargetResult:
    name: str
    sat: WrkResult | None = None
    cpu_us_per_req: float | None = None     # the proxy's CPU (all its processes) per request at saturation
    cpu_busy: float | None = None           # the proxy's CPU use at saturation, in cores
    one: WrkResult | None = None
    ttfb: TtfbResult | None = None
    redis: dict[str, float] = field(default_factory=dict)     # per proxied request, saturation run
    notes: list[str] = field(default_factory=list)
    foreign: dict[str, float] = field(default_factory=dict)  # other processes' share of the proxy's core, per run


Rounds = list[dict[str, TargetResult]]


class Redis:
    """The bench's redis-server, or its local 3-master Redis Cluster, and per-request figures from
    their INFO over one interval (summed over the cluster's masters)."""

    def __init__(self, children: Children, core: int | None, cluster: bool = False) -> None:
        if cluster:
            self.server = RedisCluster()
            children.others.append(self.server)
            self.server.start()
            self.ports, procs = list(self.server.ports), list(self.server.procs)
        else:
            self.server = RedisServer()
            children.redis.append(self.server)
            self.server.start()
            self.ports, procs = [self.server.port], [self.server.proc]
        if core is not None:
            for proc in procs:
                if proc is not None:
                    os.sched_setaffinity(proc.pid, {core})
        self.url = self.server.url

    def flush(self) -> None:
        for port in self.ports:
            redis_command(port, "FLUSHALL")

    def mark(self) -> tuple[list[dict], float]:
        return [redis_calls(p) for p in self.ports], sum(redis_cpu_seconds(p) for p in self.ports)

    _SKIP = ("info", "config|resetstat", "flushall")
    _SCRIPTS = ("evalsha", "eval")

    def per_request(self, a, b, requests: int) -> dict[str, float]:
        n = max(requests, 1)
        calls: dict[str, int] = {}
        usec: dict[str, int] = {}
        node_script_us = []
        for before, after in zip(a[0], b[0]):
            for k, (c, u) in after.items():
                if k in self._SKIP:
                    continue
                calls[k] = calls.get(k, 0) + c - before.get(k, (0, 0))[0]
                usec[k] = usec.get(k, 0) + u - before.get(k, (0, 0))[1]
            node_script_us.append(sum(after.get(k, (0, 0))[1] - before.get(k, (0, 0))[1] for k in self._SCRIPTS))
        scripts = sum(calls.get(k, 0) for k in self._SCRIPTS)
        script_us = sum(usec.get(k, 0) for k in self._SCRIPTS)
        out = {"commands": sum(calls.values()) / n, "script_us": script_us / n,
               "command_us": sum(usec.values()) / n, "evalsha": scripts / n,
               "evalsha_us": script_us / max(scripts, 1), "cpu_us": (b[1] - a[1]) * 1e6 / n}
        if len(self.ports) > 1:
            out["busiest_node"] = 100 * max(node_script_us) / max(script_us, 1)
        out["breakdown"] = ", ".join(f"{k} {v / n:.1f}" for k, v in sorted(calls.items(), key=lambda kv: -kv[1])
                                     if v / n >= 0.05)
        return out


def measure(t: Target, port: int, args, wrk: str, children: Children, pid: int | None,
            redis: Redis | None) -> TargetResult:
    res = TargetResult(t.name)
    core = args.proxy_core if t.workers == 1 else None

    def mark():
        return core_times(), tree_cpu_seconds(pid) if pid else 0.0, time.monotonic()

    def check(what: str, a, b) -> None:
        if core is None or not pid or b[2] <= a[2]:
            return
        foreign = max(0.0, busy_fraction(a[0], b[0], core) - (b[1] - a[1]) / (b[2] - a[2]))
        res.foreign[what] = foreign
        if foreign > 0.05:
            res.notes.append(f"{t.name}: other processes used {100 * foreign:.0f} % of core {core} during the "
                             f"{what} run")

    run_wrk(wrk, args.load_core, port, args.warmup, args.connections, children)
    a, ra = mark(), redis.mark() if redis else None
    res.sat = run_wrk(wrk, args.load_core, port, args.seconds, args.connections, children)
    b, rb = mark(), redis.mark() if redis else None
    if pid:
        res.cpu_us_per_req = (b[1] - a[1]) / max(res.sat.requests, 1) * 1e6
        res.cpu_busy = (b[1] - a[1]) / (b[2] - a[2])
    if redis:
        res.redis = redis.per_request(ra, rb, res.sat.requests)
    check("saturation", a, b)
    a = mark()
    res.one = run_wrk(wrk, args.load_core, port, args.seconds, 1, children)
    check("one-connection", a, mark())
    a = mark()
    res.ttfb = run_ttfb(port, args.ttfb_requests, warmup=max(10, args.ttfb_requests // 20),
                        time_limit=max(60.0, args.ttfb_requests * 0.2))
    check("TTFB", a, mark())
    cpu = f", CPU {res.cpu_us_per_req:.0f} µs/req" if res.cpu_us_per_req is not None else ""
    rds = (f", Redis {res.redis['commands']:.1f} cmds {res.redis['script_us']:.0f} µs/req"
           if res.redis else "")
    print(f"[{t.name}] {res.sat.rps:,.0f} req/s{cpu}{rds}; -c1 p50 {res.one.p50_ms:.3f} ms p99 "
          f"{res.one.p99_ms:.3f} ms; TTFB p50 {res.ttfb.p50_ms:.3f} ms", flush=True)
    for r, what in ((res.sat, "saturation"), (res.one, "one connection")):
        if r.error_count:
            res.notes.append(f"{t.name}: wrk reported errors in the {what} run: {r.errors}")
    return res


def write_config(tmp: str, t: Target, store: str, upstream_port: int) -> str:
    policy_path = os.path.join(tmp, "bench-policy.yaml")
    if not os.path.exists(policy_path):
        with open(policy_path, "w") as f:
            f.write(POLICY_YAML)
    cfg_path = os.path.join(tmp, f"config-{t.name}.yaml".replace("@", "-"))
    with open(cfg_path, "w") as f:
        f.write(CONFIG_YAML.format(store=store, policy=policy_path, upstream_port=upstream_port))
    return cfg_path


def start(t: Target, children: Children, tmp: str, upstream_port: int, redis: Redis | None,
          args) -> tuple[int, subprocess.Popen, str]:
    port = free_port()
    log_path = os.path.join(tmp, f"{t.name}.log".replace("@", "-"))
    env = {k: v for k, v in os.environ.items() if k not in _OVERRIDES}
    env.update(LOG_LEVEL="WARNING", PYTHONUNBUFFERED="1", PYTHONPATH=t.tree)
    if t.kind == "passthrough":
        argv = [sys.executable, PASSTHROUGH, "--port", str(port), "--upstream",
                f"http://127.0.0.1:{upstream_port}", "--loop", t.loop]
    else:
        store = redis.url if redis is not None else "memory://"
        argv = [sys.executable, "-m", "proxy.cli", "serve", "--config", write_config(tmp, t, store, upstream_port),
                "--port", str(port)]
        if t.workers > 1:
            argv += ["--workers", str(t.workers)]
        if t.tree == REPO:
            argv += ["--loop", t.loop]
    cores = args.proxy_core if t.workers == 1 else args.all_cores
    proc = children.start(t.name, pinned(cores, argv), env=env, log_path=log_path, cwd=t.tree)
    wait_port(port, proc, t.name, log_path)
    status, headers, body = http_json(port, "POST", "/v1/chat/completions", PLAIN_BODY)
    if status != 200:
        raise BenchError(f"{t.name} answered {status}: {body}" + _log_tail(log_path))
    if t.kind == "proxy" and not any(h.lower().startswith("x-budget-remaining") for h in headers):
        raise BenchError(f"{t.name} answered without x-budget-remaining-* headers: no budget was taken")
    return port, proc, log_path


def _error_lines(log_path: str) -> list[str]:
    with open(log_path, errors="replace") as f:
        return [ln for ln in f.read().splitlines() if " ERROR " in ln or " CRITICAL " in ln or "Traceback" in ln]


def run_target(t: Target, args, wrk: str, children: Children, tmp: str, up_port: int,
               redis: Redis | None) -> TargetResult:
    if t.kind == "direct":
        return measure(t, up_port, args, wrk, children, None, None)
    if redis is not None:
        redis.flush()
    port, proc, log_path = start(t, children, tmp, up_port, redis, args)
    res = measure(t, port, args, wrk, children, proc.pid, redis)
    if proc.poll() is not None:
        raise BenchError(f"{t.name} died during the run" + _log_tail(log_path))
    children.stop(proc, timeout=30)
    errors = _error_lines(log_path)
    if errors:
        res.notes.append(f"{t.name} logged {len(errors)} error line(s), first: {errors[0][:200]}")
    return res


# --- main ------------------------------------------------------------------------------------

def quiet_before(label: str, args, notes: list[str]) -> None:
    """Before each target, wait (bounded) for both cores to be quiet; note it when they are not."""
    if args.proxy_core is None or args.wait_idle <= 0:
        return
    fr = wait_idle([args.proxy_core, args.load_core], 0.10, args.wait_idle)
    if any(x >= 0.10 for x in fr):
        notes.append(f"before {label}: the machine was busy (core {args.proxy_core}: {100 * fr[0]:.0f} %, "
                     f"core {args.load_core}: {100 * fr[1]:.0f} %) after waiting {args.wait_idle:.0f} s")


def _tree(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not os.path.isdir(os.path.join(path, "proxy")):
        raise argparse.ArgumentTypeError(f"expected NAME=PATH to a checkout with proxy/, got {text!r}")
    return name, path


def parse_args(argv: list[str] | None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    p.add_argument("--seconds", type=float, default=None, help="length of each wrk run (default 10, --quick 3)")
    p.add_argument("--quick", action="store_true", help="short runs: 3 s wrk runs, 200 TTFB requests")
    p.add_argument("--rounds", type=int, default=1, help="times every target is measured, interleaved")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="workers of the N-worker target")
    p.add_argument("--connections", type=int, default=32, help="wrk connections for the saturation run")
    p.add_argument("--ttfb-requests", type=int, default=None, help="streamed requests per target (default 1000)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of wrk warm-up per target (default 3)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated target names (their pass-through and direct are kept)")
    p.add_argument("--tree", type=_tree, action="append", default=[], metavar="NAME=PATH",
                   help="also run the memory and Redis proxy from this checkout (repeatable)")
    p.add_argument("--proxy-core", type=int, default=0)
    p.add_argument("--load-core", type=int, default=1)
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores")
    p.add_argument("--wait-idle", type=float, default=10.0, metavar="S",
                   help="wait up to S seconds for both cores to be quiet before each target (default 10)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (configs, logs)")
    p.add_argument("--markdown", metavar="FILE", help="also write the report (table, targets, notes) to FILE")
    p.add_argument("--json", metavar="FILE", help="also write every round's raw results to FILE")
    args = p.parse_args(argv)
    args.seconds = args.seconds or (3.0 if args.quick else 10.0)
    args.ttfb_requests = args.ttfb_requests or (200 if args.quick else 1000)
    args.warmup = args.warmup if args.warmup is not None else (1.0 if args.quick else 3.0)
    if not (1 <= args.seconds <= 600) or not (1 <= args.ttfb_requests <= 100_000) or args.connections < 1 \
            or not 1 <= args.rounds <= 20 or args.workers < 2:
        p.error("--seconds 1..600, --ttfb-requests 1..100000, --connections >= 1, --rounds 1..20, --workers >= 2")
    cores = os.cpu_count() or 1
    args.all_cores = None
    if args.no_pin or not shutil.which("taskset") or cores < 2:
        if not args.no_pin:
            print(f"warning: {cores} core(s) or no taskset: running unpinned", file=sys.stderr)
        args.proxy_core = args.load_core = None
    return args


def metadata(wrk: str) -> dict:
    import aiohttp
    try:
        import uvloop
        uv = uvloop.__version__
    except ImportError:
        uv = "not installed"
    return {"cpu": _cpu_model(), "cores": os.cpu_count(), "python": f"Python {platform.python_version()}",
            "aiohttp": aiohttp.__version__, "uvloop": uv, "wrk": _version([wrk, "--version"]).split(" [")[0],
            "redis": _version(["redis-server", "--version"]).split(" sha=")[0],
            "commit": _git("rev-parse", "--short", "HEAD") or "?",
            "dirty": " (+ uncommitted changes)" if _git("status", "--porcelain", "--untracked-files=no") else "",
            "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "loadavg_start": "%.2f %.2f %.2f" % os.getloadavg()}


def run(args, wrk: str, children: Children, tmp: str, notes: list[str]) -> tuple[list[Target], Rounds]:
    targets = plan(args)
    up_port = free_port()
    up_log = os.path.join(tmp, "upstream.log")
    up = children.start("upstream", pinned(args.load_core, [sys.executable, UPSTREAM, "--port", str(up_port)]),
                        log_path=up_log)
    wait_port(up_port, up, "fast upstream", up_log)
    stores = {"redis": Redis(children, args.load_core) if any(t.store == "redis" for t in targets) else None,
              "cluster": Redis(children, args.load_core, cluster=True) if any(t.store == "cluster" for t in targets)
              else None}
    rounds: Rounds = []
    for i in range(args.rounds):
        order = targets[i % len(targets):] + targets[:i % len(targets)]
        rounds.append({})
        for t in order:
            print(f"round {i + 1}/{args.rounds}: {t.name}", flush=True)
            quiet_before(f"{t.name} (round {i + 1})", args, notes)
            res = run_target(t, args, wrk, children, tmp, up_port, stores.get(t.store))
            rounds[-1][t.name] = res
            notes.extend(res.notes)
        for name in ("redis", "redis-cluster"):
            if rounds[-1].get(name) and rounds[-1][name].redis:
                notes.append(f"round {i + 1}, {name}: commands per request: {rounds[-1][name].redis['breakdown']}")
    return targets, rounds


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = ("python bench/proxy_bench.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))).strip()
    signal.signal(signal.SIGTERM, _on_sigterm)
    signal.signal(signal.SIGHUP, _on_sigterm)
    signal.signal(signal.SIGINT, signal.default_int_handler)    # even when started with SIGINT ignored
    wrk = ensure_wrk()
    if args.load_core is not None:
        os.sched_setaffinity(0, {args.load_core})      # this process is the TTFB client
    meta = metadata(wrk)
    children = Children()
    tmp = tempfile.mkdtemp(prefix="bp-bench-")
    notes: list[str] = []
    ok = False
    try:
        targets, rounds = run(args, wrk, children, tmp, notes)
        meta["loadavg_end"] = "%.2f %.2f %.2f" % os.getloadavg()
        text = report(targets, rounds, args, meta, command)
        notes_text = "\nNotes:\n" + "".join(f"- {n}\n" for n in notes) if notes else ""
        print("\n" + text + "\n" + notes_text)
        if args.markdown:
            with open(args.markdown, "w") as f:
                f.write(text + "\n" + notes_text)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"command": command, "meta": meta, "rounds": [{k: asdict(v) for k, v in r.items()}
                                                                        for r in rounds]}, f, indent=1)
        ok = True
    except BenchError as exc:
        print(f"\nbench failed: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted; stopping child processes", file=sys.stderr)
    finally:
        children.stop_all()
        if args.keep or not ok:
            print(f"(temporary files kept in {tmp})", file=sys.stderr)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
