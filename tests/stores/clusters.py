"""What the Redis Cluster tests share (tests/stores/test_cluster.py, test_cluster_batch.py):
the orgs and scopes they reserve for, and finding orgs whose slots live on different nodes."""

from __future__ import annotations

from proxy.ledger import Scope

ORGS = [f"org{i}" for i in range(12)]


def scopes(org: str) -> tuple[Scope, ...]:
    return (Scope("global", "*"), Scope("org", org), Scope("user", f"{org}/u"),
            Scope("provider", "openai"), Scope("model", "gpt-4o"))


def cluster_keys(redis_cluster) -> dict[int, list[str]]:
    """Every key on each node (the tests' own small data set)."""
    return {port: redis_cluster.command(port, "--scan").split() for port in redis_cluster.ports}


def on_other_nodes(redis_cluster, candidates: list[str]) -> tuple[str, str]:
    """Two orgs whose tags map to slots served by different nodes."""
    owner = {}
    for org in candidates:
        slot = int(redis_cluster.command(redis_cluster.ports[0], "CLUSTER", "KEYSLOT", f"{{bp:{org}}}"))
        owner[org] = next(port for port in redis_cluster.ports
                          if _serves(redis_cluster.command(port, "CLUSTER", "MYID"),
                                     redis_cluster.command(port, "CLUSTER", "SHARDS"), slot))
    first = candidates[0]
    return first, next(org for org in candidates if owner[org] != owner[first])


def _serves(node_id: str, shards: str, slot: int) -> bool:
    # CLUSTER SHARDS (redis-cli output): "slots", start, end, ..., "nodes", ..., "id", <id>, ...
    for shard in shards.split("slots\n")[1:]:
        head, _, nodes = shard.partition("nodes\n")
        bounds = [int(x) for x in head.split() if x.isdigit()]
        if node_id in nodes and any(a <= slot <= b for a, b in zip(bounds[::2], bounds[1::2])):
            return True
    return False
