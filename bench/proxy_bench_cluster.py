"""budget-proxy on one Redis and on a Redis Cluster, in one run, beside the bare pass-through.

    python bench/proxy_bench_cluster.py [--quick] [proxy_bench.py's other options]

The Redis Cluster column of bench/proxy_bench.py, kept apart so that file stays one owner's: it
reuses proxy_bench.py's processes, pinning, wrk runs and TTFB client, and measures the
pass-through, the proxy on a redis-server and the proxy on a local 3-master Redis Cluster
(tests/redis_cluster.py). Per proxied request it prints the script calls, the commands (those
run inside scripts included) and the scripts' server microseconds, summed over the cluster's
nodes. The bench's one key is one org: the cluster serves it from one shard, so this measures
what the cluster client costs a proxy process; bench/cluster_bench.py spreads many orgs.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import proxy_bench as pb  # noqa: E402
from tests.redis_cluster import RedisCluster  # noqa: E402
from tests.redis_server import RedisServer  # noqa: E402

_SCRIPTS = ("evalsha", "eval")


def _work(ports: list[int], requests: int) -> str:
    stats = [pb.redis_calls(p) for p in ports]
    calls = sum(c for s in stats for k, (c, _) in s.items() if not k.startswith(("info", "config")))
    scripts = sum(s.get(k, (0, 0))[0] for s in stats for k in _SCRIPTS)
    us = sum(s.get(k, (0, 0))[1] for s in stats for k in _SCRIPTS)
    n = max(requests, 1)
    return f"{scripts / n:.2f} script calls, {calls / n:.1f} commands, {us / n:.0f} us in scripts"


def main(argv: list[str] | None = None) -> int:
    args = pb.parse_args(argv)
    wrk = pb.ensure_wrk()
    children = pb.Children()
    tmp = tempfile.mkdtemp(prefix="bp-bench-cluster-")
    results, work = {}, {}
    single, cluster = RedisServer(), RedisCluster()
    try:
        up_port = pb.free_port()
        up = children.start("upstream", pb.pinned(args.load_core, [sys.executable, pb.UPSTREAM, "--port", str(up_port)]),
                            log_path=os.path.join(tmp, "upstream.log"))
        pb.wait_port(up_port, up, "fast upstream", None)
        port, proc, _ = pb.start_passthrough(children, tmp, up_port, args)
        results["pass-through"] = pb.measure("passthrough", port, args, wrk, children, proc.pid)
        children.stop(proc)
        single.start()
        cluster.start()
        for label, url, ports in (("Redis", single.url, [single.port]), ("Redis Cluster", cluster.url, cluster.ports)):
            port, proc, _ = pb.start_proxy(children, tmp, label.replace(" ", "-").lower(), url, up_port, args)
            before = pb.proxy_requests(port)
            for p in ports:
                pb.redis_command(p, "CONFIG", "RESETSTAT")
            results[label] = pb.measure(label, port, args, wrk, children, proc.pid)
            work[label] = _work(ports, pb.proxy_requests(port) - before)
            children.stop(proc)
    finally:
        children.stop_all()
        single.stop()
        cluster.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    base = results["pass-through"]
    print(f"\n{'':34}" + "".join(f"{k:>16}" for k in results))
    rows = (("requests/s, wrk -c%d" % args.connections, lambda r: f"{r.sat.rps:,.0f}"),
            ("vs pass-through", lambda r: f"{100 * r.sat.rps / base.sat.rps:.1f} %"),
            ("proxy CPU per request (us)", lambda r: f"{r.cpu_us_per_req:.0f}"),
            ("latency p50 at -c1 (ms)", lambda r: f"{r.one.p50_ms:.3f}"),
            ("latency p99 at -c1 (ms)", lambda r: f"{r.one.p99_ms:.3f}"),
            ("stream TTFB p50 (ms)", lambda r: f"{r.ttfb.p50_ms:.3f}"))
    for name, f in rows:
        print(f"{name:34}" + "".join(f"{f(r):>16}" for r in results.values()))
    for label, text in work.items():
        print(f"- {label}, per proxied request: {text}")
    for r in results.values():
        for note in r.notes:
            print(f"- {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
