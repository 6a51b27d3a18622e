"""The report of bench/proxy_bench.py: the side-by-side table (median [min–max] over rounds, ratios
taken inside each round), issue 10's targets checked, and same-round comparisons (uvloop against
asyncio, one checkout against another)."""

from __future__ import annotations

import statistics
from typing import TYPE_CHECKING, Callable

from measure import PLAIN_BODY, REPO

if TYPE_CHECKING:
    from proxy_bench import Rounds, Target, TargetResult

TARGET_REDIS_RATIO = 0.60
TARGET_MEMORY_RATIO = 0.75
TARGET_SCALING = 1.7
TARGET_ADDED_P50_MS = 1.0
TARGET_REDIS_US = 40.0
TARGET_REDIS_COMMANDS = 25.0


def values(rounds: Rounds, f: Callable[[dict[str, TargetResult]], float | None]) -> list[float]:
    out = []
    for r in rounds:
        try:
            v = f(r)
        except (KeyError, TypeError, ZeroDivisionError):
            v = None
        if v is not None:
            out.append(v)
    return out


def cell(xs: list[float], fmt: str) -> str:
    if not xs:
        return "–"
    text = format(statistics.median(xs), fmt)
    if len(xs) > 1:
        text += f" [{format(min(xs), fmt)}–{format(max(xs), fmt)}]"
    return text


def on_redis(t: Target) -> bool:
    return t.store in ("redis", "cluster")


def rows(plan_: list[Target], args) -> list[tuple[str, str, Callable[[Target], Callable]]]:
    """(label, format, for a target: the per-round value function or None)."""
    one = {(t.store, t.loop): t.name for t in plan_ if t.kind == "proxy" and t.workers == 1 and t.tree == REPO}
    return [
        (f"requests/s, wrk -t1 -c{args.connections}", ",.0f", lambda t: lambda r: r[t.name].sat.rps),
        ("throughput vs pass-through, same loop (%)", ".1f", lambda t: t.floor and (
            lambda r: 100 * r[t.name].sat.rps / r[t.floor].sat.rps)),
        ("throughput vs 1 worker (×)", ".2f", lambda t: t.workers > 1 and (
            lambda r: r[t.name].sat.rps / r[one[t.store, t.loop]].sat.rps)),
        ("throughput vs direct (%)", ".1f", lambda t: lambda r: 100 * r[t.name].sat.rps / r["direct"].sat.rps),
        ("proxy CPU per request (µs)", ".0f", lambda t: t.kind != "direct" and (
            lambda r: r[t.name].cpu_us_per_req)),
        ("CPU per request vs pass-through, same loop (×)", ".2f", lambda t: t.floor and (
            lambda r: r[t.name].cpu_us_per_req / r[t.floor].cpu_us_per_req)),
        ("proxy CPU at saturation (cores)", ".2f", lambda t: t.kind != "direct" and (lambda r: r[t.name].cpu_busy)),
        ("latency p50 at -c1 (ms)", ".3f", lambda t: lambda r: r[t.name].one.p50_ms),
        ("latency p99 at -c1 (ms)", ".3f", lambda t: lambda r: r[t.name].one.p99_ms),
        ("added p50 over pass-through at -c1 (ms)", "+.3f", lambda t: t.floor and (
            lambda r: r[t.name].one.p50_ms - r[t.floor].one.p50_ms)),
        ("added p99 over pass-through at -c1 (ms)", "+.3f", lambda t: t.floor and (
            lambda r: r[t.name].one.p99_ms - r[t.floor].one.p99_ms)),
        ("stream TTFB p50 (ms)", ".3f", lambda t: lambda r: r[t.name].ttfb.p50_ms),
        ("added TTFB p50 over pass-through (ms)", "+.3f", lambda t: t.floor and (
            lambda r: r[t.name].ttfb.p50_ms - r[t.floor].ttfb.p50_ms)),
        ("Redis commands per request (scripts' own included)", ".1f", lambda t: on_redis(t) and (
            lambda r: r[t.name].redis["commands"])),
        ("Redis server µs per request (script usec)", ".0f", lambda t: on_redis(t) and (
            lambda r: r[t.name].redis["script_us"])),
        ("Redis µs per request, all entries (inner commands twice)", ".0f", lambda t: on_redis(t) and (
            lambda r: r[t.name].redis["command_us"])),
        ("script calls (EVALSHA) per request", ".2f", lambda t: on_redis(t) and (
            lambda r: r[t.name].redis["evalsha"])),
        ("µs per script call", ".0f", lambda t: on_redis(t) and (lambda r: r[t.name].redis["evalsha_us"])),
        ("redis-server CPU µs per request (all nodes)", ".0f", lambda t: on_redis(t) and (
            lambda r: r[t.name].redis["cpu_us"])),
        ("busiest cluster master's share of script time (%)", ".0f", lambda t: t.store == "cluster" and (
            lambda r: r[t.name].redis["busiest_node"])),
    ]


