"""Budget stores: the narrow interface of atomic operations the ledger is built on.

Three implementations pass one contract suite (tests/stores): `memory://` (the embedded default,
one process), `redis://` (many processes and machines share one Redis) and `redis+cluster://`
(the same over a Redis Cluster; see docs/cluster.md).
"""

from __future__ import annotations

from .base import Counter, Expired, ReserveOutcome, Seen, Status, Store, Totals

__all__ = ["Counter", "Expired", "ReserveOutcome", "Seen", "Status", "Store", "Totals", "open_store"]


def open_store(url: str, namespace: str = "bp") -> Store:
    """A store for `url`: `memory://`, `redis://…` / `rediss://…` / `unix://…`, or
    `redis+cluster://host:port[,host:port…]`."""
    if url.startswith("memory://"):
        from .memory import MemoryStore
        return MemoryStore()
    if url.startswith("redis+cluster://"):
        from .cluster import ClusterStore
        return ClusterStore(url, namespace=namespace)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from .redis import RedisStore
        return RedisStore(url, namespace=namespace)
    from ..errors import ConfigError
    raise ConfigError(f"store: expected memory://, a redis:// URL or redis+cluster://, got {url.split('://')[0]!r}://…")
