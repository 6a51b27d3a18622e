"""Where the Lua time of one reserve and one commit goes: the store's scripts against variants of
themselves with one part taken out or changed, in one redis-server, interleaved rounds.

    python bench/lua_percall.py [--sizes 1,16] [--batches 20] [--rounds 7] [--only a,b]

Starts its own redis-server. Each variant is the assembled script text (proxy/stores/redis.py
SCRIPTS) with a few source edits (VARIANTS below); every edit must match the text, so a variant
that no longer applies fails loudly instead of measuring the baseline again. The calls are
bench/batch_bench.py's (its plan: 11 counters in 3 window hashes, 5 limited), encoded exactly as
the coalescer sends them. Per variant and batch size it prints the scripts' usec (INFO
commandstats) per reserve and per commit, the median of the rounds (variants alternate batch by
batch within a round, so a busy machine slows them alike), and per request its [min-max]. Variants that drop a
write are not correct scripts: they only tell what that part costs.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.batch_bench import plan_counters  # noqa: E402
from bench.ledger_bench import _commandstats  # noqa: E402
from proxy.keys import record_key  # noqa: E402
from proxy.stores import open_store  # noqa: E402
from proxy.stores.base import OPEN_RECORD_MARGIN_MS, SETTLED_TTL_MS  # noqa: E402
from proxy.stores.redis import SCRIPTS  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

# What the proxy passes as the request (RequestInfo.pack) for a typical request.
INFO = '["acme","alice",null,"chat","gpt-4o-mini","gpt-4o-mini","openai",0,null]'

# name -> [(old, new)] edits of the script texts (each must occur in at least one of them).
VARIANTS: dict[str, list[tuple[str, str]]] = {
    "baseline": [],
    # the floor: EVALSHA with the batch's arguments, the script returns at once
    "empty script": [("local results, plans, k, a, i, nargs",
                      "do return {} end\nlocal results, plans, k, a, i, nargs"),
                     ("local function reserve(K, k, A, a, plan)\n", "local function reserve(K, k, A, a, plan)\n  do return 1 end\n"),
                     ("local function settle(K, k, A, a, plan)\n", "local function settle(K, k, A, a, plan)\n  do return 1 end\n")],
    # batch.lua's argument walk, the plans and the pcall; the bodies return at once
    "bodies return at once": [("local function reserve(K, k, A, a, plan)\n", "local function reserve(K, k, A, a, plan)\n  do return 1 end\n"),
                              ("local function settle(K, k, A, a, plan)\n", "local function settle(K, k, A, a, plan)\n  do return 1 end\n")],
    # the record: a short value instead of request + keys + counters
    "record short": [("'\\n' .. A[a + 6] ..\n                    record_tail(plan), 'NX'", "'\\n', 'NX'")],
    # no log entry at all
    "no XADD": [("  redis.call('XADD', K[k + 2]", "  if false then redis.call('XADD', K[k + 2]"),
                ("'c', plan.A[plan.rec])\nend", "'c', plan.A[plan.rec]) end\nend")],
    # the log entry as one packed field
    "XADD 1 field": [("'*', 'id', A[a], 'o', outcome, 'ct', t, 'cd', d,\n             'u', A[a + 9], 'l', A[a + 10], 'i', info, 'w', wkeys, 'c', plan.A[plan.rec])",
                      "'*', 'e', A[a] .. '\\n' .. outcome .. '\\n' .. t .. '\\n' .. d .. '\\n' .. A[a + 9] .. '\\n' .. A[a + 10] .. '\\n' .. info .. '\\n' .. wkeys .. '\\n' .. plan.A[plan.rec])")],
    # the log entry without the window keys and counters (w, c)
    "XADD no w/c": [(", 'w', wkeys, 'c', plan.A[plan.rec])", ")")],
    # XADD without MAXLEN ~ (no trimming check)
    "XADD no MAXLEN": [("'XADD', K[k + 2], 'MAXLEN', '~', A[a + 11], '*'", "'XADD', K[k + 2], '*'")],
    # no ZADD / ZREM of the lease index
    "no lease": [("local function lease_add(key, deadline, id)\n  lease(key)[id] = deadline",
                  "local function lease_add(key, deadline, id)\n  do return end"),
                 ("local function lease_remove(key, id)\n  lease(key)[id] = false",
                  "local function lease_remove(key, id)\n  do return end"),
                 ("local function lease_add(key, deadline, id)\n  redis.call('ZADD', key, '+inf', LEASE_ANCHOR, deadline, id)",
                  "local function lease_add(key, deadline, id)\n  do return end"),
                 ("local function lease_remove(key, id)\n  redis.call('ZREM', key, id)",
                  "local function lease_remove(key, id)\n  do return end")],
    # reserve cut short: after the reads and checks; after the record's SET NX
    "reserve: reads+checks only": [("  -- The record is the first write, NX",
                                    "  do return out end\n  -- The record is the first write, NX")],
    "reserve: + record, no writes": [("    return DUPLICATE\n  end\n  for w = 1, plan.nw do",
                                      "    return DUPLICATE\n  end\n  do return out end\n  for w = 1, plan.nw do")],
    # commit cut short: after the record's SET GET; + the reads; + the log entry
    "commit: record only": [("  if state == 'r' then\n", "  if state == 'r' then\n    do return 1 end\n")],
    "commit: + reads": [("  if state == 'r' then\n    local fresh, reads = settle_read(plan)\n",
                         "  if state == 'r' then\n    local fresh, reads = settle_read(plan)\n    do return 1 end\n")],
    "commit: + log, no writes": [("    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n",
                                  "    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n    do return 1 end\n")],
    # one part run twice: the difference to the baseline is what that part costs
    "x2 reserve reads+checks": [("  for w = 1, plan.nw do\n    local is_new, vals = hash_read(plan, w)\n",
                                 "  for rep = 1, 2 do base, ns = 0, 6\n  for w = 1, plan.nw do\n    local is_new, vals = hash_read(plan, w)\n"),
                                ("    base = base + n[w]\n  end\n", "    base = base + n[w]\n  end\n  end\n")],
    "x2 reserve writes": [("    return DUPLICATE\n  end\n  for w = 1, plan.nw do",
                           "    return DUPLICATE\n  end\n  for rep = 1, 2 do\n  for w = 1, plan.nw do"),
                          ("  lease_add(K[k + 1], A[a + 3], A[a])\n", "  end\n  lease_add(K[k + 1], A[a + 3], A[a])\n")],
    "x2 commit reads": [("    local fresh, reads = settle_read(plan)\n    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n",
                         "    local fresh, reads = settle_read(plan)\n    fresh, reads = settle_read(plan)\n    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n")],
    "x2 commit log": [("    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n",
                       "    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n    settle_log(K, k, A, a, plan, A[a + 8], A[a + 2], A[a + 3], info)\n")],
    "x2 commit writes": [("    settle_write(plan, fresh, reads, tokens, usd, res_t + 0, res_d + 0)\n",
                          "    settle_write(plan, fresh, reads, tokens, usd, res_t + 0, res_d + 0)\n    settle_write(plan, fresh, reads, 0, 0, 0, 0)\n")],
    "x2 commit record match": [("  local state, _, res_t, res_d, from = string.match(rec, '^(%a) (%d+) (%d+) (%d+)\\n()')\n",
                                "  local state, _, res_t, res_d, from = string.match(rec, '^(%a) (%d+) (%d+) (%d+)\\n()')\n  state, _, res_t, res_d, from = string.match(rec, '^(%a) (%d+) (%d+) (%d+)\\n()')\n")],
    # reserve's reply without the limited counters' values
    "reserve no seen": [("{unpack(plan.reply)}", "{1}"),
                        ("      out[ns + 1], out[ns + 2], out[ns + 3], out[ns + 4] = t, tr, d, dr\n", "")],
}


def variant(text: str, edits: list[tuple[str, str]]) -> tuple[str, set[int]]:
    used = set()
    for i, (old, new) in enumerate(edits):
        if old in text:
            text = text.replace(old, new)
            used.add(i)
    return text, used


async def run(store, server, scripts, wire, n: int, batches: int) -> tuple[float, float]:
    """(reserve usec, commit usec) per call: `batches` batches of n reserves then n commits."""
    c = store._calls
    deadline = int(time.time() * 1000) + 600_000
    usec = [0, 0]
    for _ in range(batches):
        ids = [uuid.uuid4().hex for _ in range(n)]
        reserves = [(store._reserve, [record_key("bp", rid), store._leases, *wire.keys],
                     [rid, 1200, 9000, deadline, deadline + OPEN_RECORD_MARGIN_MS, "0", INFO],
                     wire.reserve_tail, None) for rid in ids]
        commits = [(store._settle_script, [record_key("bp", rid), store._leases, store._log, *wire.keys],
                    [rid, "commit", 900, 7000, SETTLED_TTL_MS, 0, "0", 0, "ok", "700 0 200 0", "12", 100_000],
                    wire.settle_tail, None) for rid in ids]
        for k, group in enumerate((reserves, commits)):
            before = _commandstats(server).get("evalsha", (0, 0))[1]
            for script, keys, args, _ in c._calls(group):
                await scripts[script](keys=keys, args=args)
            usec[k] += _commandstats(server)["evalsha"][1] - before
    return usec[0] / (n * batches), usec[1] / (n * batches)


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="1,16")
    ap.add_argument("--batches", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--only", default="")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    names = [n for n in VARIANTS if not args.only or n in args.only.split(",") or n == "baseline"]
    server = RedisServer()
    server.start()
    try:
        store = open_store(server.url)
        wire = store._wired(await plan_counters(store))
        by_name = {}
        for name in names:
            texts, used = {}, set()
            for kind in ("reserve", "settle", "batch"):
                texts[kind], u = variant(SCRIPTS[kind], VARIANTS[name])
                used |= u
            if len(used) < len(VARIANTS[name]) and name != "no lease":
                raise SystemExit(f"variant {name!r}: an edit matches no script")
            by_name[name] = {store._reserve: store._r.register_script(texts["reserve"]),
                             store._settle_script: store._r.register_script(texts["settle"]),
                             store._calls._batch: store._r.register_script(texts["batch"])}
        for name in names:
            for n in sizes:
                await run(store, server, by_name[name], wire, n, 1)
        results = {(name, n): [] for name in names for n in sizes}
        for _ in range(args.rounds):                  # variants alternate batch by batch
            for n in sizes:
                server.command("DEL", "{bp}:log")
                sums = {name: [0.0, 0.0] for name in names}
                for b in range(args.batches):
                    for name in names[b % len(names):] + names[:b % len(names)]:     # rotated
                        r, c = await run(store, server, by_name[name], wire, n, 1)
                        sums[name][0] += r
                        sums[name][1] += c
                for name in names:
                    results[name, n].append((sums[name][0] / args.batches, sums[name][1] / args.batches))
        print("| variant | " + " | ".join(f"batch {n}: reserve | commit | sum" for n in sizes) + " |")
        print("|---|" + "---|---|---|" * len(sizes))
        for name in names:
            cells = []
            for n in sizes:
                r = [x for x, _ in results[name, n]]
                s = [y for _, y in results[name, n]]
                t = [x + y for x, y in results[name, n]]
                cells += [f"{statistics.median(r):.1f}", f"{statistics.median(s):.1f}",
                          f"{statistics.median(t):.1f} [{min(t):.1f}-{max(t):.1f}]"]
            print(f"| {name} | " + " | ".join(cells) + " |")
        await store.close()
    finally:
        server.stop()


if __name__ == "__main__":
    asyncio.run(main())