def checks(plan_: list[Target], rounds: Rounds, args) -> list[tuple[str, bool, str]]:
    names = {t.name for t in plan_}
    med = statistics.median
    out = []

    def add(label: str, xs: list[float], ok: Callable[[float], bool], fmt: str) -> None:
        if xs:
            out.append((label, ok(med(xs)), cell(xs, fmt)))

    for name, target in (("redis", TARGET_REDIS_RATIO), ("memory", TARGET_MEMORY_RATIO)):
        if name in names:
            add(f"1 worker, {name}: throughput >= {100 * target:.0f} % of the pass-through (same loop)",
                values(rounds, lambda r: 100 * r[name].sat.rps / r["passthrough"].sat.rps),
                lambda v: v >= 100 * target, ".1f")
    multi = next((t for t in plan_ if t.workers > 1), None)
    if multi:
        add(f"{multi.workers} workers, Redis: >= {TARGET_SCALING:g}x one worker (load generator on the "
            f"proxy's cores: this machine has none to spare)",
            values(rounds, lambda r: r[multi.name].sat.rps / r["redis"].sat.rps), lambda v: v >= TARGET_SCALING,
            ".2f")
    if multi:       # what N cores of their own would give, from CPU per request (foreign load barely moves it)
        add(f"(derived) {multi.workers} workers on cores of their own: {multi.workers} × CPU per request of 1 "
            f"worker / of {multi.workers} workers, >= {TARGET_SCALING:g}x",
            values(rounds, lambda r: multi.workers * r["redis"].cpu_us_per_req / r[multi.name].cpu_us_per_req),
            lambda v: v >= TARGET_SCALING, ".2f")
    if "redis" in names:
        add(f"1 worker, Redis: added latency p50 at -c1 <= {TARGET_ADDED_P50_MS:g} ms over the pass-through",
            values(rounds, lambda r: r["redis"].one.p50_ms - r["passthrough"].one.p50_ms),
            lambda v: v <= TARGET_ADDED_P50_MS, "+.3f")
    for name, label in (("redis", "Redis"), ("redis-cluster", "Redis Cluster, summed over its masters")):
        if name not in names:
            continue
        add(f"{label}: server time (script usec) per request <= {TARGET_REDIS_US:g} µs",
            values(rounds, lambda r: r[name].redis["script_us"]), lambda v: v <= TARGET_REDIS_US, ".0f")
        add(f"{label}: commands per request <= {TARGET_REDIS_COMMANDS:g}",
            values(rounds, lambda r: r[name].redis["commands"]), lambda v: v <= TARGET_REDIS_COMMANDS, ".1f")
    return out


def comparisons(plan_: list[Target], rounds: Rounds) -> list[str]:
    """Same-round ratios worth a line: uvloop against asyncio, each tree against the first."""
    out = []
    if "redis-cluster" in {t.name for t in plan_} and "redis" in {t.name for t in plan_}:
        rps = values(rounds, lambda r: r["redis-cluster"].sat.rps / r["redis"].sat.rps)
        cpu = values(rounds, lambda r: r["redis-cluster"].cpu_us_per_req / r["redis"].cpu_us_per_req)
        p50 = values(rounds, lambda r: r["redis-cluster"].one.p50_ms - r["redis"].one.p50_ms)
        out.append(f"- Redis Cluster vs one Redis (1 worker each): throughput ×{cell(rps, '.2f')}, proxy CPU per "
                   f"request ×{cell(cpu, '.2f')}, p50 at -c1 {cell(p50, '+.3f')} ms")
    for base in ("passthrough", "memory", "redis"):
        if f"{base}-asyncio" in {t.name for t in plan_} and base in {t.name for t in plan_}:
            rps = values(rounds, lambda r: r[base].sat.rps / r[f"{base}-asyncio"].sat.rps)
            cpu = values(rounds, lambda r: r[base].cpu_us_per_req / r[f"{base}-asyncio"].cpu_us_per_req)
            p50 = values(rounds, lambda r: r[base].one.p50_ms - r[f"{base}-asyncio"].one.p50_ms)
            out.append(f"- uvloop vs asyncio, {base}: throughput ×{cell(rps, '.2f')}, CPU per request "
                       f"×{cell(cpu, '.2f')}, p50 at -c1 {cell(p50, '+.3f')} ms")
    trees = [t for t in plan_ if "@" in t.name]
    for t in trees:
        first = next(x for x in trees if x.store == t.store)
        if t is first:
            continue
        for what, f in (("throughput", lambda r, a, b: r[a].sat.rps / r[b].sat.rps),
                        ("CPU per request", lambda r, a, b: r[a].cpu_us_per_req / r[b].cpu_us_per_req),
                        ("p50 at -c1", lambda r, a, b: r[a].one.p50_ms / r[b].one.p50_ms),
                        ("p99 at -c1", lambda r, a, b: r[a].one.p99_ms / r[b].one.p99_ms)):
            xs = values(rounds, lambda r: f(r, t.name, first.name))
            out.append(f"- {t.name} / {first.name}, {what}: ×{cell(xs, '.2f')}")
    return out


def report(plan_: list[Target], rounds: Rounds, args, meta: dict, command: str) -> str:
    cols = [t for t in plan_ if all(t.name in r for r in rounds)]
    lines = ["| | " + " | ".join(t.title for t in cols) + " |", "|---|" + "---:|" * len(cols)]
    for label, fmt, pick in rows(plan_, args):
        cells = []
        for t in cols:
            f = pick(t)
            cells.append(cell(values(rounds, f), fmt) if f else "–")
        if any(c != "–" for c in cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    res = checks(plan_, rounds, args)
    out = ["## Proxy benchmark", "", f"`{command}`", "",
           f"Median of {len(rounds)} round(s) [min–max]; ratios taken within each round.", "", *lines, "",
           "| target (issue 10) | result | measured |", "|---|---|---:|",
           *[f"| {name} | {'PASS' if ok else 'FAIL'} | {val} |" for name, ok, val in res]]
    extra = comparisons(plan_, rounds)
    if extra:
        out += ["", *extra]
    out += ["", background(rounds, args, meta), "", setup_text(args, meta)]
    return "\n".join(out)


def background(rounds: Rounds, args, meta: dict) -> str:
    """The foreign load the bench saw on the proxy's core (1-worker targets), over every measurement."""
    xs = sorted(100 * v for r in rounds for res in r.values() for v in res.foreign.values())
    if not xs:
        return f"Background load: not measured (unpinned). Load average {meta.get('loadavg_start', '?')} at the start."
    over = sum(1 for x in xs if x > 5)
    return (f"Background load: other processes used core {args.proxy_core} during the 1-worker measurements: "
            f"median {statistics.median(xs):.0f} %, max {xs[-1]:.0f} %, over 5 % in {over} of {len(xs)} "
            f"(each listed in the notes). Load average (1/5/15 min) {meta.get('loadavg_start', '?')} at the start, "
            f"{meta.get('loadavg_end', '?')} at the end.")


def setup_text(args, meta: dict) -> str:
    return (f"Setup: {meta['cpu']}, {meta['cores']} cores, shared with other workloads (see the notes). "
            f"1-worker proxies and the pass-through pinned to core {args.proxy_core}; N-worker proxies on every "
            f"core; fake upstream (raw asyncio), wrk, redis-server, the cluster's 3 masters and the TTFB client "
            f"on core {args.load_core}. "
            f"{meta['python']}, aiohttp {meta['aiohttp']}, uvloop {meta['uvloop']}, {meta['wrk']}, {meta['redis']}. "
            f"Each wrk run {args.seconds:g} s after a {args.warmup:g} s warm-up; TTFB over {args.ttfb_requests} "
            f"sequential streamed requests on one keep-alive connection. Redis figures per request of the "
            f"saturation run (wrk's count). The pass-through (bench/passthrough.py) reads the body and POSTs it "
            f"unchanged with one aiohttp.ClientSession; no auth, budget or JSON parsing. Non-streaming body: "
            f"`{PLAIN_BODY}`. Commit {meta['commit']}{meta['dirty']}, {meta['date']}.")
